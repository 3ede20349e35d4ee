"""EncodedImage: the pixels of an image passed between fused stages are decoded once, and only there."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from facekit import imaging
from facekit.imaging import EncodedImage, ImageError, PixelBudget, decode_rgb, encode_png, remembering


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
    kept = [isinstance(im, EncodedImage) and im._rgb is not None for im in images]
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
    assert remembering(early, budget) is early and early._rgb is None  # type: ignore[attr-defined]
