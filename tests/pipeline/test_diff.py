"""`facefoundry diff` on two real runs of one config, the second with a stricter separation threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from typer.testing import CliRunner

from pipeline.cli import USER_ERROR, app


def _cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _diff(a: Path, b: Path, *extra: str) -> dict[str, Any]:
    code, out, err = _cli("diff", str(a), str(b), "--json", *extra)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def _decisions(run: Path, stage: str) -> dict[str, tuple[bool, str | None]]:
    t = pads.dataset(str(run / "tables" / "decisions"), format="parquet").to_table(
        columns=["sample_id", "keep", "reason"], filter=pc.field("stage") == stage)
    return {s: (k, r) for s, k, r in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)}


def _files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_diff_names_each_decision_that_changed_by_stage_and_rule(small_quickstart_run: Path,
                                                                   small_quickstart_stricter: Path) -> None:
    before = (_files(small_quickstart_run), _files(small_quickstart_stricter))
    r = _diff(small_quickstart_run, small_quickstart_stricter, "--examples", "2")
    assert before == (_files(small_quickstart_run), _files(small_quickstart_stricter))  # read only
    a, b = _decisions(small_quickstart_run, "separation"), _decisions(small_quickstart_stricter, "separation")
    newly = sorted(s for s in a if a[s][0] and not b[s][0])
    assert newly and {b[s][1] for s in newly} == {"identity_collision"}
    stages = {s["stage"]: s for s in r["stages"]}
    assert "separation" in stages and not set(stages) - {"separation", "dedup", "final"}  # stages before it: same
    change = next(c for c in stages["separation"]["changes"] if (c["from"], c["to"]) == ("kept", "dropped"))
    assert change["rule"] == "identity_collision" and change["count"] == len(newly)
    assert change["examples"] == newly[:2]
    # The final decision: samples the first run kept and the second did not, named by the stage that dropped them.
    keep = {run: dict(zip(*(pq.read_table(run / "tables" / "samples", columns=["sample_id", "keep"]).column(c)
                            .to_pylist() for c in ("sample_id", "keep")), strict=True))
            for run in (small_quickstart_run, small_quickstart_stricter)}
    assert r["samples"] == {"common": len(keep[small_quickstart_run]), "only_a": 0, "only_b": 0,
                            "only_a_examples": [], "only_b_examples": []}
    lost = sorted(s for s, k in keep[small_quickstart_run].items() if k and not keep[small_quickstart_stricter][s])
    final = {(c["from"], c["to"], c["rule"]): c["count"] for c in stages["final"]["changes"]}
    assert final == {("kept", "dropped", "separation: identity_collision"): len(lost)}


def test_diff_reports_score_shifts_and_export_membership(small_quickstart_run: Path,
                                                         small_quickstart_stricter: Path) -> None:
    r = _diff(small_quickstart_run, small_quickstart_stricter)
    scores = {s["column"]: s for s in r["scores"]}
    threshold = scores["separation.threshold"]
    assert threshold["mean_b"] < threshold["mean_a"] and threshold["changed"] > 0
    assert abs(threshold["mean_b"] - 0.6) < 1e-6 and abs(threshold["mean_delta"] - (0.6 - 0.74)) < 1e-6
    assert scores["quality.yaw"]["changed"] == 0 and scores["quality.yaw"]["mean_delta"] == 0.0  # a stage not rerun

    def members(run: Path) -> dict[str, str]:
        t = pq.read_table(run / "export" / "manifest.parquet", columns=["sample_id", "split"])
        return dict(zip(t.column("sample_id").to_pylist(), t.column("split").to_pylist(), strict=True))

    ma, mb = members(small_quickstart_run), members(small_quickstart_stricter)
    e = r["export"]
    assert (e["samples_a"], e["samples_b"]) == (len(ma), len(mb))
    assert e["only_a"] == len(set(ma) - set(mb)) > 0 and e["only_b"] == len(set(mb) - set(ma))
    assert e["split_changed"] == sum(1 for s in set(ma) & set(mb) if ma[s] != mb[s])
    for c in e["changes"]:
        if c["to"] == "-":
            assert all(ma[s] == c["from"] and s not in mb for s in c["examples"])


def test_diff_of_a_run_with_itself_finds_no_change(small_quickstart_run: Path) -> None:
    r = _diff(small_quickstart_run, small_quickstart_run)
    assert r["stages"] == [] and r["export"]["changes"] == []
    assert r["scores"] and all(s["changed"] == 0 for s in r["scores"])
    code, out, _ = _cli("diff", str(small_quickstart_run), str(small_quickstart_run))
    assert code == 0 and "no stage changed a decision" in out


def test_diff_of_a_folder_that_is_not_a_run_is_a_user_error(small_quickstart_run: Path, tmp_path: Path) -> None:
    code, _, err = _cli("diff", str(small_quickstart_run), str(tmp_path))
    assert code == USER_ERROR and err.startswith("error: ") and "not a facefoundry run" in err
