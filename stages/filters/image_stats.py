"""Image statistics filter: sharpness, exposure, contrast. Cheap, model-free, and the first filter a
run has, so even a pure generation run shows scores, decisions and reasons."""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.imaging import decode_rgb
from stages.base import IMAGE, Batch, Checks, FilterStage, Params, Reason, Resources


class ImageStatsParams(Params):
    min_sharpness: float = Field(20.0, ge=0, description="variance of the Laplacian on the grey image")
    min_exposure: float = Field(0.15, ge=0, le=1, description="mean brightness, 0-1")
    max_exposure: float = Field(0.90, ge=0, le=1, description="mean brightness, 0-1")
    min_contrast: float = Field(0.05, ge=0, description="std of brightness, 0-1")


# What image_stats measures, as the columns of the stages that store it.
STATS_COLUMNS = (pa.field("sharpness", pa.float32()), pa.field("exposure", pa.float32()),
                 pa.field("contrast", pa.float32()))


def image_stats(rgb: np.ndarray) -> tuple[float, float, float]:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    g = grey.astype(np.float32) / 255.0
    return sharpness, float(g.mean()), float(g.std())


class ImageStatsStage(FilterStage[ImageStatsParams]):
    """Scores sharpness, exposure and contrast of the whole image and drops what falls outside the limits."""

    name: ClassVar[str] = "image_stats"
    version: ClassVar[str] = "2"
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = STATS_COLUMNS

    def score_row(self, batch: Batch, i: int) -> dict[str, Any]:
        s, e, c = image_stats(decode_rgb(batch[IMAGE][i]))
        return {"sharpness": s, "exposure": e, "contrast": c}

    def decide(self, scores: dict[str, Any]) -> Reason | None:
        p = self.params
        return (Checks().min("sharpness", scores["sharpness"], p.min_sharpness, ".1f")
                .min("exposure", scores["exposure"], p.min_exposure)
                .max("exposure", scores["exposure"], p.max_exposure)
                .min("contrast", scores["contrast"], p.min_contrast, ".3f").reason())

    def thresholds(self) -> dict[str, dict[str, float]]:
        p = self.params
        return {"sharpness": {"min": p.min_sharpness}, "exposure": {"min": p.min_exposure, "max": p.max_exposure},
                "contrast": {"min": p.min_contrast}}
