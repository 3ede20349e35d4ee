"""detect: find faces with boxes, scores and landmarks; decide what a sample is (the image or each face).

Two policies, because the two kinds of input mean different things:
- ``one_face_per_image`` (generated data): the image *is* one face. No face is an error row ("no
  face": nothing downstream can use it). Several faces keep the largest one, with its scores, as the
  same sample, but decide keep=False "multiple faces (n)": a render with a second face is suspect,
  yet the decision stays a view (an export may still take it) and later stages still score it.
- ``sample_per_face`` (ingested photos): every face becomes a derived sample, id
  ``stable_hash([parent_id, "face", index])``, key ``<parent key>_face<index>``, largest face first.
  Derived samples inherit the photo's identity label (a bystander in a labelled folder is label
  noise, which the consistency stage catches). No face is an error row on the photo itself.

Landmarks are stored in the coordinates of the input image; align reads them from the batch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.backends.base import BackendParams, DetectedFace, FaceDetector
from facekit.imaging import ImageError, decode_rgb
from stages.base import (
    IMAGE,
    KEY,
    PARENT_ID,
    SAMPLE_ID,
    Batch,
    ModelInfo,
    Resources,
    Rows,
    StageKind,
    stable_hash,
)
from stages.mappers.backend_stage import BackendStage


class DetectParams(BackendParams):
    policy: Literal["one_face_per_image", "sample_per_face"] = Field(
        "one_face_per_image", description=
        "one_face_per_image (generated data: the image is one face) or sample_per_face (photos: every face becomes a"
        " derived sample)")
    min_face_size: float = Field(0.0, ge=0, description="ignore faces with a shorter box side (px)")


def face_order(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Largest box first, then left to right: the same faces always get the same indices."""
    def area(f: DetectedFace) -> float:
        return (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])

    return sorted(faces, key=lambda f: (-area(f), f.box[0], f.box[1]))


def _floats(values: np.ndarray | tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


class DetectStage(BackendStage[DetectParams]):
    """Finds faces (box, score, landmarks); the image is one face, or each face becomes a derived sample."""

    name: ClassVar[str] = "detect"
    role: ClassVar[Literal["detector", "embedder"]] = "detector"
    version: ClassVar[str] = "2"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    resources: ClassVar[Resources] = Resources(cpus=0.5, memory_gb=0.5)
    batch_size: ClassVar[int] = 16
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("face_box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in the input image
        pa.field("det_score", pa.float32()),  # the backend's own scale (dlib: HOG margin; SCRFD: 0-1)
        pa.field("landmarks5", pa.list_(pa.float32(), 10)),  # x, y of the 5 alignment points
        pa.field("landmarks68", pa.list_(pa.float32())),  # 136 floats, null when the backend has none
        pa.field("num_faces", pa.int32()),  # faces found in the image (after min_face_size)
        pa.field("face_index", pa.int32()),  # 0 = largest
    )

    def setup(self) -> None:
        self.detector: FaceDetector = self.build_model()

    def model_info(self) -> ModelInfo:
        detector = getattr(self, "detector", None)
        return detector.model_info() if detector is not None else ModelInfo()

    def find_faces(self, data: bytes | None) -> list[DetectedFace]:
        rgb = decode_rgb(data)
        faces = [f for f in self.detector.detect(rgb)
                 if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.params.min_face_size]
        return face_order(faces)

    def process(self, batch: Batch) -> Batch:
        rows = Rows([], [KEY, PARENT_ID, *(f.name for f in self.columns)])
        per_face = self.params.policy == "sample_per_face"
        n = len(batch[SAMPLE_ID])
        keys, parents = batch.get(KEY) or [None] * n, batch.get(PARENT_ID) or [None] * n
        for i, sid in enumerate(batch[SAMPLE_ID]):
            try:
                faces = self.find_faces(batch[IMAGE][i])
            except ImageError as exc:
                rows.fail(rows.append(sid, key=keys[i], parent_id=parents[i]), exc.rule, exc.detail)
                continue
            if not faces:
                rows.fail(rows.append(sid, key=keys[i], parent_id=parents[i]), "no_face")
            elif per_face:
                for index, face in enumerate(faces):
                    child = stable_hash([sid, "face", index])
                    rows.append(child, key=f"{keys[i] or sid}_face{index}", parent_id=sid,
                                **_face_columns(face, len(faces), index))
            else:
                j = rows.append(sid, key=keys[i], parent_id=parents[i], **_face_columns(faces[0], len(faces), 0))
                if len(faces) > 1:
                    rows.drop(j, "multiple_faces", f"{len(faces)} faces")
        return rows.batch()


def _face_columns(face: DetectedFace, n: int, index: int) -> dict[str, Any]:
    return {
        "face_box": _floats(face.box), "det_score": float(face.score), "landmarks5": _floats(face.landmarks5),
        "landmarks68": _floats(face.landmarks68), "num_faces": n, "face_index": index,
    }
