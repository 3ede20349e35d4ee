"""Image statistics filter: sharpness, exposure, contrast. Cheap, model-free, and the first filter a
run has, so even a pure generation run shows scores, decisions and reasons."""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.imaging import ImageError, decode_rgb
from stages.base import IMAGE, Batch, FilterStage, Params, Resources


class ImageStatsParams(Params):
    min_sharpness: float = Field(20.0, ge=0, description="variance of the Laplacian on the grey image")
    min_exposure: float = Field(0.15, ge=0, le=1, description="mean brightness, 0-1")
    max_exposure: float = Field(0.90, ge=0, le=1)
    min_contrast: float = Field(0.05, ge=0, description="std of brightness, 0-1")


def image_stats(rgb: np.ndarray) -> tuple[float, float, float]:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    g = grey.astype(np.float32) / 255.0
    return sharpness, float(g.mean()), float(g.std())


class ImageStatsStage(FilterStage):
    name: ClassVar[str] = "image_stats"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = ImageStatsParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("sharpness", pa.float32()),
        pa.field("exposure", pa.float32()),
        pa.field("contrast", pa.float32()),
    )
    params: ImageStatsParams

    def score(self, batch: Batch) -> Batch:
        out: Batch = {"sharpness": [], "exposure": [], "contrast": []}
        for data in batch[IMAGE]:
            s, e, c = image_stats(decode_rgb(data))
            out["sharpness"].append(s)
            out["exposure"].append(e)
            out["contrast"].append(c)
        return out

    def decide(self, scores: dict[str, Any]) -> tuple[bool, str | None]:
        p = self.params
        failed = []
        if scores["sharpness"] < p.min_sharpness:
            failed.append(f"sharpness {scores['sharpness']:.1f} < {p.min_sharpness}")
        if scores["exposure"] < p.min_exposure:
            failed.append(f"underexposed {scores['exposure']:.2f} < {p.min_exposure}")
        if scores["exposure"] > p.max_exposure:
            failed.append(f"overexposed {scores['exposure']:.2f} > {p.max_exposure}")
        if scores["contrast"] < p.min_contrast:
            failed.append(f"contrast {scores['contrast']:.3f} < {p.min_contrast}")
        return (not failed, "; ".join(failed) or None)


__all__ = ["ImageError", "ImageStatsParams", "ImageStatsStage"]
