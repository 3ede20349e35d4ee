"""align: the 5 landmarks onto the ArcFace 112x112 template by a similarity; writes the crop as pixels.

The crop is what face-recognition training and the embedders consume. An optional larger crop with
the same framing (the 112 transform scaled, e.g. 256) is kept for enhancement / super-resolution
data. Crops are PNG, so their bytes depend only on the pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from facekit.geometry import ARCFACE_SIZE, align_to_template, landmarks_array, warp
from facekit.imaging import ImageError, decode_rgb, encode_png
from stages.base import (
    IMAGE,
    IMAGE_EXT,
    KEEP,
    REASON,
    SAMPLE_ID,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    Batch,
    Params,
    Resources,
    Stage,
)

EXTRA_CROP = "crop_extra"


class AlignParams(Params):
    size: int = Field(ARCFACE_SIZE, ge=32, le=1024, description="side of the crop; 112 is ArcFace's")
    extra_crop_size: int | None = Field(None, ge=32, le=2048,
                                        description="also store a crop of this side, same framing")


class AlignStage(Stage):
    name: ClassVar[str] = "align"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = AlignParams
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    batch_size: ClassVar[int] = 64
    writes_pixels: ClassVar[bool] = True
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("align_matrix", pa.list_(pa.float32(), 6)),  # 2x3 row-major: input image -> 112 template
        pa.field("align_residual", pa.float32()),  # RMS px (at 112) of the 5 points after the fit
        pa.field(EXTRA_CROP, pa.binary()),  # PNG of the extra crop, null unless extra_crop_size
    )
    params: AlignParams

    def process(self, batch: Batch) -> Batch:
        names = (SAMPLE_ID, STATUS, KEEP, REASON, IMAGE, IMAGE_EXT, *(f.name for f in self.columns))
        out: Batch = {c: [] for c in names}
        n = len(batch[SAMPLE_ID])
        marks = batch.get("landmarks5") or [None] * n
        for i, sid in enumerate(batch[SAMPLE_ID]):
            try:
                row = self.align_one(batch[IMAGE][i], marks[i])
            except (ImageError, ValueError) as exc:
                row = {STATUS: STATUS_ERROR, KEEP: False, REASON: str(exc)}
            out[SAMPLE_ID].append(sid)
            for c in names[1:]:
                out[c].append(row.get(c))
        return out

    def align_one(self, data: bytes | None, landmarks5: list[float] | None) -> dict[str, Any]:
        points = landmarks_array(landmarks5, 5)
        if points is None:
            raise ValueError("no landmarks5 (align needs detect upstream)")
        rgb = decode_rgb(data)
        fit = align_to_template(points)
        size, extra = self.params.size, self.params.extra_crop_size
        return {
            STATUS: STATUS_OK,
            KEEP: True,
            REASON: None,
            IMAGE: encode_png(warp(rgb, fit.for_size(size), size)),
            IMAGE_EXT: "png",
            "align_matrix": [float(v) for v in fit.matrix.ravel()],
            "align_residual": fit.residual,
            EXTRA_CROP: encode_png(warp(rgb, fit.for_size(extra), extra)) if extra else None,
        }
