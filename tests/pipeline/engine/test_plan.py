"""The frozen shard plan: stored as Parquet, and an older run's plan.json still read."""

from __future__ import annotations

import json
from pathlib import Path

from manifests.layout import LEGACY_PLAN_FILE, PLAN_FILE
from manifests.storage import RunStorage
from pipeline.engine.rundir import plan_size, read_plan, write_plan


def _plan(n: int) -> dict:
    return {"fingerprint": "fp1", "source": "ingest",
            "shards": [{"name": f"{i:06d}", "spec": {"paths": [f"people/p{i}/img{j}.jpg" for j in range(4)]}}
                       for i in range(n)]}


def test_the_plan_round_trips_through_parquet(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path))
    plan = _plan(50)
    write_plan(store, plan)
    assert (tmp_path / PLAN_FILE).exists() and not (tmp_path / LEGACY_PLAN_FILE).exists()
    assert read_plan(store) == plan


def test_an_older_runs_plan_json_is_read_and_replaced_when_the_plan_is_written_again(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path))
    plan = _plan(3)
    (tmp_path / LEGACY_PLAN_FILE).write_text(json.dumps(plan))
    assert read_plan(store) == plan
    write_plan(store, plan)
    assert not (tmp_path / LEGACY_PLAN_FILE).exists() and read_plan(store) == plan


def test_a_folder_plan_is_much_smaller_as_parquet_than_as_json(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path))
    plan = _plan(2000)
    write_plan(store, plan)
    assert (tmp_path / PLAN_FILE).stat().st_size * 4 < len(json.dumps(plan))


def test_the_plan_size_is_its_shard_count_for_parquet_json_and_no_plan(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path))
    assert plan_size(store) == 0
    (tmp_path / LEGACY_PLAN_FILE).write_text(json.dumps(_plan(7)))
    assert plan_size(store) == 7
    write_plan(store, _plan(123))
    assert plan_size(store) == 123 == len(read_plan(store)["shards"])  # type: ignore[index]
