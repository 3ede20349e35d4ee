"""Image decoding and encoding shared by stages: one place that turns bad bytes into a reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs before decoding: 12000 x 12000 is 144 MP.
MAX_PIXELS = 64_000_000
MIN_SIDE = 16


class ImageError(ValueError):
    """A sample's bytes cannot be used as an image. ``rule`` is the stable name its error row gets
    (``empty_file``, ``image_too_large``, ...); the message is the row's detail."""

    def __init__(self, message: str, rule: str = "unreadable_image") -> None:
        super().__init__(message)
        self.rule = rule


def decode_rgb(data: bytes | None, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode to an RGB uint8 array, or raise ImageError with a short reason."""
    if not data:
        raise ImageError("empty file", "empty_file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{w}x{h} > {max_pixels} pixels", "image_too_large")
            if min(w, h) < min_side:
                raise ImageError(f"{w}x{h} < {min_side} px", "image_too_small")
            img.load()
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image", "not_an_image") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt image: {exc}", "corrupt_image") from exc


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless and deterministic: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_images(data: list[bytes | None]) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode every sample; a bad one gets None and its reason instead of failing the batch."""
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for item in data:
        try:
            images.append(decode_rgb(item))
            errors.append(None)
        except ImageError as exc:
            images.append(None)
            errors.append(str(exc))
    return images, errors
