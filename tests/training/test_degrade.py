"""The degradation stage: seeded per sample, every draw recorded, bad input becomes an error row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from facekit.imaging import decode_rgb, encode_png
from facekit.renderer.render import render_sample
from manifests.schema import member_ext
from stages.base import IMAGE, SAMPLE_ID, StageContext
from stages.mappers.degrade import DegradeParams, DegradeStage, psnr_uint8

PARAMS = DegradeParams(
    blur_sigma=(0.5, 2.0), downsample=(1.5, 3.0), noise_sigma=(2.0, 10.0), jpeg_quality=(40, 80)
)


def _batch(n: int = 4) -> dict[str, list]:
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        rgb, _ = render_sample(rng.standard_normal(512).astype(np.float32), None, seed=i, size=112)
        images.append(encode_png(rgb))
    return {SAMPLE_ID: [f"s{i}" for i in range(n)], IMAGE: images}


def _stage(seed: int = 7) -> DegradeStage:
    return DegradeStage(PARAMS, StageContext(run_dir="/tmp/unused", stage_id="degrade", seed=seed))


def test_degraded_pairs_are_reproducible_and_every_draw_is_recorded_in_range() -> None:
    batch = _batch()
    first, second = _stage().process(batch), _stage().process(batch)
    assert first == second  # same run seed and sample ids -> same bytes and draws
    # The degraded image is a pixel member (bytes here, a tar member once committed); the rest fit the schema.
    fields = _stage().output_fields()
    assert [f.name for f in fields if member_ext(f)] == ["degraded"]
    schema = pa.schema([f for f in fields if not member_ext(f)])
    table = pa.Table.from_pydict({f.name: first[f.name] for f in schema}, schema=schema)
    assert table.num_rows == 4 and table.column("degrade_psnr").null_count == 0
    for name, (low, high) in [
        ("blur_sigma", PARAMS.blur_sigma),
        ("downsample", PARAMS.downsample),
        ("noise_sigma", PARAMS.noise_sigma),
        ("jpeg_quality", PARAMS.jpeg_quality),
    ]:
        values = first[f"degrade_{name}"]
        assert all(low <= v <= high for v in values) and len(set(values)) == 4  # drawn per sample
    assert first["status"] == ["ok"] * 4 and first["keep"] == [True] * 4


def test_degraded_image_keeps_the_size_and_loses_quality_while_the_clean_image_passes_through() -> None:
    batch = _batch(2)
    out = _stage().process(batch)
    assert out[IMAGE] == batch[IMAGE]  # the clean bytes are the stage's pixels, never re-encoded
    for clean_bytes, degraded_bytes, recorded in zip(
        batch[IMAGE], out["degraded"], out["degrade_psnr"], strict=True
    ):
        clean, degraded = decode_rgb(clean_bytes), decode_rgb(degraded_bytes)
        assert degraded.shape == clean.shape
        assert 15.0 < psnr_uint8(degraded, clean) < 40.0
        assert psnr_uint8(degraded, clean) == pytest.approx(recorded, abs=1e-3)


def test_another_run_seed_draws_other_degradations() -> None:
    batch = _batch(2)
    assert _stage(1).process(batch)["degrade_blur_sigma"] != _stage(2).process(batch)["degrade_blur_sigma"]


def test_a_corrupt_image_gets_an_error_row_and_the_batch_goes_on() -> None:
    batch = _batch(2)
    batch[SAMPLE_ID].append("broken")
    batch[IMAGE].append(b"\x89PNG not really")
    out = _stage().process(batch)
    assert out["status"] == ["ok", "ok", "error"]
    assert out["keep"][2] is False and out["reason"][2] == "not_an_image" and out["detail"][2]
    assert out["degraded"][2] is None and out["degraded"][0] is not None


def test_params_reject_an_inverted_range() -> None:
    with pytest.raises(ValidationError, match="jpeg_quality"):
        DegradeParams(jpeg_quality=(90, 40))
