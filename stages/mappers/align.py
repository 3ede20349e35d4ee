"""align: the 5 landmarks onto the ArcFace 112x112 template by a similarity; writes the crop as pixels.

The crop is what face-recognition training and the embedders consume. An optional larger crop with
the same framing (the 112 transform scaled, e.g. 256) is kept for enhancement / super-resolution
data, as a pixel member of the stage's shard tar (``<key>.crop_extra.png``: the manifest holds where
it lies, not its pixels). Crops are PNG, so their bytes depend only on the pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from facekit.geometry import ARCFACE_SIZE, align_to_template, landmarks_array, warp
from facekit.imaging import decode_rgb, encode_png
from stages.base import IMAGE, IMAGE_EXT, SAMPLE_ID, Batch, Params, Resources, RowError, Rows, Stage, member_field

EXTRA_CROP = "crop_extra"


class AlignParams(Params):
    size: int = Field(ARCFACE_SIZE, ge=32, le=1024, description="side of the crop; 112 is ArcFace's")
    extra_crop_size: int | None = Field(None, ge=32, le=2048,
                                        description="also store a crop of this side, same framing")


class AlignStage(Stage[AlignParams]):
    """Warps the face onto the ArcFace 112x112 template from its 5 landmarks and writes the crop as pixels."""

    name: ClassVar[str] = "align"
    version: ClassVar[str] = "3"
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    batch_size: ClassVar[int] = 64
    writes_pixels: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("landmarks5",)
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("align_matrix", pa.list_(pa.float32(), 6)),  # 2x3 row-major: input image -> 112 template
        pa.field("align_residual", pa.float32()),  # RMS px (at 112) of the 5 points after the fit
        member_field(EXTRA_CROP, "png"),  # the extra crop, null unless extra_crop_size
    )

    def process(self, batch: Batch) -> Batch:
        rows = Rows(batch[SAMPLE_ID], [IMAGE, IMAGE_EXT, *(f.name for f in self.columns)])
        marks = batch.get("landmarks5") or [None] * len(rows)
        for i in range(len(rows)):
            try:
                rows.set(i, **self.align_one(batch[IMAGE][i], marks[i]))
            except RowError as exc:
                rows.fail(i, exc.rule, exc.detail)
            except ValueError as exc:  # ImageError, malformed landmarks
                rows.fail(i, getattr(exc, "rule", "bad_landmarks"), getattr(exc, "detail", exc))
        return rows.batch()

    def align_one(self, data: bytes | None, landmarks5: list[float] | None) -> dict[str, Any]:
        points = landmarks_array(landmarks5, 5)
        if points is None:
            raise RowError("no_landmarks", "no landmarks5 (align needs detect upstream)")
        rgb = decode_rgb(data)
        fit = align_to_template(points)
        size, extra = self.params.size, self.params.extra_crop_size
        return {
            IMAGE: encode_png(warp(rgb, fit.for_size(size), size)),
            IMAGE_EXT: "png",
            "align_matrix": [float(v) for v in fit.matrix.ravel()],
            "align_residual": fit.residual,
            EXTRA_CROP: encode_png(warp(rgb, fit.for_size(extra), extra)) if extra else None,
        }
