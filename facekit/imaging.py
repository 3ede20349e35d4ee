"""Image decoding and encoding shared by stages: one place that turns bad bytes into a reason."""

from __future__ import annotations

import io
import warnings
from typing import overload

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


KEEP_MAX_BYTES = 4 << 20  # an image whose pixels outgrow this is decoded again rather than kept


class PixelBudget:
    """How many bytes of decoded pixels the images of one shard may keep between stages."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def take(self, nbytes: int) -> bool:
        if nbytes > min(self.left, KEEP_MAX_BYTES):
            return False
        self.left -= nbytes
        return True


def _may_keep(image: EncodedImage, nbytes: int) -> bool:
    return image._budget.take(nbytes) if image._budget is not None else nbytes <= KEEP_MAX_BYTES


class EncodedImage(bytes):
    """Encoded image bytes that remember their decoded pixels.

    Why: in a fused chain the same image object passes from stage to stage in memory (detect, then
    align, then quality on the same picture; align's crop straight into embed), and each stage calls
    ``decode_rgb`` on it. The pixels are decoded once, on the first call, and kept on the object, so
    they live exactly as long as the batch that holds the bytes: no cache, nothing shared between
    shards. ``encode_png`` returns one already holding the pixels it encoded (PNG is lossless).
    Pickled (to another process) it is plain bytes: the pixels never travel. What it may keep is
    bounded by the ``PixelBudget`` it was made with (one per shard), else by ``KEEP_MAX_BYTES``.
    """

    _rgb: np.ndarray | None = None
    _budget: PixelBudget | None = None

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return (bytes, (bytes(self),))


def _check_size(w: int, h: int, max_pixels: int, min_side: int) -> None:
    if w * h > max_pixels:
        detail = f"{w}x{h} > {max_pixels} pixels"
        raise ImageError(f"image too large: {detail}", "image_too_large", detail)
    if min(w, h) < min_side:
        detail = f"{w}x{h} < {min_side} px"
        raise ImageError(f"image too small: {detail}", "image_too_small", detail)


def decode_rgb(data: bytes | None, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode to an RGB uint8 array (read-only), or raise ImageError with a rule and a short detail.

    Only the header is parsed before the pixel limit is checked, so a decompression bomb (a few KB
    that would decode to gigabytes) costs nothing; PIL's own bomb guard (twice its global limit) is
    reported the same way. An ``EncodedImage`` is decoded once and its pixels kept on it.
    """
    if not data:
        raise ImageError("empty file", "empty_file", "0 bytes")
    if isinstance(data, EncodedImage) and data._rgb is not None:
        h, w = data._rgb.shape[:2]
        _check_size(w, h, max_pixels, min_side)
        return data._rgb
    rgb = _decode(data, max_pixels, min_side)
    if isinstance(data, EncodedImage) and _may_keep(data, rgb.nbytes):
        data._rgb = rgb
    return rgb


@overload
def remembering(data: bytes | memoryview, budget: PixelBudget | None = None) -> bytes: ...
@overload
def remembering(data: None, budget: PixelBudget | None = None) -> None: ...
def remembering(data: bytes | memoryview | None, budget: PixelBudget | None = None) -> bytes | None:
    """The same bytes as an ``EncodedImage`` drawing on ``budget`` (one copy, made when a shard's
    images are loaded; an ``EncodedImage`` already is one)."""
    if data is None:
        return None
    if isinstance(data, EncodedImage):
        if budget is not None and data._budget is None:  # pixels kept so far now count against the shard
            data._budget = budget
            if data._rgb is not None and not budget.take(data._rgb.nbytes):
                data._rgb = None
        return data
    out = EncodedImage(data)
    out._budget = budget
    return out


def _decode(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            _check_size(w, h, max_pixels, min_side)
            img.load()
            rgb = np.asarray(img.convert("RGB"))
            rgb.setflags(write=False)
            return rgb
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image", "not_an_image", f"{len(data)} bytes in no image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}", "image_too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt image: {exc}", "corrupt_image", str(exc)) from exc


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless and deterministic: the same pixels always give the same bytes. The result remembers
    the pixels (``EncodedImage``), so the next stage of a fused chain does not decode them again."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    out = EncodedImage(buf.getvalue())
    if rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.nbytes <= KEEP_MAX_BYTES:
        kept = np.array(rgb, copy=True)
        kept.setflags(write=False)
        out._rgb = kept
    return out


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
