"""Per-sample fingerprints that dedup compares: byte hash, pixel hash, perceptual hashes, a thumbnail, size.

Two hashes because a dataset holds the same picture in two ways: the same file copied (same bytes)
and the same pixels encoded twice (a PNG re-saved at another compression level, a lossless WebP of
a PNG) -- both are exact duplicates. The pixel hash covers the decoded RGB array and its shape, the
form every later stage sees. pHash (imagehash's DCT hash, 64 bits, stored as 16 hex digits) finds
candidates that are no longer bit-identical: JPEG re-encodes and resizes sit within a few bits, and
the pHash of the mirrored image finds horizontal flips. Width, height and whether the encoding is
lossless let dedup keep the best copy of a group.

A 64-bit pHash cannot say "the same picture" on its own: faces share their low frequencies, and two
different renders of one identity can lie 2 bits apart, while a 5% crop of one picture moves its pHash
by up to 22 bits. The thumbnail (32 x 32 RGB, 3072 bytes) is the picture evidence that decides:
``picture_similarity`` registers one thumbnail against crops of the other (up to 10% off each axis, at
either edge or centred) and against its mirror image, and returns the best correlation. Measured on
procedural renders (96 renders of 12 identities) and photos (the six faces of insightface's t1.jpg,
skimage's astronaut, insightface's Tom Hanks): JPEG q50 re-encodes >= 0.997, 0.5x resizes >= 0.999,
flips 1.0, 5% crops (centred or at a corner) >= 0.976; distinct renders of one identity <= 0.95 (the
backgrounds, lighting and expression differ in colour and shape), and <= 0.963 over the 633 pairs of
the quickstart's 512 renders closest in SFace space; distinct photos <= 0.6.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import cv2
import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image
from threadpoolctl import threadpool_limits

from facekit.imaging import ImageError, decode_rgb
from stages.base import IMAGE, Batch, EmptyParams, Resources, Stage, StageKind

CONTENT_SHA256 = "content_sha256"
PIXEL_SHA256 = "pixel_sha256"
PHASH = "phash"
PHASH_MIRROR = "phash_mirror"  # pHash of the horizontally mirrored image: flips meet at a small distance
THUMBNAIL = "thumbnail"  # THUMB_SIDE x THUMB_SIDE RGB uint8, row-major: the picture evidence of dedup
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


THUMB_SIDE = 32
# Crops the registration tries: the kept fraction of each axis (1 down to 0.90 in steps of 0.02) at the
# start, centre and end of the axis. 5% crops land within 1% of a tried window; a 32-pixel thumbnail
# blurs the rest away.
_KEPT = (1.0, 0.98, 0.96, 0.94, 0.92, 0.90)


def thumbnail(rgb: np.ndarray) -> bytes:
    """The whole picture as THUMB_SIDE x THUMB_SIDE RGB (area-averaged, aspect ratio not kept)."""
    small = cv2.resize(np.ascontiguousarray(rgb), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small, dtype=np.uint8).tobytes()


def _axis_windows() -> list[np.ndarray]:
    """Source coordinates (pixel centres) of each tried window along one axis."""
    out = []
    u = np.arange(THUMB_SIDE, dtype=np.float64) + 0.5
    for kept in _KEPT:
        for start in sorted({0.0, (1 - kept) / 2, 1 - kept}):
            out.append((start + kept * u / THUMB_SIDE) * THUMB_SIDE - 0.5)
    return out


def _interp(coords: np.ndarray) -> np.ndarray:
    """(THUMB_SIDE, THUMB_SIDE) linear-interpolation matrix sampling one axis at ``coords`` (edges clamped)."""
    c = np.clip(coords, 0, THUMB_SIDE - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, THUMB_SIDE - 1)
    w = c - lo
    m = np.zeros((THUMB_SIDE, THUMB_SIDE), dtype=np.float64)
    m[np.arange(THUMB_SIDE), lo] += 1 - w
    m[np.arange(THUMB_SIDE), hi] += w
    return m


_WINDOWS = [_interp(c) for c in _axis_windows()]
_STACKED = np.concatenate(_WINDOWS).astype(np.float32)  # (windows * side, side)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length: their dot product is the correlation of two pictures."""
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _crops(t: np.ndarray) -> np.ndarray:
    """Every tried crop of one thumbnail, resampled to full size, as unit rows (windows, 3 * side^2)."""
    side, k = THUMB_SIDE, len(_WINDOWS)
    # Separable: rows resampled by every y window, then columns by every x window -- two matrix products.
    full = np.stack([_STACKED @ t[:, :, c] @ _STACKED.T for c in range(3)], axis=-1)  # (k*side, k*side, 3)
    full = full.reshape(k, side, k, side, 3).transpose(0, 2, 1, 3, 4)  # (wy, wx, y, x, c)
    return _unit(full.reshape(k * k, side * side * 3))


def picture_similarity(a: bytes, b: bytes, enough: float = 2.0) -> float:
    """How much two thumbnails show the same picture: the best correlation of one with a crop of the
    other, either way round, mirrored or not. 1.0 for the same pixels; see the module docstring for
    what re-encodes, resizes, crops, flips and different pictures score. Stops at the first value at or
    above ``enough`` (a caller that only compares with a threshold skips the crop search for re-encodes,
    resizes and flips)."""
    side = THUMB_SIDE
    ta = np.frombuffer(a, dtype=np.uint8).reshape(side, side, 3).astype(np.float32)
    tb = np.frombuffer(b, dtype=np.uint8).reshape(side, side, 3).astype(np.float32)
    whole = [_unit(t.reshape(-1)) for t in (ta, tb, tb[:, ::-1])]
    best = max(float(whole[0] @ whole[1]), float(whole[0] @ whole[2]))
    # Small matrix products: one BLAS thread is faster than many contending ones.
    with threadpool_limits(1):
        for x, y in ((ta, tb), (tb, ta)):
            if best >= enough:
                break
            crops = _crops(x)
            best = max(best, float((crops @ _unit(y.reshape(-1))).max()),
                       float((crops @ _unit(np.ascontiguousarray(y[:, ::-1]).reshape(-1))).max()))
    return best


class FingerprintStage(Stage[EmptyParams]):
    """Adds content, pixel and perceptual hashes; an undecodable image becomes an error row."""

    name: ClassVar[str] = "fingerprint"
    version: ClassVar[str] = "3"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field(CONTENT_SHA256, pa.string()),
        pa.field(PIXEL_SHA256, pa.string()),
        pa.field(PHASH, pa.string()),
        pa.field(PHASH_MIRROR, pa.string()),
        pa.field(THUMBNAIL, pa.binary()),
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
            rows.set(i, **{PIXEL_SHA256: pixel_sha256(rgb), PHASH: phash_hex(rgb),
                           PHASH_MIRROR: phash_hex(np.ascontiguousarray(rgb[:, ::-1])), THUMBNAIL: thumbnail(rgb),
                           WIDTH: w, HEIGHT: h, IMAGE_FORMAT: sniff_format(data)})
        return rows.batch()
