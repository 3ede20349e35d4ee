"""Per-sample fingerprints that dedup compares: byte hash, pixel hash, perceptual hash, size.

Two hashes because a dataset holds the same picture in two ways: the same file copied (same bytes)
and the same pixels encoded twice (a PNG re-saved at another compression level, a lossless WebP of
a PNG) -- both are exact duplicates. The pixel hash covers the decoded RGB array and its shape, the
form every later stage sees. pHash (imagehash's DCT hash, 64 bits, stored as 16 hex digits) catches
what is no longer bit-identical: JPEG re-encodes, resizes, small crops. Width, height and whether the
encoding is lossless let dedup keep the best copy of a group.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from facekit.imaging import ImageError, decode_rgb
from stages.base import IMAGE, Batch, EmptyParams, Resources, Stage, StageKind

CONTENT_SHA256 = "content_sha256"
PIXEL_SHA256 = "pixel_sha256"
PHASH = "phash"
WIDTH = "width"
HEIGHT = "height"
IMAGE_FORMAT = "image_format"
LOSSLESS_FORMATS = frozenset({"png", "bmp", "webp-lossless"})


def sniff_format(data: bytes) -> str | None:
    """The encoding the bytes really are, from their magic numbers (the file name may lie)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp-lossless" if data[12:16] == b"VP8L" else "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "avif"
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "jp2"
    return None


def pixel_sha256(rgb: np.ndarray) -> str:
    """Hash of decoded pixels: equal for any lossless encoding of the same RGB array."""
    h = hashlib.sha256(f"{rgb.shape}|{rgb.dtype}|".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def phash_hex(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash as 16 hex digits (imagehash's own string form)."""
    return str(imagehash.phash(Image.fromarray(rgb), hash_size=8))


def phash_to_int(value: str) -> int:
    return int(value, 16)


class FingerprintStage(Stage[EmptyParams]):
    """Adds content, pixel and perceptual hashes; an undecodable image becomes an error row."""

    name: ClassVar[str] = "fingerprint"
    version: ClassVar[str] = "2"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field(CONTENT_SHA256, pa.string()),
        pa.field(PIXEL_SHA256, pa.string()),
        pa.field(PHASH, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(IMAGE_FORMAT, pa.string()),
    )

    def process(self, batch: Batch) -> Batch:
        rows = self.rows(batch)
        for i, data in enumerate(batch[IMAGE]):
            rows.set(i, **{CONTENT_SHA256: hashlib.sha256(data).hexdigest() if data else None})
            try:
                rgb = decode_rgb(data)
            except ImageError as exc:
                rows.fail(i, exc.rule, exc.detail)
                continue
            h, w = rgb.shape[:2]
            rows.set(i, **{PIXEL_SHA256: pixel_sha256(rgb), PHASH: phash_hex(rgb), WIDTH: w, HEIGHT: h,
                           IMAGE_FORMAT: sniff_format(data)})
        return rows.batch()
