"""insightface backend: SCRFD detection + 5 points, ArcFace 512-d embeddings, 1k3d68 head pose.

Models come from a local model-pack folder (buffalo_l or antelopev2 layout) and load through
insightface's own ``model_zoo.get_model(path)``, which picks the model class from the ONNX file's
input size and output count. ``FaceAnalysis(name)`` is never used: it downloads at first use.
The released packs are for non-commercial research only (insightface's licence); say so to users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from facekit.backends.base import DetectedFace, file_sha256
from facekit.common import ModelInfo, Params

# Candidate file names per role, in the order they are tried (buffalo_l, antelopev2, smaller packs).
DETECTOR_FILES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "det_2.5g.onnx", "det_500m.onnx")
RECOGNIZER_FILES = ("w600k_r50.onnx", "glintr100.onnx", "w600k_mbf.onnx")
GENDERAGE_FILES = ("genderage.onnx",)
LANDMARK3D_FILES = ("1k3d68.onnx",)

# The insightface class and task each role must route to; anything else is the wrong file.
EXPECTED = {
    "detector": ("SCRFD", "detection"),
    "recognizer": ("ArcFaceONNX", "recognition"),
    "genderage": ("Attribute", "genderage"),
    "landmark_3d": ("Landmark", "landmark_3d_68"),
}
PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/{pack}.zip"


class InsightFaceSpec(Params):
    """Where the pack is and which files play which role (``None``: first known name found)."""

    model_dir: str
    detector: str | None = None
    recognizer: str | None = None
    genderage: str | None = None
    landmark_3d: str | None = None
    with_pose: bool = True  # run 1k3d68 per face for 68 points and pitch/yaw/roll
    det_size: int = Field(640, ge=32, multiple_of=32)
    det_thresh: float = Field(0.5, ge=0.0, le=1.0)
    nms_thresh: float = Field(0.4, ge=0.0, le=1.0)
    providers: tuple[str, ...] | None = None  # None: insightface's choice (CUDA when present, else CPU)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0 = its default


class ModelPackError(FileNotFoundError):
    """A model file is missing or is not what its role needs; the message says how to fix it."""


def as_spec(spec: InsightFaceSpec | Mapping[str, Any]) -> InsightFaceSpec:
    return spec if isinstance(spec, InsightFaceSpec) else InsightFaceSpec.model_validate(dict(spec))


def _fix_hint(folder: Path) -> str:
    pack = "antelopev2" if "antelope" in folder.name else "buffalo_l"
    nested = sorted(folder.glob("*/*.onnx")) if folder.is_dir() else []
    if nested:
        return (f"the .onnx files are one level down in {nested[0].parent}; set model_dir to that folder "
                "(antelopev2.zip unpacks into a nested folder)")
    return (f"download {PACK_URL.format(pack=pack)} on a machine with network access and unzip it so "
            f"that the .onnx files sit directly in {folder}, or set model_dir to an existing pack")


def _resolve(folder: Path, explicit: str | None, candidates: tuple[str, ...], role: str) -> Path | str:
    """The file for a role, or a problem sentence naming the folder, the names tried and the fix."""
    names = (explicit,) if explicit else candidates
    for name in names:
        if (folder / name).is_file():
            return folder / name
    tried = " or ".join(names)
    return f"insightface {role}: no {tried} in {folder}; {_fix_hint(folder)}"


def _roles(spec: InsightFaceSpec, need: tuple[str, ...]) -> dict[str, Path | str]:
    folder = Path(spec.model_dir).expanduser()
    table = {
        "detector": (spec.detector, DETECTOR_FILES),
        "recognizer": (spec.recognizer, RECOGNIZER_FILES),
        "genderage": (spec.genderage, GENDERAGE_FILES),
        "landmark_3d": (spec.landmark_3d, LANDMARK3D_FILES),
    }
    return {role: _resolve(folder, *table[role], role) for role in need}


def files_for(spec: InsightFaceSpec, uses: tuple[str, ...]) -> tuple[str, ...]:
    """File roles behind what a stage uses: detector (+ 1k3d68 with pose), embedder, genderage."""
    roles: list[str] = []
    for use in uses:
        if use == "detector":
            roles += ["detector", "landmark_3d"] if spec.with_pose else ["detector"]
        elif use == "embedder":
            roles.append("recognizer")
        elif use == "genderage":
            roles.append("genderage")
        else:
            raise ValueError(f"unknown insightface use {use!r}; expected detector, embedder or genderage")
    return tuple(roles)


def check_files(spec: InsightFaceSpec | Mapping[str, Any],
                uses: tuple[str, ...] = ("detector", "embedder")) -> list[str]:
    """Problems that would stop loading what ``uses`` names, one sentence each (empty: all found).
    For ``doctor``: a stage's role in BACKEND_CLASSES (detector / embedder) is a use."""
    spec = as_spec(spec)
    folder = Path(spec.model_dir).expanduser()
    if not folder.is_dir():
        return [f"insightface model_dir {folder} does not exist; {_fix_hint(folder)}"]
    return [v for v in _roles(spec, files_for(spec, uses)).values() if isinstance(v, str)]


def file_digest(paths: list[Path]) -> str:
    """Short sha256 over the weight files, for lineage; each file is hashed once per process."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}:{file_sha256(path)}".encode())
    return digest.hexdigest()[:16]


def load_model(spec: InsightFaceSpec, role: str) -> Any:
    """Load one role's file through insightface's router and check it routed to the right class."""
    from insightface.model_zoo import get_model

    found = _roles(spec, (role,))[role]
    if isinstance(found, str):
        raise ModelPackError(found)
    kwargs: dict[str, Any] = {"providers": list(spec.providers) if spec.providers else None}
    if spec.threads:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = spec.threads
        kwargs["sess_options"] = options
    model = get_model(str(found), **kwargs)
    cls, task = EXPECTED[role]
    got = (type(model).__name__, getattr(model, "taskname", None)) if model is not None else (None, None)
    if got != (cls, task):
        raise ModelPackError(
            f"insightface {role}: {found} routed to {got[0]} ({got[1]}), expected {cls} ({task}); "
            f"check that the file is the {role} model of the pack"
        )
    model.path = found
    return model


def _bgr(rgb: np.ndarray) -> np.ndarray:
    """insightface models take OpenCV's BGR order (they swap to RGB inside their blob)."""
    return np.ascontiguousarray(rgb[..., ::-1])


class InsightFaceDetector:
    """SCRFD boxes + 5 points; with ``with_pose``, 1k3d68's 68 points and pitch/yaw/roll in ``extra``."""

    def __init__(self, spec: InsightFaceSpec | Mapping[str, Any]) -> None:
        self.spec = as_spec(spec)
        self.detector = load_model(self.spec, "detector")
        # ctx_id 0 keeps the providers chosen at load (a negative one would force CPU).
        self.detector.prepare(0, input_size=(self.spec.det_size,) * 2,
                              det_thresh=self.spec.det_thresh, nms_thresh=self.spec.nms_thresh)
        self.landmark = load_model(self.spec, "landmark_3d") if self.spec.with_pose else None

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        from insightface.app.common import Face

        bgr = _bgr(rgb)
        boxes, kpss = self.detector.detect(bgr, input_size=(self.spec.det_size,) * 2)
        faces = []
        for i in range(boxes.shape[0]):
            box = tuple(float(v) for v in boxes[i, :4])
            kps = kpss[i].astype(np.float64) if kpss is not None else np.zeros((5, 2))
            face = DetectedFace(box=box, score=float(boxes[i, 4]), landmarks5=kps)  # type: ignore[arg-type]
            if self.landmark is not None:
                record = Face(bbox=boxes[i, :4])
                points = self.landmark.get(bgr, record)
                face.landmarks68 = np.asarray(points[:, :2], dtype=np.float64)
                pitch, yaw, roll = (float(v) for v in record.pose)
                face.extra["pose"] = {"pitch": pitch, "yaw": yaw, "roll": roll}
            faces.append(face)
        # Largest first, then left to right (as the dlib backend): face indices stay stable across runs.
        faces.sort(key=lambda f: (-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.box[0], f.box[1]))
        return faces

    def model_info(self) -> ModelInfo:
        paths = [self.detector.path] + ([self.landmark.path] if self.landmark is not None else [])
        return ModelInfo(name=f"insightface:{'+'.join(p.name for p in paths)}", revision=file_digest(paths))


class InsightFaceEmbedder:
    """ArcFace embeddings of 112x112 template crops, L2-normalised (compare by cosine)."""

    metric = "cosine"

    def __init__(self, spec: InsightFaceSpec | Mapping[str, Any]) -> None:
        self.spec = as_spec(spec)
        self.model = load_model(self.spec, "recognizer")
        self.input_size = int(self.model.input_size[0])
        self.dim = int(self.model.output_shape[1])
        self.space = f"arcface-{self.model.path.stem}-{self.dim}"
        batch = self.model.input_shape[0]
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def embed(self, aligned_rgb: list[np.ndarray]) -> np.ndarray:
        if not aligned_rgb:
            return np.zeros((0, self.dim), dtype=np.float32)
        crops = [_bgr(a) for a in aligned_rgb]
        if self._fixed_batch == 1:
            feats = np.concatenate([self.model.get_feat([c]) for c in crops])
        else:
            feats = np.asarray(self.model.get_feat(crops))
        feats = feats.astype(np.float32).reshape(len(crops), self.dim)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return feats / np.maximum(norms, 1e-12)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"insightface:{self.model.path.name}", revision=file_digest([self.model.path]))
