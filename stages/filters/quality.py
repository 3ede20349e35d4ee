"""quality: per-face scores (sharpness, exposure, contrast, size, detector score, head pose) and one
decision: the rule is the first failed check (`yaw_above_max`), the detail names every failed one
("|yaw| 34.2 > 30; sharpness 12.0 < 25").

Image statistics are measured on the face, not the photo: on the central region of the ArcFace
112 crop (eyes to chin, cheek to cheek), so a blurry background or a black alignment border does not
count and scores compare across image sizes. Without align upstream the crop is made here from the
5 points. Head pose comes from the input image's landmarks (68 when the backend has them, else 5)
by solvePnP against a generic 3D face (facekit.geometry).

Every threshold can be None (check off). The scores are always stored, so an export can re-decide
with other thresholds ("quality.yaw": {max_abs: 20}) without running this stage again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.geometry import ARCFACE_SIZE, align_to_template, head_pose, landmarks_array, warp
from facekit.imaging import decode_rgb
from stages.base import IMAGE, Batch, Checks, FilterStage, Params, Reason, Resources, RowError
from stages.filters.image_stats import STATS_COLUMNS, image_stats

# Rows, columns of the 112 crop that hold the face: from the brows (y 36, template eyes at 52) to
# below the mouth (y 104, mouth at 92), between the cheeks (x 24-88, eyes at 38 and 74).
FACE_REGION = (slice(36, 104), slice(24, 88))

SCORES = ("sharpness", "exposure", "contrast", "face_size", "det_score", "yaw", "pitch", "roll", "pose_error")


class QualityParams(Params):
    """Defaults are for 112 crops of photos and renders; sharpness and contrast were checked on
    insightface's t1.jpg faces and on blurred copies of them (tests/stages/test_face_stages.py)."""

    min_sharpness: float | None = Field(25.0, ge=0, description="Laplacian variance of the face region")
    min_exposure: float | None = Field(0.15, ge=0, le=1, description="mean brightness of the face, 0-1")
    max_exposure: float | None = Field(0.90, ge=0, le=1, description="mean brightness of the face, 0-1")
    min_contrast: float | None = Field(0.04, ge=0, description="std of the face's brightness, 0-1")
    min_face_size: float | None = Field(40.0, ge=0, description="sqrt(box width x height), px in the input")
    min_det_score: float | None = Field(None, description="backend scale: dlib HOG margin ~0-3, SCRFD 0-1")
    max_yaw: float | None = Field(45.0, ge=0, le=90, description="|yaw| limit, degrees")
    max_pitch: float | None = Field(30.0, ge=0, le=90, description="|pitch| limit, degrees")
    max_roll: float | None = Field(None, ge=0, le=180, description="|roll| limit; alignment removes roll")
    max_pose_error: float | None = Field(None, ge=0, description="3D model fit, in inter-ocular distances")


def face_stats(crop112: np.ndarray) -> tuple[float, float, float]:
    """Sharpness, exposure, contrast of a 112 ArcFace crop's face region (the whole-image measures of
    ``image_stats`` on that region)."""
    return image_stats(crop112[FACE_REGION])


class QualityStage(FilterStage[QualityParams]):
    """Scores each face (sharpness, exposure, contrast, size, detector score, head pose); drops what fails a limit."""

    name: ClassVar[str] = "quality"
    version: ClassVar[str] = "2"
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        *STATS_COLUMNS,
        pa.field("face_size", pa.float32()),
        pa.field("det_score", pa.float32()),  # detect's, repeated so export thresholds can name it here
        pa.field("yaw", pa.float32()),  # degrees, > 0: nose toward image right
        pa.field("pitch", pa.float32()),  # > 0: nose up
        pa.field("roll", pa.float32()),  # > 0: clockwise in the image
        pa.field("pose_error", pa.float32()),  # RMS reprojection error / inter-ocular distance
    )
    reads: ClassVar[tuple[str, ...]] = ("landmarks5",)
    # An aligned crop (align_matrix set) is scored as it is; without one the crop is made here from the
    # 5 points. 68 points give a better head pose; box and detector score are reported when present.
    optional_reads: ClassVar[tuple[str, ...]] = ("align_matrix", "landmarks68", "det_score", "face_box")

    def score_row(self, batch: Batch, i: int) -> dict[str, Any]:
        """Scores of row ``i``; raises ImageError / RowError when its pixels or landmarks are unusable."""
        def col(name: str) -> Any:
            values = batch.get(name)
            return values[i] if values is not None else None

        rgb = decode_rgb(col(IMAGE))
        lm5 = landmarks_array(col("landmarks5"), 5)
        lm68 = landmarks_array(col("landmarks68"), 68)
        if col("align_matrix") is not None:
            crop = rgb if rgb.shape[0] == ARCFACE_SIZE else cv2.resize(
                rgb, (ARCFACE_SIZE, ARCFACE_SIZE), interpolation=cv2.INTER_AREA)
        elif lm5 is not None:
            crop = warp(rgb, align_to_template(lm5).matrix, ARCFACE_SIZE)
        else:
            raise RowError("no_landmarks", "no landmarks5 and no aligned crop (quality needs detect upstream)")
        sharpness, exposure, contrast = face_stats(crop)
        scores: dict[str, Any] = dict.fromkeys(SCORES)
        scores.update(sharpness=sharpness, exposure=exposure, contrast=contrast, det_score=col("det_score"))
        box = col("face_box")
        if box is not None:
            scores["face_size"] = float(np.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)))
        points = lm68 if lm68 is not None else lm5
        if points is not None:
            pose = head_pose(points)
            iod = float(np.linalg.norm(lm5[1] - lm5[0])) if lm5 is not None else 0.0
            scores.update(yaw=pose.yaw, pitch=pose.pitch, roll=pose.roll,
                          pose_error=pose.reprojection_error / iod if iod > 0 else None)
        return scores

    def decide(self, scores: dict[str, Any]) -> Reason | None:
        p = self.params
        return (Checks().max_abs("yaw", scores["yaw"], p.max_yaw).max_abs("pitch", scores["pitch"], p.max_pitch)
                .max_abs("roll", scores["roll"], p.max_roll)
                .min("face_size", scores["face_size"], p.min_face_size, ".0f")
                .min("det_score", scores["det_score"], p.min_det_score)
                .min("sharpness", scores["sharpness"], p.min_sharpness, ".1f")
                .min("exposure", scores["exposure"], p.min_exposure).max("exposure", scores["exposure"], p.max_exposure)
                .min("contrast", scores["contrast"], p.min_contrast, ".3f")
                .max("pose_error", scores["pose_error"], p.max_pose_error).reason())

    def thresholds(self) -> dict[str, dict[str, float]]:
        p = self.params
        limits: dict[str, dict[str, float | None]] = {
            "yaw": {"min": None if p.max_yaw is None else -p.max_yaw, "max": p.max_yaw},
            "pitch": {"min": None if p.max_pitch is None else -p.max_pitch, "max": p.max_pitch},
            "roll": {"min": None if p.max_roll is None else -p.max_roll, "max": p.max_roll},
            "face_size": {"min": p.min_face_size}, "det_score": {"min": p.min_det_score},
            "sharpness": {"min": p.min_sharpness}, "exposure": {"min": p.min_exposure, "max": p.max_exposure},
            "contrast": {"min": p.min_contrast}, "pose_error": {"max": p.max_pose_error},
        }
        return {c: {k: v for k, v in lim.items() if v is not None} for c, lim in limits.items()
                if any(v is not None for v in lim.values())}
