"""Faults in the streaming phase on a real local Ray: a poison sample that kills its worker, and a
stage whose model server is down for a while."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.engine.runner import Runner, StageSetupError

pytestmark = pytest.mark.usefixtures("ray_session")


def _config(stage: dict[str, Any], **run: Any) -> dict[str, Any]:
    return {
        "name": "faults",
        "run": {"seed": 5, "shard_size": 8, **run},
        "identities": {"count": 4, "images_per_identity": 4, "dim": 16, "max_cosine": 0.9},
        "stages": [{"stage": "tests.fixtures.engine_stages:PatternSource", "id": "pattern"}, stage],
        "export": {"enabled": False},
    }


def _rows(out: Path, stage: str) -> list[dict[str, Any]]:
    return [r for f in sorted(glob.glob(str(out / "manifests" / stage / "*.parquet")))
            for r in pq.read_table(f).to_pylist()]


def test_a_sample_that_kills_its_worker_is_quarantined_and_the_rest_of_the_run_completes(tmp_path: Path) -> None:
    raw = _config({"stage": "tests.fixtures.engine_stages:CrashMapper", "id": "crash",
                   "params": {"crash_prefix": "0"}}, max_shard_deaths=2, max_in_flight_per_worker=1)
    cfg, stages = load_config(raw=raw)
    out = tmp_path / "run"
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    rows = _rows(out, "crash")
    sources = _rows(out, "pattern")
    poison = {r["sample_id"] for r in sources if r["sample_id"].startswith("0")}
    assert poison, "the seed must plant at least one poison sample"
    assert {r["sample_id"] for r in rows} == {r["sample_id"] for r in sources}
    crashed = {r["sample_id"] for r in rows if r["status"] == "error"}
    assert crashed == poison
    assert all(r["reason"] == "worker_crash" and "killed the worker" in r["detail"]
               for r in rows if r["status"] == "error")
    by_id = {r["sample_id"]: r for r in sources}
    assert all(r["bright"] == pytest.approx(by_id[r["sample_id"]]["gt_mean"]) for r in rows if r["status"] == "ok")


def test_a_stage_that_fails_transiently_twice_is_retried_and_completes_without_error_rows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    raw = _config({"stage": "tests.fixtures.engine_stages:FlakyMapper", "id": "flaky",
                   "params": {"state_dir": str(state), "failures": 2}})
    cfg, stages = load_config(raw=raw)
    out = tmp_path / "run"
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    rows = _rows(out, "flaky")
    assert len(rows) == 16
    assert all(r["status"] == "ok" and r["tries"] == 2 for r in rows)


def test_a_stage_whose_setup_fails_stops_the_run_with_the_setup_error(tmp_path: Path) -> None:
    raw = _config({"stage": "tests.fixtures.engine_stages:CrashMapper", "id": "crash",
                   "params": {"fail_setup": True}})
    cfg, stages = load_config(raw=raw)
    with pytest.raises(StageSetupError, match=r"crash.*failed to set up(.|\n)*crash.bin not found"):
        Runner(cfg, stages, str(tmp_path / "run"), show_progress=False).run()
