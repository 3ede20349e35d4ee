"""Identity-level selection on a reference table: every rule with its selection computed by hand
(largest-remainder quotas, the strict shrink and ``fill``, rank orders, round robin and farthest
point), and the config's refusals."""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.export.config import ExportConfig, Identities
from pipeline.export.identities import (
    COUNTS_SCHEMA,
    available_bins,
    image_plan,
    pick_images,
    quotas,
    select_identities,
)
from tests.conftest import ENGINE_CONFIG

SHARES = {"frontal": 0.5, "left": 0.25, "right": 0.25}


def _counts(rows: list[tuple[str, str, int, float | None]]) -> pa.Table:
    return pa.table({"identity_id": [r[0] for r in rows], "bin": [r[1] for r in rows], "n": [r[2] for r in rows],
                     "score_sum": [None if r[3] is None else r[3] * r[2] for r in rows],
                     "score_n": [0 if r[3] is None else r[2] for r in rows]}, schema=COUNTS_SCHEMA)


def _decisions(sel: Any) -> dict[str, tuple[int, str | None]]:
    return {r["identity_id"]: (r["selected"], r["rule"]) for r in sel.table.to_pylist()}


# a: 5 images, b: 3, c: 1, d: 4 (mean scores 0.2, 0.9, 0.5, 0.5)
REFERENCE = _counts([("a", "x", 5, 0.2), ("b", "x", 3, 0.9), ("c", "x", 1, 0.1), ("d", "x", 4, 0.5)])


def test_quota_minimum_and_max_identities_by_images_pick_the_hand_computed_identities() -> None:
    sel = select_identities(REFERENCE, ExportConfig(identities={"max_images": 3, "max_identities": 2}))
    # c (1 < 2) is too small; a, d, b rank by images 5, 4, 3: a and d win, each capped at 3.
    assert _decisions(sel) == {"a": (3, None), "b": (0, "over_max_identities"), "c": (0, "identity_too_small"),
                               "d": (3, None)}
    assert sel.drops == {"identity_too_small": 1, "over_max_identities": 3, "over_quota": 3}
    assert sel.dropped_identities == {"identity_too_small": 1, "over_max_identities": 1}
    assert (sel.samples, sel.identities) == (6, 2)


@pytest.mark.parametrize(("order", "winners"), [("higher", {"b", "d"}), ("lower", {"a", "d"})])
def test_max_identities_ranked_by_a_mean_score_keeps_the_best_scored(order: str, winners: set[str]) -> None:
    cfg = ExportConfig(identities={"max_identities": 2, "rank": {"by": "score", "score": "q.s", "order": order}})
    kept = {i for i, (_, rule) in _decisions(select_identities(REFERENCE, cfg)).items() if rule is None}
    assert kept == winners


def test_the_alias_min_images_per_identity_and_target_images_shortfall_are_counted() -> None:
    sel = select_identities(REFERENCE, ExportConfig(min_images_per_identity=4, identities={"target_images": 5}))
    assert {i for i, (_, r) in _decisions(sel).items() if r is None} == {"a", "d"}
    assert sel.short_of_target == 1  # d has 4 of 5


def test_largest_remainder_quotas_break_ties_by_bin_name() -> None:
    assert quotas(8, SHARES) == {"frontal": 4, "left": 2, "right": 2}
    assert quotas(7, SHARES) == {"frontal": 3, "left": 2, "right": 2}  # .75 and .75 beat .5
    assert quotas(6, SHARES) == {"frontal": 3, "left": 2, "right": 1}  # 3 exact; .5 and .5: left by name


# One identity, bins frontal 6, left 1, right 3, prefer the higher score.
ROWS = [("f1", "frontal", .9), ("f2", "frontal", .8), ("f3", "frontal", .7), ("f4", "frontal", .6),
        ("f5", "frontal", .5), ("f6", "frontal", .4), ("l1", "left", .3), ("r1", "right", .95),
        ("r2", "right", .85), ("r3", "right", .1)]


def _rows(rows: list[tuple[str, Any, Any]], div: list[Any] | None = None) -> pa.Table:
    cols: dict[str, Any] = {"sample_id": [r[0] for r in rows], "sel_bal": [r[1] for r in rows],
                            "sel_score": [r[2] for r in rows]}
    if div is not None:
        cols["sel_div"] = div
    return pa.table(cols)


@pytest.mark.parametrize(("fill", "total", "chosen", "rules"), [
    # strict: at 8 left lacks one; 7 and 6 give left 2 > 1; 5 gives frontal 3, left 1, right 1.
    (False, 5, {"r1", "f1", "f2", "f3", "l1"}, {"r2": "balance", "f4": "balance", "f5": "balance",
                                                "f6": "over_quota", "r3": "over_quota"}),
    # fill: quotas 4, 2, 2 met as 4, 1, 2, the eighth place goes to the next in prefer order (f5).
    (True, 8, {"r1", "f1", "r2", "f2", "f3", "f4", "l1", "f5"}, {"f6": "over_quota", "r3": "over_quota"}),
])
def test_image_level_balance_shrinks_or_fills_and_names_each_drop(fill: bool, total: int, chosen: set[str],
                                                                   rules: dict[str, str]) -> None:
    cfg = Identities(max_images=8, prefer={"score": "q.s"},
                     balance={"column": "labels.pose_bin", "shares": SHARES, "fill": fill})
    rows = _rows(ROWS)
    plan = image_plan(available_bins(rows), cfg)
    assert (plan.total, plan.capped, plan.short) == (total, 8, {"left": 1})
    picked = pick_images(rows, plan, cfg)
    ids = rows.column("sample_id").to_pylist()
    assert {s for s, r in zip(ids, picked, strict=True) if r is None} == chosen
    assert {s: r for s, r in zip(ids, picked, strict=True) if r is not None} == rules
    sel = select_identities(_counts([("z", b, n, None) for b, n in (("frontal", 6), ("left", 1), ("right", 3))]),
                            cfg, min_images=2)
    assert sel.samples == total and sel.balance is not None
    assert sel.balance["short"] == {"left": {"images": 1, "identities": 1}} and sel.balance["met"] is False


def test_identity_level_balance_keeps_each_bins_share_of_identities_and_reports_the_short_bin() -> None:
    # A..F ranked by images; bins f, f, f, p, x, f; shares f .5, p .5; max_identities 4.
    table = _counts([("A", "f", 9, None), ("B", "f", 8, None), ("C", "f", 7, None), ("D", "p", 6, None),
                     ("E", "x", 5, None), ("F", "f", 3, None)])
    bal = {"column": "labels.g", "shares": {"f": 0.5, "p": 0.5}, "level": "identity"}
    strict = select_identities(table, ExportConfig(identities={"max_identities": 4, "balance": bal}))
    # p has one identity: quotas(4) = 2, 2 cannot be met; quotas(3) = f 2, p 1 can: A, B, D.
    assert {i: r for i, (_, r) in _decisions(strict).items()} == {
        "A": None, "B": None, "C": "balance", "D": None, "E": "over_max_identities", "F": "over_max_identities"}
    assert strict.balance is not None and strict.balance["short"] == {"p": {"identities": 1}}
    filled = select_identities(table, ExportConfig(identities={"max_identities": 4, "balance": {**bal, "fill": True}}))
    assert {i for i, (_, r) in _decisions(filled).items() if r is None} == {"A", "B", "C", "D"}


def test_diversity_over_label_bins_takes_turns_between_bins() -> None:
    rows = _rows([("a1", None, .9), ("a2", None, .8), ("a3", None, .7), ("a4", None, .6), ("a5", None, .5)],
                 div=["f", "f", "l", "f", "r"])
    cfg = Identities(max_images=3, prefer={"score": "q.s", "diversity": "labels.pose_bin"})
    picked = pick_images(rows, image_plan(available_bins(rows.drop(["sel_bal"])), cfg), cfg)
    assert picked == [None, "over_quota", None, "over_quota", None]  # a1, a3, a5: one per bin first


def test_diversity_over_an_embedding_is_farthest_point_from_the_best() -> None:
    pts = [[0.0, 0.0], [1.0, 0.0], [0.1, 0.0], [0.0, 2.0], [3.0, 3.0]]
    rows = _rows([(f"p{i}", None, 0.9 - 0.1 * i) for i in range(5)], div=pts)
    cfg = Identities(max_images=3, prefer={"score": "q.s", "diversity": "embed.embedding"})
    picked = pick_images(rows, image_plan(available_bins(rows.drop(["sel_bal"])), cfg), cfg)
    # p0 (best), then p4 (4.24 away), then p3 (2 from p0, 3.16 from p4) beats p1 (1) and p2 (0.1).
    assert [f"p{i}" for i, r in enumerate(picked) if r is None] == ["p0", "p3", "p4"]


@pytest.mark.parametrize(("export", "message"), [
    ({"identities": {"balance": {"column": "labels.pose_bin", "shares": {"a": 0.5, "b": 0.4}}}},
     r"export\.identities\.balance\.shares.*sum to 1"),
    ({"identities": {"min_images": 5, "max_images": 3}}, r"export\.identities.*min_images \(5\) is above"),
    ({"min_images_per_identity": 3, "identities": {"min_images": 4}}, r"export.*differ: set one"),
    ({"identities": {"prefer": {"score": "no dot"}}}, r"export\.identities\.prefer\.score"),
    ({"identities": {"rank": {"by": "score"}}}, r"export\.identities\.rank"),
])
def test_an_invalid_identities_config_names_its_key_path(export: dict[str, Any], message: str) -> None:
    raw = copy.deepcopy(ENGINE_CONFIG)
    raw["export"] = {**raw["export"], **export}
    raw["export"].pop("min_images_per_identity", None) if "min_images_per_identity" not in export else None
    with pytest.raises(ConfigError, match=message):
        load_config(raw=raw)


def test_a_config_naming_only_identities_min_images_loads_again_from_its_frozen_dump() -> None:
    """run.yaml writes every key, the alias too: the dump must load as the same setting (whatif and a
    resumed run read it), while two different values given by the user stay an error."""
    cfg = ExportConfig(identities={"min_images": 3})
    again = ExportConfig(**cfg.model_dump())
    assert again.min_images == 3 and again == cfg
    with pytest.raises(ValueError, match="differ"):
        ExportConfig(identities={"min_images": 3}, min_images_per_identity=4)


def test_the_counts_may_come_in_any_order_and_split_over_repeated_rows() -> None:
    # The export concatenates one counts table per partition: an (identity, bin) may repeat, in any order,
    # and a null or empty bin is the "(none)" bin.
    whole = _counts([("a", "x", 5, 0.2), ("a", "(none)", 2, None), ("b", "y", 3, 0.9), ("d", "x", 4, 0.5),
                     ("e", "(none)", 3, None), ("e", "z", 2, None)])
    split = _counts([("d", "x", 1, 0.5), ("b", "y", 3, 0.9), ("a", "", 1, None), ("e", "z", 2, None),
                     ("a", "x", 2, 0.2), ("e", "", 2, None), ("d", "x", 3, 0.5), ("a", None, 1, None),
                     ("e", None, 1, None), ("a", "x", 3, 0.2)])
    cfg = ExportConfig(identities={"max_images": 4, "max_identities": 2,
                                   "rank": {"by": "score", "score": "q.s", "order": "lower"}})
    expected = select_identities(whole, cfg)
    got = select_identities(split, cfg)
    assert got.table.to_pylist() == expected.table.to_pylist()
    assert got.summary() == expected.summary()
    # a ranks first (mean 0.2 over its 5 scored images), d second; b and e (no score: last) are left out.
    assert _decisions(got) == {"a": (4, None), "b": (0, "over_max_identities"), "d": (4, None),
                               "e": (0, "over_max_identities")}
    assert {r["identity_id"]: r["bin"] for r in got.table.to_pylist()} == {"a": "x", "b": "y", "d": "x",
                                                                           "e": "(none)"}


def test_no_counts_select_nothing() -> None:
    sel = select_identities(COUNTS_SCHEMA.empty_table(), ExportConfig(identities={"max_identities": 2}))
    assert (sel.samples, sel.identities, sel.table.num_rows, sel.drops) == (0, 0, 0, {})
