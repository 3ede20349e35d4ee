"""The one decode: EXIF orientation, every mode and bit depth, named rules for the rest; and
EncodedImage: the pixels of an image passed between fused stages are decoded once, and only there."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facekit import imaging
from facekit.imaging import (
    EncodedImage,
    ImageError,
    PixelBudget,
    decode,
    decode_rgb,
    encode_png,
    remembering,
)


def _png(side: int = 32, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return bytes(encode_png(rgb))  # plain bytes, as read from a tar


def test_an_encoded_image_is_decoded_once_and_gives_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = imaging._decode
    monkeypatch.setattr(imaging, "_decode", lambda *a: calls.append(1) or real(*a))
    data = _png()
    image = remembering(data, PixelBudget(1 << 20))
    first, second = decode_rgb(image), decode_rgb(image)
    assert second is first and len(calls) == 1
    assert np.array_equal(first, decode_rgb(data)) and len(calls) == 2  # plain bytes: decoded every time
    assert not first.flags.writeable, "a shared decode must not be changed in place by one stage"


def test_encode_png_hands_its_pixels_to_the_next_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (40, 24, 3), dtype=np.uint8)
    monkeypatch.setattr(imaging, "_decode", lambda *a: pytest.fail("decoded again"))
    out = decode_rgb(encode_png(rgb))
    assert np.array_equal(out, rgb)


def test_the_size_limits_hold_for_remembered_pixels_too() -> None:
    image = remembering(_png(32), None)
    decode_rgb(image)
    with pytest.raises(ImageError) as err:
        decode_rgb(image, min_side=64)
    assert err.value.rule == "image_too_small"


def test_a_shard_budget_bounds_what_its_images_keep() -> None:
    budget = PixelBudget(32 * 32 * 3 * 2)  # room for two decodes
    images = [remembering(_png(32, seed=i), budget) for i in range(4)]
    for im in images:
        decode_rgb(im)
    kept = [isinstance(im, EncodedImage) and im._decoded is not None for im in images]
    assert kept == [True, True, False, False]


def test_pickled_it_is_plain_bytes_without_its_pixels() -> None:
    image = remembering(_png(), None)
    decode_rgb(image)
    back = pickle.loads(pickle.dumps(image))
    assert type(back) is bytes and back == image
    assert len(pickle.dumps(image)) < len(image) + 200


def test_pixels_kept_before_a_shard_budget_existed_are_charged_to_it() -> None:
    early = remembering(_png(32), None)
    decode_rgb(early)  # kept under the per-image limit alone
    budget = PixelBudget(100)
    assert remembering(early, budget) is early and early._decoded is None  # type: ignore[attr-defined]


# ---------------------------------------------------------------- orientation, modes and bit depths

T = Image.Transpose
# EXIF orientation -> the transpose that stores an upright image so a viewer shows it upright again.
STORED_AS = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
             7: T.TRANSVERSE, 8: T.ROTATE_270}


def upright() -> np.ndarray:
    """Wider than tall, smooth (JPEG keeps it) and asymmetric: every flip and turn changes it."""
    y, x = np.mgrid[0:24, 0:40]
    rgb = np.stack([x * 6, y * 10, np.full_like(x, 90)], axis=2)
    rgb[2:8, 3:12] = (250, 250, 20)  # a block near the top-left corner
    return rgb.astype(np.uint8)


def save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def stored_with_orientation(rgb: np.ndarray, orientation: int, fmt: str, **params: Any) -> bytes:
    img = Image.fromarray(rgb)
    if orientation in STORED_AS:
        img = img.transpose(STORED_AS[orientation])
    if fmt == "TIFF":  # the tag lives in the TIFF's own directory
        return save(img, fmt, tiffinfo={0x0112: orientation}, **params)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, fmt, exif=exif, **params)


def png(values: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written from the spec (not by Pillow), so the test reads what a camera or tool stored:
    colour type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA; samples packed at ``bit_depth`` bits."""
    h, w = values.shape[:2]
    samples = values.reshape(h, -1).astype(np.uint16)
    if bit_depth == 16:
        rows = samples.astype(">u2").view(np.uint8).reshape(h, -1)
    elif bit_depth == 8:
        rows = samples.astype(np.uint8)
    else:
        rows = np.packbits(np.unpackbits(samples.astype(np.uint8)[..., None], axis=2)[..., -bit_depth:]
                           .reshape(h, -1), axis=1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def grey_levels(data: bytes) -> np.ndarray:
    rgb = decode_rgb(data)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[0, :, 0].astype(int)


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}),
                                             ("TIFF", {"compression": "tiff_lzw"})])
def test_every_exif_orientation_decodes_to_the_upright_pixels(fmt: str, params: dict[str, Any]) -> None:
    want = upright()
    for orientation in range(1, 9):
        d = decode(stored_with_orientation(want, orientation, fmt, **params))
        assert d.orientation == orientation
        assert np.array_equal(d.rgb, want), f"{fmt} orientation {orientation}"


def test_a_phone_jpeg_turned_by_its_exif_tag_matches_the_upright_photo_and_keeps_plain_ones_as_decoded() -> None:
    want = upright().astype(int)
    for orientation in range(1, 9):
        got = decode_rgb(stored_with_orientation(upright(), orientation, "JPEG", quality=98)).astype(int)
        assert got.shape == want.shape, orientation
        assert np.abs(got - want).mean() < 3, orientation
    plain = save(Image.fromarray(upright()), "JPEG", quality=98)
    assert decode(plain).orientation == 1 and decode(plain).as_stored


def test_a_corrupt_or_impossible_exif_orientation_keeps_the_image_as_stored_and_says_so() -> None:
    data = stored_with_orientation(upright(), 6, "JPEG", quality=98)
    at = data.index(b"Exif\0\0") + 6
    broken = data[:at + 8] + b"\xff" * 16 + data[at + 24:]  # the IFD's entries overwritten
    as_stored = decode_rgb(save(Image.fromarray(upright()).transpose(STORED_AS[6]), "JPEG", quality=98))
    d = decode(broken)
    assert d.orientation is None and np.abs(d.rgb.astype(int) - as_stored).mean() < 1
    for impossible in (0, 9):  # stored upright with a value no viewer turns by
        d = decode(stored_with_orientation(upright(), impossible, "PNG"))
        assert d.orientation is None and np.array_equal(d.rgb, upright())


def test_grey_of_every_bit_depth_decodes_to_its_8_bit_levels_not_white() -> None:
    for bits in (1, 2, 4, 8, 16):
        top = (1 << bits) - 1
        ramp = np.round(np.linspace(0, top, 32)).astype(np.uint16)
        want = np.round(ramp.astype(int) * 255 / top).astype(int)
        assert np.array_equal(grey_levels(png(np.tile(ramp, (16, 1)), bits, 0)), want), bits
    levels = np.arange(0, 256, 8)
    ramp16 = np.tile(levels * 257, (16, 1)).astype(np.uint16)
    assert np.array_equal(grey_levels(save(Image.fromarray(ramp16), "TIFF")), levels)  # I;16 TIFF
    pgm = b"P5\n32 16\n65535\n" + ramp16.astype(">u2").tobytes()
    assert np.array_equal(grey_levels(pgm), levels)
    int32 = Image.fromarray(np.tile(levels.astype(np.int32) << 23, (16, 1)))  # 32-bit signed TIFF
    assert np.abs(grey_levels(save(int32, "TIFF")) - levels).max() <= 1
    unit = Image.fromarray(np.tile((levels / 255).astype(np.float32), (16, 1)))  # float 0..1
    assert np.array_equal(grey_levels(save(unit, "TIFF")), levels)
    wide = Image.fromarray(np.tile(levels.astype(np.float32) * 4 - 100, (16, 1)))  # no stated range: min..max
    assert np.array_equal(grey_levels(save(wide, "TIFF")), np.round((levels - levels[0]) * 255 / levels[-1]))
    twelve = ramp16 >> 4  # 12-bit samples, packed two in three bytes, as a camera writes them
    packed = np.stack([twelve[:, ::2] >> 4, (twelve[:, ::2] & 15) << 4 | twelve[:, 1::2] >> 8,
                       twelve[:, 1::2] & 255], axis=2).astype(np.uint8).tobytes()
    tiff12 = _retag(bytearray(save(Image.fromarray(ramp16), "TIFF")), 12, packed)
    assert decode(tiff12).mode == "I;16"
    assert np.array_equal(grey_levels(tiff12), levels)


def _retag(tiff: bytearray, bits: int, samples: bytes | None = None) -> bytes:
    """The TIFF with a BitsPerSample tag of ``bits`` and, given, ``samples`` as its one strip."""
    ifd = struct.unpack("<I", tiff[4:8])[0]
    entries = {}
    for k in range(struct.unpack("<H", tiff[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * k
        entries[struct.unpack("<H", tiff[at:at + 2])[0]] = at + 8  # where the value sits
    tiff[entries[258]:entries[258] + 2] = struct.pack("<H", bits)
    if samples is not None:
        strip = struct.unpack("<I", tiff[entries[273]:entries[273] + 4])[0]
        tiff[entries[279]:entries[279] + 4] = struct.pack("<I", len(samples))
        tiff[strip:strip + len(samples)] = samples
    return bytes(tiff)


def test_colour_modes_and_16_bit_channels_decode_to_their_rgb() -> None:
    want = upright()
    deep = want.astype(np.uint16) * 257
    assert np.array_equal(decode_rgb(png(deep, 16, 2)), want)  # 16-bit RGB
    opaque = np.concatenate([deep, np.full((24, 40, 1), 65535, np.uint16)], axis=2)
    assert np.array_equal(decode_rgb(png(opaque, 16, 6)), want)  # 16-bit RGBA, opaque
    red = decode_rgb(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))  # Adobe, inverted
    assert np.abs(red.astype(int) - [255, 0, 0]).max() <= 2
    lab = decode_rgb(save(Image.new("LAB", (16, 16), (128, 128, 128)), "TIFF"))  # L 50: mid grey
    assert np.abs(lab.astype(int) - 119).max() <= 2
    ycc = decode_rgb(save(Image.fromarray(want).convert("YCbCr"), "TIFF"))
    assert np.abs(ycc.astype(int) - want).max() <= 3
    assert np.array_equal(decode_rgb(save(Image.fromarray(want).convert("1"), "PNG")), np.asarray(
        Image.fromarray(want).convert("1").convert("RGB")))


def test_transparency_is_composited_on_white_in_every_alpha_mode() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3], rgba[8:, :, 3] = 200, 0, 255  # top half transparent, bottom opaque red
    want = np.broadcast_to(np.where(np.arange(16)[:, None, None] < 8, [255, 255, 255], [200, 0, 0]), (16, 16, 3))
    assert np.array_equal(decode_rgb(save(Image.fromarray(rgba), "PNG")), want)
    alpha = np.broadcast_to(np.where(np.arange(16)[:, None] < 8, 0, 65535), (16, 16))
    la = png(np.stack([np.full((16, 16), 40 * 257), alpha], 2), 16, 4)
    grey = np.where(np.arange(16)[:, None, None] < 8, 255, 40)
    assert np.array_equal(decode_rgb(la), np.broadcast_to(grey, (16, 16, 3)))  # 16-bit grey+alpha
    half = rgba.copy()
    half[..., 3] = 128
    assert np.abs(decode_rgb(save(Image.fromarray(half), "PNG")).astype(int) - [227, 127, 127]).max() <= 1
    pal = Image.fromarray(rgba).convert("RGB").quantize(4)  # a palette with one index keyed transparent
    index = np.asarray(pal)
    keyed = save(pal, "PNG", transparency=int(index[0, 0]))
    assert np.array_equal(decode_rgb(keyed)[:8], np.full((8, 16, 3), 255))
    gif = save(pal, "GIF", transparency=int(index[0, 0]))
    assert np.array_equal(decode_rgb(gif)[:8], np.full((8, 16, 3), 255))


def test_multi_frame_files_give_their_first_frame() -> None:
    frames = [Image.fromarray(np.full((16, 16, 3), (40 * i, 200 - 40 * i, 90), np.uint8)) for i in range(3)]
    for fmt, params in (("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True})):
        data = save(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
        assert Image.open(io.BytesIO(data)).n_frames == 3, fmt
        assert np.abs(decode_rgb(data).astype(int) - [0, 200, 90]).max() <= 2, fmt


def test_a_layout_pillow_cannot_read_is_unsupported_mode_naming_it_not_a_crash() -> None:
    ramp = np.tile((np.arange(0, 256, 8) * 257).astype(np.uint16), (16, 1))
    odd = _retag(bytearray(save(Image.fromarray(ramp), "TIFF")), 24)  # 24-bit grey samples
    with pytest.raises(ImageError) as err:
        decode_rgb(odd)
    assert err.value.rule == "unsupported_mode" and err.value.detail.startswith("TIFF: ")
    for junk in (b"plain text, not a TIFF", b"xx"):
        with pytest.raises(ImageError) as text:
            decode_rgb(junk)
        assert text.value.rule == "not_an_image", text.value.detail
    cut = save(Image.fromarray(upright()), "PNG")[:30]  # its format's, but the header breaks off
    with pytest.raises(ImageError) as broken:
        decode_rgb(cut)
    assert broken.value.rule == "corrupt_image" and broken.value.detail.startswith("PNG: ")


def test_plain_rgb_is_the_decoded_array_itself_with_no_extra_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[np.ndarray] = []
    real = imaging._to_rgb
    monkeypatch.setattr(imaging, "_to_rgb", lambda img: made.append(real(img)) or made[-1])
    d = decode(save(Image.fromarray(upright()), "PNG"))
    assert d.as_stored and d.rgb is made[0]
