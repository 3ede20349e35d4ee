"""Image decoding and encoding shared by stages: one place that turns bad bytes into a reason.

Every image the project reads (every stage, the exports' training loader, report thumbnails, the
leakage gallery, the local VLM) is decoded by ``decode``, so all of them see the pixels a photo
viewer shows:

- **EXIF orientation** (all eight values, from EXIF or Pillow's XMP fallback) is applied, so boxes,
  landmarks and crops are in upright coordinates. A corrupt EXIF block does not lose the image: it is
  decoded as stored (what browsers do when they cannot read the tag) and ``Decoded.orientation`` is
  None, which ingest records, so the row says so rather than failing a probably good photo.
- **Any mode and bit depth** becomes RGB uint8. Alpha (RGBA, LA, PA, premultiplied RGBa, a tRNS
  colour key) is composited on white, the page a browser shows a cut-out on; dropping it would show
  whatever colour the transparent pixels happen to hold, often black. Integer grey (``I;16*``,
  ``I``) is scaled by its bit depth (the TIFF BitsPerSample tag when stated, else 16: Pillow reads
  16-bit PNG and PGM into 16 bits), never clipped to white. Float grey (``F``) is taken as 0..1, the
  convention of float TIFF writers; values outside 0..1 have no stated range and are stretched
  min..max. 16-bit-per-channel RGB(A) PNG/TIFF Pillow reads as 8-bit RGB(A) itself (the high byte).
  CMYK (Adobe's inverted JPEGs included: Pillow's JPEG reader un-inverts them), YCbCr, LAB and HSV
  are converted by Pillow. Multi-frame GIF/TIFF/WebP give their first frame.
- A format that recognises the bytes but has no reader for their layout (a TIFF bit depth Pillow
  lacks) and any mode without a defined RGB meaning are the row ``unsupported_mode``, naming it; a
  header its format recognises but refuses otherwise is ``corrupt_image`` (not ``not_an_image``).

Plain RGB with no orientation costs nothing extra: the pixels Pillow decoded are the result.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import overload

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs before decoding: 12000 x 12000 is 144 MP.
MAX_PIXELS = 64_000_000
MIN_SIDE = 16


class ImageError(ValueError):
    """A sample's bytes cannot be used as an image.

    ``rule`` is the stable rule name a stage records as its reason (``empty_file``, ``not_an_image``,
    ``corrupt_image``, ``image_too_small``, ``image_too_large``, ``unsupported_mode``) and ``detail``
    the specifics; the message (``str``) reads as both together.
    """

    def __init__(self, message: str, rule: str = "unreadable_image", detail: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.detail = detail if detail is not None else message


@dataclass(frozen=True)
class Decoded:
    """An image as a viewer shows it, and what it was stored as.

    ``mode`` is Pillow's name for the stored pixels (``RGB``, ``I;16``, ``CMYK``, ``RGBA``...);
    ``orientation`` the EXIF orientation applied (1: upright as stored), None when the EXIF block
    could not be read and the pixels are as stored.
    """

    rgb: np.ndarray
    mode: str = "RGB"
    orientation: int | None = 1

    @property
    def as_stored(self) -> bool:
        """Any decoder shows these bytes as ``rgb``: plain RGB, nothing to rotate or convert."""
        return self.mode == "RGB" and self.orientation == 1


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
    ``decode_rgb`` on it. The pixels are decoded once, on the first call, and kept on the object
    (as a ``Decoded``, with what they were stored as), so they live exactly as long as the batch that
    holds the bytes: no cache, nothing shared between shards. ``encode_png`` returns one already
    holding the pixels it encoded (PNG is lossless). Pickled (to another process) it is plain bytes:
    the pixels never travel. What it may keep is bounded by the ``PixelBudget`` it was made with (one
    per shard), else by ``KEEP_MAX_BYTES``.
    """

    _decoded: Decoded | None = None
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
    """Decode to an RGB uint8 array (read-only) as a viewer shows it, or raise ImageError with a rule
    and a short detail: ``decode(...).rgb``."""
    return decode(data, max_pixels, min_side).rgb


def decode(data: bytes | None, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
           draft: int | None = None) -> Decoded:
    """The one image decode (module docstring): upright RGB uint8 pixels, or ImageError.

    Only the header is parsed before the pixel limit is checked, so a decompression bomb (a few KB
    that would decode to gigabytes) costs nothing; PIL's own bomb guard (twice its global limit) is
    reported the same way. An ``EncodedImage`` is decoded once and its pixels kept on it. ``draft``
    (for thumbnails) lets a JPEG decode at a reduced scale that keeps both sides at least that many
    pixels; such pixels are never kept.
    """
    if not data:
        raise ImageError("empty file", "empty_file", "0 bytes")
    if isinstance(data, EncodedImage) and data._decoded is not None:
        h, w = data._decoded.rgb.shape[:2]
        _check_size(w, h, max_pixels, min_side)
        return data._decoded
    decoded = _decode(data, max_pixels, min_side, draft)
    if draft is None and isinstance(data, EncodedImage) and _may_keep(data, decoded.rgb.nbytes):
        data._decoded = decoded
    return decoded


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
            if data._decoded is not None and not budget.take(data._decoded.rgb.nbytes):
                data._decoded = None
        return data
    out = EncodedImage(data)
    out._budget = budget
    return out


def _decode(data: bytes, max_pixels: int, min_side: int, draft: int | None = None) -> Decoded:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Our own pixel limit below decides; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # a JPEG's EXIF is parsed here already
        with img:
            w, h = img.size
            _check_size(w, h, max_pixels, min_side)
            if draft is not None:
                img.draft("RGB", (draft, draft))
            orientation = _orientation(img, _exif_trouble(caught))
            img.load()
            # Pillow's TIFF reader turns the pixels itself while loading, and then drops the tag.
            turned = orientation not in (None, 1) and _ORIENTATION_TAG not in img.getexif()
            mode = img.mode
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        refused = _refused_header(data)
        if refused is not None:
            layout = any(word in refused.lower() for word in ("mode", "unsupported", "bit"))
            rule = "unsupported_mode" if layout else "corrupt_image"
            raise ImageError(f"{rule.replace('_', ' ')}: {refused}", rule, refused) from exc
        raise ImageError("not an image", "not_an_image", f"{len(data)} bytes in no image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}", "image_too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt image: {exc}", "corrupt_image", str(exc)) from exc
    turn = None if turned else _UPRIGHT.get(orientation or 1)
    if turn is not None:
        rgb = np.ascontiguousarray(turn(rgb))
    rgb.setflags(write=False)
    return Decoded(rgb, mode, orientation)


# What Pillow's parsers raise on a broken block (EXIF metadata must never lose the pixels; a refused
# header only names the layout).
_PARSE_ERRORS = (SyntaxError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError, TypeError)


def _refused_header(data: bytes) -> str | None:
    """``"TIFF: unknown pixel mode"`` when a format recognises the bytes as its own but its reader
    refuses the header, else None. Pillow's open reports that and "no format at all" alike; the row
    should say which format and why: a layout it has no reader for (a bit depth or sample layout,
    ``unsupported_mode``) or a broken header (``corrupt_image``)."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or not accept(prefix):
                continue
        except _PARSE_ERRORS:  # too few bytes to tell: not this format's
            continue
        try:
            factory(io.BytesIO(data), "").close()
        except _PARSE_ERRORS as exc:
            return f"{fmt}: {exc}"
    return None


_ORIENTATION_TAG = 0x0112
# EXIF orientation -> what turns the stored pixels upright (the transposes of PIL's exif_transpose).
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _exif_trouble(caught: list[warnings.WarningMessage]) -> bool:
    """Whether Pillow warned that it gave up on an EXIF block ("Corrupt EXIF data..."); any other
    warning is passed on as it was."""
    trouble = False
    for w in caught:
        if "exif" in str(w.message).lower():
            trouble = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return trouble


def _orientation(img: Image.Image, exif_trouble: bool) -> int | None:
    """The EXIF orientation (1..8; 1 when the image has none), None when the block cannot be read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = img.getexif().get(_ORIENTATION_TAG)
        except _PARSE_ERRORS:
            return None
    if value is None:
        return None if exif_trouble or _exif_trouble(caught) else 1
    return value if isinstance(value, int) and 1 <= value <= 8 else None


_VIA_PILLOW = frozenset({"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa"})  # Pillow converts these to RGBA
_INT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I;32L", "I;32S"})


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    keyed = "transparency" in img.info and mode in {"1", "L", "P", "RGB"}
    if mode == "RGB" and not keyed:
        return np.asarray(img)
    if mode in _ALPHA or keyed:
        return _over_white(np.asarray(img.convert("RGBA")))
    if mode == "La":  # grey with premultiplied alpha (TIFF ExtraSamples 1): over white is L + (255 - a)
        la = np.asarray(img).astype(np.uint16)
        return _grey_u8(np.minimum(la[..., 0] + 255 - la[..., 1], 255).astype(np.uint8))
    if mode in _VIA_PILLOW:
        return np.asarray(img.convert("RGB"))
    if mode in _INT:
        return _grey(_scale_int(img, np.asarray(img)))
    if mode == "F":
        return _grey(_scale_float(np.asarray(img, dtype=np.float32)))
    raise ImageError(f"unsupported pixel mode {mode}", "unsupported_mode", f"mode {mode} has no RGB conversion")


def _over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _scale_int(img: Image.Image, values: np.ndarray) -> np.ndarray:
    """0..1 by the stored bit depth: the TIFF BitsPerSample and SampleFormat tags when stated, else
    16 bits for 16-bit modes and the formats Pillow reads into 16 bits (PGM/PPM), else 32."""
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    signed = tags is not None and tags.get(339) in (2, (2,))
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        wide = values.dtype.itemsize > 2 and values.size and (values.min() < 0 or values.max() > 0xFFFF)
        bits, signed = (32, values.dtype.kind == "i") if wide else (16, False)
    top = float((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1)
    return values.astype(np.float64) / top


def _scale_float(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if finite.any():
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if (lo < 0.0 or hi > 1.0) and hi > lo:
            return (values - lo) / (hi - lo)
    return values


def _grey(unit: np.ndarray) -> np.ndarray:
    return _grey_u8(np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8))


def _grey_u8(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless and deterministic: the same pixels always give the same bytes. The result remembers
    the pixels (``EncodedImage``), so the next stage of a fused chain does not decode them again."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    out = EncodedImage(buf.getvalue())
    if rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.nbytes <= KEEP_MAX_BYTES:
        kept = np.array(rgb, copy=True)
        kept.setflags(write=False)
        out._decoded = Decoded(kept)
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
