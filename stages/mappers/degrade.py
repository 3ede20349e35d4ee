"""Degradation stage: (degraded, clean) pairs for face restoration, with the GFPGAN/CodeFormer model.

    degraded = upsample( JPEG_q( downsample_r( clean * Gaussian(sigma) ) + N(0, noise^2) ) )

Each of sigma, r, noise and q is drawn uniformly from its configured range with the sample's own
seed (``sample_seed(run_seed, sample_id, "degrade")``), and every drawn value is a manifest column,
so a pair can be regenerated exactly and a training set can be sliced by degradation strength.

Output. The clean crop is the training target and what later stages (embedding, filters) must keep
seeing, so the stage passes ``image`` through byte for byte (never re-encoded) as its pixel output,
and writes the degraded pixels, as lossless PNG at the clean image's size, as a pixel member of its
shard tar (``<key>.degraded.png``; the manifest column ``degraded`` holds where it lies, never the
pixels) beside the drawn values. ``writes_pixels`` is set because the stage makes new pixel
data. For training, the export writes ``degraded`` beside the clean image as ``<key>.degraded.png``
under the same key, which is what ``training.enhancement`` reads.

GFPGAN's ranges (sigma 0.1-10, r 0.8-8, noise 0-20, q 60-100) are for 512 px faces; the defaults
here scale blur and downsampling to 112 px aligned crops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from facekit.imaging import ImageError, decode_rgb, encode_jpeg, encode_png
from stages.base import (
    IMAGE,
    IMAGE_EXT,
    SAMPLE_ID,
    Batch,
    Params,
    Resources,
    Rows,
    Stage,
    StageKind,
    member_field,
    sample_seed,
)

DEGRADED = "degraded"


class DegradeParams(Params):
    """Ranges ``[low, high]`` each drawn uniformly per sample."""

    blur_sigma: tuple[float, float] = Field((0.1, 2.5), description="Gaussian blur sigma range, px")
    downsample: tuple[float, float] = Field(
        (1.0, 4.0), description="downsampling factor range (the image is scaled down and back up)")
    noise_sigma: tuple[float, float] = Field((0.0, 15.0), description="Gaussian noise sigma range, on the 0-255 scale")
    jpeg_quality: tuple[int, int] = Field((40, 95), description="JPEG quality range")

    @model_validator(mode="after")
    def _check_ranges(self) -> DegradeParams:
        checks = {
            "blur_sigma": (self.blur_sigma, 0.0, 50.0),
            "downsample": (self.downsample, 0.5, 16.0),
            "noise_sigma": (self.noise_sigma, 0.0, 255.0),
            "jpeg_quality": (self.jpeg_quality, 1, 100),
        }
        for name, ((low, high), floor, ceil) in checks.items():
            if not floor <= low <= high <= ceil:
                raise ValueError(f"{name}: expected {floor} <= low <= high <= {ceil} (got [{low}, {high}])")
        return self


@dataclass(frozen=True)
class DegradationDraw:
    """The values drawn for one sample (one manifest row)."""

    blur_sigma: float
    downsample: float
    noise_sigma: float
    jpeg_quality: int
    noise_seed: int


def draw_degradation(params: DegradeParams, rng: np.random.Generator) -> DegradationDraw:
    return DegradationDraw(
        blur_sigma=float(rng.uniform(*params.blur_sigma)),
        downsample=float(rng.uniform(*params.downsample)),
        noise_sigma=float(rng.uniform(*params.noise_sigma)),
        jpeg_quality=int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1)),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def degrade_rgb(clean: np.ndarray, draw: DegradationDraw) -> np.ndarray:
    """Apply one drawn degradation to an RGB uint8 image; returns RGB uint8 of the same size."""
    h, w = clean.shape[:2]
    img: np.ndarray = clean.astype(np.float32)
    if draw.blur_sigma > 0:
        radius = min(20, max(1, int(np.ceil(3 * draw.blur_sigma))))  # GFPGAN: 41-tap kernel at most
        img = cv2.GaussianBlur(
            img, (2 * radius + 1, 2 * radius + 1), draw.blur_sigma, borderType=cv2.BORDER_REFLECT_101
        )
    small = (max(1, round(w / draw.downsample)), max(1, round(h / draw.downsample)))
    img = cv2.resize(img, small, interpolation=cv2.INTER_LINEAR)
    if draw.noise_sigma > 0:
        img = img + np.random.default_rng(draw.noise_seed).normal(0.0, draw.noise_sigma, img.shape)
    low = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    low = decode_rgb(encode_jpeg(low, quality=draw.jpeg_quality), min_side=1)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


class DegradeStage(Stage[DegradeParams]):
    """Writes a degraded copy of each image (blur, downsampling, noise, JPEG) for (degraded, clean) pairs."""

    name: ClassVar[str] = "degrade"
    version: ClassVar[str] = "3"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    writes_pixels: ClassVar[bool] = True
    columns: ClassVar[tuple[pa.Field, ...]] = (
        member_field(DEGRADED, "png"),
        pa.field("degrade_blur_sigma", pa.float32()),
        pa.field("degrade_downsample", pa.float32()),
        pa.field("degrade_noise_sigma", pa.float32()),
        pa.field("degrade_jpeg_quality", pa.int32()),
        pa.field("degrade_noise_seed", pa.int64()),
        pa.field("degrade_psnr", pa.float32()),  # degraded vs clean: how hard this pair is
    )

    def process(self, batch: Batch) -> Batch:
        rows = Rows(batch[SAMPLE_ID], [IMAGE, IMAGE_EXT, *(f.name for f in self.columns)])
        exts = batch.get(IMAGE_EXT) or [None] * len(rows)
        for i, (sample_id, data) in enumerate(zip(batch[SAMPLE_ID], batch[IMAGE], strict=True)):
            try:
                clean = decode_rgb(data)
            except ImageError as exc:
                rows.fail(i, exc.rule, exc.detail)
                continue
            rng = np.random.default_rng(sample_seed(self.context.seed, sample_id, "degrade"))
            draw = draw_degradation(self.params, rng)
            degraded = degrade_rgb(clean, draw)
            rows.set(i, **{IMAGE: data, IMAGE_EXT: exts[i] or "png", DEGRADED: encode_png(degraded),
                           "degrade_psnr": min(psnr_uint8(degraded, clean), 100.0)})
            rows.set(i, **{f"degrade_{name}": value for name, value in asdict(draw).items()})
        return rows.batch()
