"""The stage contract: params named once as the generic argument, one row builder, rule + detail reasons."""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pytest

from facekit.imaging import encode_png
from stages.base import (
    IMAGE,
    Batch,
    Checks,
    FilterStage,
    Params,
    Reason,
    RowError,
    Rows,
    Stage,
    StageContext,
)

CTX = StageContext(run_dir="/tmp/unused", stage_id="t", seed=0)


class LimitParams(Params):
    low: float = 1.0
    high: float = 5.0


class ValueFilter(FilterStage[LimitParams]):
    name: ClassVar[str] = "value_filter"
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("value", pa.float32()),)

    def score_row(self, batch: Batch, i: int) -> dict[str, Any]:
        value = batch["raw"][i]
        if value is None:
            raise RowError("no_value", "raw is null")
        return {"value": float(value)}

    def decide(self, scores: dict[str, Any]) -> Reason | None:
        p = self.params
        return Checks().min("value", scores["value"], p.low).max("value", scores["value"], p.high).reason()


def test_the_generic_argument_is_the_params_model() -> None:
    assert ValueFilter.params_model is LimitParams
    stage = ValueFilter(LimitParams(low=2.0), CTX)
    assert stage.params.low == 2.0


def test_a_filter_fails_one_row_and_decides_the_others_with_rule_and_detail() -> None:
    out = ValueFilter(LimitParams(), CTX).process({"sample_id": ["a", "b", "c", "d"], "raw": [3.0, 0.5, None, 9.0]})
    assert out["status"] == ["ok", "ok", "error", "ok"]
    assert out["keep"] == [True, False, False, False]
    assert out["reason"] == [None, "value_below_min", "no_value", "value_above_max"]
    assert out["detail"][1] == "value 0.50 < 1" and out["detail"][2] == "raw is null"
    assert out["value"][:2] == [3.0, 0.5] and out["value"][2] is None


def test_checks_name_the_first_failed_rule_and_keep_every_number() -> None:
    reason = Checks().max_abs("yaw", -34.2, 30).min("sharpness", 12.0, 25.0, ".1f").max("exposure", 0.5, None).reason()
    assert reason == Reason("yaw_above_max", "|yaw| 34.2 > 30; sharpness 12.0 < 25")
    assert Checks().min("x", None, 1.0).max("x", 3.0, None).reason() is None


def test_rows_start_ok_and_kept_and_derive_new_rows() -> None:
    rows = Rows(["a", "b"], ["score"])
    assert rows.batch()["keep"] == [True, True] and rows.batch()["score"] == [None, None]
    rows.fail(1, "bad_input", ValueError("boom"))
    child = rows.append("a_face0", score=0.9, parent_id="a")
    rows.drop(child, "too_small", "12 px")
    data = rows.batch()
    assert data["sample_id"] == ["a", "b", "a_face0"] and data["parent_id"] == [None, None, "a"]
    assert data["status"] == ["ok", "error", "ok"] and data["keep"] == [True, False, False]
    assert data["reason"] == [None, "bad_input", "too_small"] and data["detail"][1] == "boom"
    with pytest.raises(ValueError, match="3 rows"):
        rows.column("score", [1.0])


def test_an_unreadable_image_is_an_error_row_named_by_the_image_rule() -> None:
    import numpy as np

    from stages.filters.image_stats import ImageStatsParams, ImageStatsStage

    good = encode_png(np.full((32, 32, 3), 128, np.uint8))
    out = ImageStatsStage(ImageStatsParams(), CTX).process({"sample_id": ["a", "b", "c"], IMAGE: [good, b"", b"xx"]})
    assert out["status"] == ["ok", "error", "error"]
    assert out["reason"][1:] == ["empty_file", "not_an_image"]
    assert out["reason"][0] == "sharpness_below_min"  # a flat grey image has no edges


def test_a_plugin_may_still_declare_params_model_explicitly() -> None:
    class Legacy(Stage):  # type: ignore[type-arg]
        name: ClassVar[str] = "legacy"
        params_model: ClassVar[type[Params]] = LimitParams

    assert Legacy.params_model is LimitParams
