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
    """A sample's bytes cannot be used as an image.

    ``rule`` is the stable rule name a stage records as its reason (``empty_file``, ``not_an_image``,
    ``corrupt_image``, ``image_too_small``, ``image_too_large``) and ``detail`` the specifics; the
    message (``str``) reads as both together.
    """

    def __init__(self, message: str, rule: str = "unreadable_image", detail: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.detail = detail if detail is not None else message


def decode_rgb(data: bytes | None, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode to an RGB uint8 array, or raise ImageError with a rule and a short detail.

    Only the header is parsed before the pixel limit is checked, so a decompression bomb (a few KB
    that would decode to gigabytes) costs nothing; PIL's own bomb guard (twice its global limit) is
    reported the same way.
    """
    if not data:
        raise ImageError("empty file", "empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > max_pixels:
                detail = f"{w}x{h} > {max_pixels} pixels"
                raise ImageError(f"image too large: {detail}", "image_too_large", detail)
            if min(w, h) < min_side:
                detail = f"{w}x{h} < {min_side} px"
                raise ImageError(f"image too small: {detail}", "image_too_small", detail)
            img.load()
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image", "not_an_image", f"{len(data)} bytes in no image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}", "image_too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt image: {exc}", "corrupt_image", str(exc)) from exc


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
