"""`facefoundry whatif` on a real run: the export's own selection, so its counts are the export's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from pipeline.cli import USER_ERROR, app
from tests.pipeline.conftest import REEXPORT

GRID = ["--set", "export.thresholds.quality.yaw.max_abs=25,40", "--set", "export.identities.max_images=null,3",
        "--set", "export.min_images_per_identity=2,3"]


def _cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def _export_counts(run: Path) -> dict[str, Any]:
    done = json.loads((run / "export" / "export.json").read_text())
    ex = done["excluded"]
    return {"samples": sum(v["samples"] for v in done["splits"].values()),
            "identities": sum(v["identities"] for v in done["splits"].values()), "selection": done["selection"],
            "candidates": ex["candidates"], "total_samples": ex["total_samples"],
            "dropped_no_identity": ex["dropped_no_identity"], "dropped_small_identity": ex["dropped_small_identity"],
            "small_identities": ex["small_identities"]}


def _whatif_counts(combo: dict[str, Any]) -> dict[str, Any]:
    return {k: combo[k] for k in ("samples", "identities", "selection", "candidates", "total_samples",
                                  "dropped_no_identity",
                                  "dropped_small_identity", "small_identities")}


def test_whatif_counts_are_the_counts_of_the_export_run_with_those_settings(
        small_quickstart_run: Path, small_quickstart_reexported: Path) -> None:
    before = _files(small_quickstart_run)
    code, out, err = _cli("whatif", str(small_quickstart_run), *GRID, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert _files(small_quickstart_run) == before  # nothing in the run written
    combos = {tuple(c["settings"].values()): c for c in result["combinations"]}
    assert len(combos) == 8
    # The run's own settings (quality.yaw max_abs 25, no quota, 2 images) give its own export...
    assert _whatif_counts(combos[("25", "null", "2")]) == _export_counts(small_quickstart_run)
    # ... and another combination gives what the export gave when it was run with it.
    chosen = tuple(s.split("=", 1)[1] for s in REEXPORT)
    assert _whatif_counts(combos[chosen]) == _export_counts(small_quickstart_reexported)
    assert _export_counts(small_quickstart_reexported) != _export_counts(small_quickstart_run)
    assert combos[chosen]["selection"]["drops"]["over_quota"] > 0  # the quota is what differs
    for c in result["combinations"]:  # every sample is kept or counted under one rule
        assert c["samples"] + sum(d["count"] for d in c["drops"]) == c["total_samples"]


def test_whatif_counts_a_where_drop_under_where_as_sql_over_the_table_counts_it(small_quickstart_run: Path) -> None:
    code, out, err = _cli("whatif", str(small_quickstart_run), "--set", "export.where=quality__pitch < -10, 1 = 1",
                          "--json")
    assert code == 0, err
    by_where = {c["settings"]["export.where"]: c for c in json.loads(out)["combinations"]}
    assert set(by_where) == {"quality__pitch < -10", "1 = 1"}
    con = duckdb.connect()
    files = str(small_quickstart_run / "tables" / "samples" / "*.parquet")
    # The samples that pass every other condition of the run's export but whose pitch is not below -10.
    expected = con.execute(
        "SELECT count(*) FROM read_parquet(?) WHERE coalesce(quality__yaw BETWEEN -25 AND 25, false) "
        "AND coalesce(detect__det_score >= 0.5, false) AND NOT coalesce(quality__pitch < -10, false) AND "
        + " AND ".join(f"{s}__status = 'ok'" for s in _stages(small_quickstart_run))
        + " AND " + " AND ".join(f"{s}__keep" for s in _stages(small_quickstart_run) if s not in ("quality", "detect")),
        [files]).fetchone()
    assert expected is not None and expected[0] > 0
    where = [d for d in by_where["quality__pitch < -10"]["drops"] if d["rule"] == "where"]
    assert where == [{"stage": "export", "rule": "where", "count": expected[0]}]
    assert not [d for d in by_where["1 = 1"]["drops"] if d["rule"] == "where"]
    assert by_where["1 = 1"]["candidates"] - by_where["quality__pitch < -10"]["candidates"] == expected[0]
    code, out, _ = _cli("whatif", str(small_quickstart_run), "--set", "export.where=quality__pitch < -10")
    assert code == 0 and "1 combination(s)" in out and f"where {expected[0]}" in out  # the table, or one block


def _stages(run: Path) -> list[str]:
    from manifests.storage import RunStorage
    from pipeline.status import stage_order

    return stage_order(RunStorage(str(run)))


def test_whatif_split_into_identity_partitions_and_processes_gives_the_one_pass_answer(
        small_quickstart_run: Path) -> None:
    from manifests.storage import RunStorage
    from pipeline.engine.rundir import read_run_file
    from pipeline.whatif import prepare, whatif

    store = RunStorage(str(small_quickstart_run))
    state = read_run_file(store)
    assert state is not None
    grid = prepare(store, _stages(small_quickstart_run), state.config["export"], [a for a in GRID if a != "--set"])
    one = whatif(store, _stages(small_quickstart_run), grid)
    parts = whatif(store, _stages(small_quickstart_run), grid, rows_per_partition=7, workers=2)
    assert one["evaluation"]["partitions"] == 1 and parts["evaluation"]["partitions"] > 4
    assert parts["combinations"] == one["combinations"]  # partitions spilled to disk, rules in 2 processes


@pytest.mark.parametrize(("grid", "named"), [
    (["export.val_fraction=0.1,2"], "export.val_fraction: Input should be less than 1"),
    (["export.min_images_per_identity=2", "export.no_such_key=1"], "export.no_such_key: Extra inputs are not "
                                                                    "permitted"),
    (["run.seed=1,2"], "--set run.seed: whatif varies export settings only"),
    (["export.where=no_such_column > 1"], "export.where: Binder Error"),
    (["export.where=true; DROP TABLE samples"], "export.where: Value error, expected exactly one SQL predicate"),
    (["export.thresholds.nostage.yaw.min=1"], "export.thresholds: 'nostage.yaw' must be 'stage.column'"),
])
def test_whatif_refuses_a_bad_key_or_value_with_one_line_naming_it(small_quickstart_run: Path, grid: list[str],
                                                                   named: str) -> None:
    code, out, err = _cli("whatif", str(small_quickstart_run), *[x for g in grid for x in ("--set", g)])
    assert code == USER_ERROR
    assert out == ""
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or named in err.strip().splitlines()[0]


def test_whatif_conditions_are_the_export_predicates_terms_with_where_as_one() -> None:
    from pipeline.export.config import ExportConfig
    from pipeline.export.plan import selection_predicate
    from pipeline.whatif import conjuncts, split_values

    where = "quality__yaw < 10 AND (labels__pose_bin = 'a AND (b' OR detect__det_score > 0.5)"
    cfg = ExportConfig(where=where, thresholds={"quality.yaw": {"max_abs": 10.0}})
    terms = conjuncts(selection_predicate(cfg, ["detect", "quality"]))
    assert terms == ["\"detect__status\" = 'ok'", "\"quality__status\" = 'ok'", '"detect__keep"',
                     'abs("quality__yaw") <= 10.0', terms[-1]]
    assert terms[-1].startswith("(") and "'a AND (b'" in terms[-1]
    assert split_values("a, f(b, c) > 1, x IN ('p,q', \"r,s\"), [1, 2]") == [
        "a", "f(b, c) > 1", "x IN ('p,q', \"r,s\")", "[1, 2]"]


def test_whatif_reports_a_balance_the_run_cannot_meet(small_quickstart_run: Path) -> None:
    balance = ("export.identities.balance={column: labels.pose_bin, level: identity, "
               "shares: {frontal: 0.5, upside: 0.5}}")
    code, out, err = _cli("whatif", str(small_quickstart_run), "--set", balance, "--json")
    assert code == 0, err
    (combo,) = json.loads(out)["combinations"]
    doc = combo["selection"]["balance"]
    assert doc["column"] == "labels.pose_bin" and doc["met"] is False and "upside" in doc["short"]
    assert combo["unmet"] and combo["unmet"][0].startswith("balance labels.pose_bin: short")
