"""Fused per-shard stages: the same bytes as separate actors, and the same resume."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from manifests.schema import VOLATILE
from pipeline.config import load_config
from pipeline.engine.runner import Runner, RunResult
from tests.fixtures import engine_stage, pattern_config

pytestmark = pytest.mark.usefixtures("ray_session")

CONFIG: dict[str, Any] = pattern_config(
    "fused", seed=7, shard_size=6, identities=(6, 3, 16, 0.9),
    stages=[engine_stage("BusyMapper", "busy", params={"ms_per_sample": 1}),
            engine_stage("MeanFilter", "meanf", params={"min_mean": 150}, prune=True),
            engine_stage("CrashMapper", "bright", params={"crash_prefix": "-"})],
    export={"enabled": False})


def _run(out: Path, fuse: bool) -> RunResult:
    cfg, stages = load_config(raw=CONFIG, overrides=[f"run.fuse={str(fuse).lower()}"])
    return Runner(cfg, stages, str(out), show_progress=False).run()


def _snapshot(out: Path) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for f in sorted(glob.glob(str(out / "manifests" / "*" / "*.parquet"))):
        rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in pq.read_table(f).to_pylist()]
        snap[os.path.relpath(f, out)] = rows
    for f in sorted(glob.glob(str(out / "shards" / "*" / "*.tar"))):
        snap[os.path.relpath(f, out)] = Path(f).read_bytes()
    return snap


def test_a_fused_chain_writes_what_separate_actors_write_and_resumes_from_its_first_uncommitted_stage(
        tmp_path: Path) -> None:
    apart, fused = tmp_path / "apart", tmp_path / "fused"
    assert _run(apart, fuse=False).complete
    res = _run(fused, fuse=True)
    assert res.complete
    want = _snapshot(apart)
    assert len([k for k in want if k.endswith(".parquet")]) == 4 * 3
    assert any(not r["keep"] for r in want["manifests/meanf/000000.parquet"] + want["manifests/meanf/000001.parquet"]
               + want["manifests/meanf/000002.parquet"]), "the filter must drop something (pruned downstream)"
    assert _snapshot(fused) == want

    # A kill between the commits of one chain: shard 0 lost its last stage, shard 1 its last three.
    (fused / "manifests" / "bright" / "000000.parquet").unlink()
    for st in ("busy", "meanf", "bright"):
        (fused / "manifests" / st / "000001.parquet").unlink()
    again = _run(fused, fuse=True)
    assert again.complete
    assert again.stages["pattern"]["computed"] == 0
    assert again.stages["busy"]["computed"] == 1 and again.stages["meanf"]["computed"] == 1
    assert again.stages["bright"]["computed"] == 2
    assert _snapshot(fused) == want
