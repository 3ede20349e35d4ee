"""A global stage as a phase of a real run: distributed, committed per shard, and a failure that ends in
the run's history (never a bare traceback)."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.fixtures import run_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _config(dedup: str, engine_config: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(engine_config)
    cfg["stages"] = [
        *engine_config["stages"][:1],
        {"stage": "fingerprint", "id": "fingerprint"},
        {"stage": dedup, "id": "dedup", "params": {"embeddings": False, "phash_confirm": False}},
    ]
    cfg["export"] = {**engine_config["export"], "enabled": False}
    return cfg


def test_a_global_stage_runs_distributed_and_commits_one_fragment_per_shard(
    tmp_path: Path, engine_config: dict[str, Any]
) -> None:
    res = run_config(_config("dedup", engine_config), tmp_path / "run")

    assert res.complete, res.failures
    source = sorted(Path(p).name for p in glob.glob(str(tmp_path / "run/manifests/pattern/*.parquet")))
    fragments = sorted(Path(p).name for p in glob.glob(str(tmp_path / "run/manifests/dedup/*.parquet")))
    assert fragments == source and len(source) > 1
    rows = [r for f in fragments for r in pq.read_table(tmp_path / "run/manifests/dedup" / f).to_pylist()]
    assert len(rows) == 24 and all(r["stage"] == "dedup" for r in rows)
    assert not glob.glob(str(tmp_path / "run/work/*"))
    assert json.loads((tmp_path / "run/report/dedup.summary.json").read_text())["links"]["embedding"] == 0


def test_a_global_stage_that_keeps_failing_is_recorded_in_the_history(
    tmp_path: Path, engine_config: dict[str, Any]
) -> None:
    res = run_config(_config("tests.fixtures.corpus_stages:AlwaysFailingDedup", engine_config), tmp_path / "run")

    assert not res.complete
    assert res.failures and res.failures[0]["stage"] == "dedup" and "disk on fire" in res.failures[0]["error"]
    history = [json.loads(Path(p).read_text()) for p in glob.glob(str(tmp_path / "run/history/*.json"))]
    assert any(f["stage"] == "dedup" and "disk on fire" in f["error"] for h in history for f in h["failures"])
    assert not glob.glob(str(tmp_path / "run/manifests/dedup/*.parquet"))


def test_an_argument_every_task_shares_is_put_in_the_object_store_once() -> None:
    """Ray copies a large argument into the store once per task; a centroid table handed to every map task
    was as many copies in the driver's memory as there were tasks."""
    import numpy as np
    import ray

    from pipeline.engine.global_exec import _put_shared_args

    table = np.arange(300_000, dtype=np.float32)  # 1.2 MB: above Ray's inline limit
    own = [np.zeros(4) for _ in range(3)]
    calls = _put_shared_args([("url", i, own[i], table, 0.5, len) for i in range(3)])

    refs = [c[3] for c in calls]
    assert all(isinstance(r, ray.ObjectRef) for r in refs) and len({r.hex() for r in refs}) == 1
    assert [c[:3] for c in calls] == [("url", i, own[i]) for i in range(3)]  # per-call values stay
    assert all(c[4] == 0.5 and c[5] is len for c in calls)
    assert np.array_equal(ray.get(refs[0]), table)
    values = ray.get([ray.remote(lambda *a: float(a[3].sum())).remote(*c) for c in calls])
    assert values == [float(table.sum())] * 3  # tasks get the value, not the reference
