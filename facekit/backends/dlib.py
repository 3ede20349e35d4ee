"""dlib backend: HOG face detector + 68-point landmarks, and the ResNet 128-d face embedder.

The weights are the ``.dat`` files shipped by the ``face_recognition_models`` PyPI package, loaded
with dlib's own deserialiser (no pickle). The package is located with ``importlib.util.find_spec``
and never imported: its ``__init__`` imports ``pkg_resources``, which setuptools >= 81 removed.

How the embedder gets its input. dlib's ResNet was trained on dlib's own 150x150 chips (the face's
68 points fitted to dlib's mean face with 0.25 padding, ``get_face_chip``), not on ArcFace crops.
The FaceEmbedder protocol hands every backend an ArcFace-template crop, so that embed runs on the
aligned shard and dlib and insightface swap without touching the pipeline. The dlib embedder
therefore re-finds the 68 points on the crop (the predictor costs ~1 ms next to ~30 ms of ResNet)
and lets dlib cut its own chip from the crop, so dlib's alignment rule is used, not re-implemented.
The one loss: dlib's chip reaches ~11 px (at 112) below the ArcFace crop's bottom edge, the chin,
which the crop lacks. Measured on insightface's t1.jpg (6 faces; tests/facekit/backends/test_dlib.py): crop
descriptors sit 0.10-0.20 from dlib's canonical ones (``embed_from_landmarks``) yet separate people
as well (over the faces plus mirrored, rotated, resized and JPEG-40 copies: same-person mean 0.18 vs
0.17, nearest different people 0.63 vs 0.61). Within one run every sample takes the same path, so
thresholds stay consistent. One fixed ArcFace-to-chip warp without re-landmarking sat further off
(0.13-0.29 from canonical).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from facekit.backends.base import DetectedFace, file_sha256
from facekit.common import ModelInfo, Params
from facekit.geometry import ARCFACE_SIZE, landmarks5_from_68

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"
SPACE = "dlib-resnet-128"
DIM = 128
CHIP_SIZE = 150  # dlib's ResNet input
CHIP_PADDING = 0.25  # dlib's default chip padding, the one the ResNet was trained with
# Where HOG's box falls on an ArcFace 112 crop (mean over t1.jpg faces, mirrored and rescaled): the
# box the 68-point predictor starts from when it re-finds the landmarks on a crop.
TEMPLATE_FACE_BOX = (6.0, 19.0, 106.0, 119.0)


class DlibSpec(Params):
    """dlib options. Detection runs HOG on an image no larger than ``max_image_side`` (big photos are
    reduced first: HOG time grows with pixels x 4^upsample), landmarks on the full image."""

    model_dir: str | None = Field(None, description="folder of the .dat files; None: face_recognition_models")
    upsample: int = Field(1, ge=0, le=4, description="HOG pyramid upsampling; 1 finds faces down to ~40 px")
    adjust_threshold: float = Field(0.0, description="added to HOG's SVM threshold; < 0 finds more faces")
    max_image_side: int | None = Field(1024, ge=64, description="reduce larger images before HOG")
    num_jitters: int = Field(0, ge=0, description="embedder: average over this many jittered copies")


def models_dir(explicit: str | None = None) -> Path:
    """The folder holding the .dat files, found without importing face_recognition_models."""
    if explicit:
        folder = Path(explicit).expanduser()
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "dlib backend: the face_recognition_models package is not installed; "
                "`pip install face_recognition_models` or set model_dir to a folder with the .dat files"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not folder.is_dir():
        raise FileNotFoundError(f"dlib backend: model folder {folder} does not exist")
    return folder


def model_path(name: str, explicit_dir: str | None = None) -> Path:
    path = models_dir(explicit_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib backend: {path} is missing (reinstall face_recognition_models)")
    return path


def check_files(spec: DlibSpec | dict[str, Any] | None, uses: tuple[str, ...] = ("detector", "embedder")) -> list[str]:
    """For ``doctor``: the .dat files a role needs that cannot be found (the HOG detector needs none)."""
    spec = _as_spec(spec)
    needed = {PREDICTOR_68} | ({RESNET} if "embedder" in uses else set())
    problems = []
    for name in sorted(needed):
        try:
            model_path(name, spec.model_dir)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    return problems


def _as_spec(spec: DlibSpec | dict[str, Any] | None) -> DlibSpec:
    if spec is None:
        return DlibSpec()
    return spec if isinstance(spec, DlibSpec) else DlibSpec.model_validate(dict(spec))


class DlibDetector:
    """HOG boxes + 68 landmarks (+ the 5 alignment points derived from them).

    ``score`` is HOG's SVM margin (0 at the default threshold, ~1-3 for clear frontal faces). Faces are
    returned largest first, then left to right, so face indices are stable across runs.
    """

    def __init__(self, spec: DlibSpec | dict[str, Any] | None = None) -> None:
        import dlib

        self.spec = _as_spec(spec)
        self.predictor_path = model_path(PREDICTOR_68, self.spec.model_dir)
        self._hog = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(self.predictor_path))
        self._version = dlib.__version__

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        import dlib

        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        scale = 1.0
        small = rgb
        limit = self.spec.max_image_side
        if limit and max(h, w) > limit:
            scale = limit / max(h, w)
            small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._hog.run(small, self.spec.upsample, self.spec.adjust_threshold)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = (rect.left() / scale, rect.top() / scale,
                   (rect.right() + 1) / scale, (rect.bottom() + 1) / scale)
            full = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
            shape = self._predictor(rgb, full)
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(DetectedFace(box=box, score=float(score), landmarks5=landmarks5_from_68(pts),
                                      landmarks68=pts))
        faces.sort(key=lambda f: (-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.box[0], f.box[1]))
        return faces

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"dlib-{self._version}:hog+{PREDICTOR_68}",
                         revision=file_sha256(self.predictor_path)[:16])


def _shape(points: np.ndarray) -> Any:
    """A dlib full_object_detection from (68, 2) points (the rect is unused by chip extraction)."""
    import dlib

    pts = np.asarray(points, dtype=np.float64).reshape(68, 2)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    rect = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
    return dlib.full_object_detection(rect, [dlib.point(round(x), round(y)) for x, y in pts])


class DlibEmbedder:
    """ResNet 128-d descriptors of ArcFace-template crops of any side (112, 256, ...), compared by
    euclidean distance (dlib: same person below 0.6 on photos). Vectors are dlib's own, unnormalised."""

    space = SPACE
    dim = DIM
    metric = "euclidean"
    input_size = ARCFACE_SIZE

    def __init__(self, spec: DlibSpec | dict[str, Any] | None = None) -> None:
        import dlib

        self.spec = _as_spec(spec)
        self.model_path = model_path(RESNET, self.spec.model_dir)
        self.predictor_path = model_path(PREDICTOR_68, self.spec.model_dir)
        self._net = dlib.face_recognition_model_v1(str(self.model_path))
        self._predictor = dlib.shape_predictor(str(self.predictor_path))
        self._version = dlib.__version__

    def chip(self, crop: np.ndarray) -> np.ndarray:
        """dlib's 150x150 chip of an ArcFace crop: landmarks re-found on the crop, dlib's own alignment."""
        import dlib

        crop = np.ascontiguousarray(crop, dtype=np.uint8)
        if crop.ndim != 3 or crop.shape[0] != crop.shape[1]:
            raise ValueError(f"aligned crops are square RGB, got shape {crop.shape}")
        s = crop.shape[0] / ARCFACE_SIZE
        x0, y0, x1, y1 = (round(v * s) for v in TEMPLATE_FACE_BOX)
        shape = self._predictor(crop, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return dlib.get_face_chip(crop, shape, CHIP_SIZE, CHIP_PADDING)

    def embed(self, aligned_rgb: list[np.ndarray]) -> np.ndarray:
        if not aligned_rgb:
            return np.zeros((0, DIM), dtype=np.float32)
        chips = [self.chip(c) for c in aligned_rgb]
        vectors = self._net.compute_face_descriptor(chips, self.spec.num_jitters)
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(len(chips), DIM)

    def embed_from_landmarks(self, rgb: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
        """dlib's canonical path: its chip cut from the full image by the detector's 68 points."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        vec = self._net.compute_face_descriptor(rgb, _shape(landmarks68), self.spec.num_jitters)
        return np.asarray(vec, dtype=np.float32)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"dlib-{self._version}:{RESNET}+{PREDICTOR_68}",
                         revision=file_sha256(self.model_path)[:16])
