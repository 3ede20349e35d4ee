"""A run killed with SIGKILL part-way and resumed is byte-identical to an uninterrupted run."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from manifests.catalog import COMMITTED_GLOB
from manifests.schema import VOLATILE
from tests.fixtures import REPO, engine_stage, pattern_config

CONFIG = pattern_config(
    "resume-test", seed=11, shard_size=4, identities=(8, 4, 32, 0.6),
    stages=[engine_stage("BusyMapper", "busy", params={"ms_per_sample": 120}),
            engine_stage("MeanFilter", "meanf", params={"min_mean": 50})],
    export={"shard_size": 6, "val_fraction": 0.25})


def _cli(config: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--output", str(out), "--no-progress",
         "--num-cpus", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _reference(tmp_path: Path, raw: dict[str, Any]) -> tuple[Path, Path]:
    """``raw`` written as ``run.yaml`` and run to the end uninterrupted: (the config, the run ``ref``)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    _finish(_cli(config, tmp_path / "ref"))
    return config, tmp_path / "ref"


def _assert_resumed_identical(ref: Path, out: Path, patterns: tuple[str, ...], stages: tuple[str, ...],
                              after: str) -> None:
    """A resumed run ``out`` against its uninterrupted reference ``ref``: the files of ``patterns`` byte
    for byte, every stage's rows (none twice), the export manifest, and no temporary file left."""
    for pattern in patterns:
        a, b = _files(ref, pattern), _files(out, pattern)
        assert a.keys() == b.keys() and a, pattern
        assert a == b, f"{pattern} differs after {after}"
    for stage in stages:
        rows = _rows(out, stage)
        ids = [r["sample_id"] for r in rows]
        assert len(ids) == len(set(ids)), f"duplicate rows in {stage}"
        assert _rows(ref, stage) == rows, f"{stage} differs after {after}"
    exported = pq.read_table(out / "export" / "manifest.parquet")
    assert exported.num_rows == len(set(exported.column("sample_id").to_pylist()))
    assert pq.read_table(ref / "export" / "manifest.parquet").equals(exported)
    leftovers = glob.glob(str(out / "manifests" / "*" / "_tmp-*")) + glob.glob(str(out / "shards" / "*" / "_tmp-*"))
    assert not leftovers, f"temporary files left behind after {after}"


def _finish(proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {os.path.relpath(p, root): Path(p).read_bytes() for p in sorted(glob.glob(str(root / pattern)))}


def _rows(root: Path, stage: str) -> list[dict]:
    """The rows of the stage's committed fragments: a temporary one that a killed worker left (complete
    but never renamed) is not part of the run."""
    rows = []
    for f in sorted(glob.glob(str(root / "manifests" / stage / COMMITTED_GLOB))):
        rows.extend({k: v for k, v in r.items() if k not in VOLATILE} for r in pq.read_table(f).to_pylist())
    return rows


def _committed(root: Path, stage: str) -> int:
    return len(glob.glob(str(root / "manifests" / stage / COMMITTED_GLOB)))


def _running_with_commits(tmp_path: Path, shards: int = 2) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """A run of ``CONFIG`` (written to ``tmp_path``) into ``tmp_path/run``, started and caught while it
    runs, once ``shards`` of its busy stage are committed: the moment a signal or a kill tests what is
    kept. Returns (the config, the run, the process)."""
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(CONFIG))
    proc = _cli(config, out)
    deadline = time.monotonic() + 300  # a bound for a stuck start, not a timing claim
    while time.monotonic() < deadline and _committed(out, "busy") < shards:
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be interrupted; make the busy stage slower")
        time.sleep(0.05)
    return config, out, proc


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    config, ref = _reference(tmp_path, CONFIG)
    resumed = tmp_path / "resumed"

    proc = _cli(config, resumed)
    deadline = time.monotonic() + 300
    total = 8
    while time.monotonic() < deadline:
        done = len(glob.glob(str(resumed / "manifests" / "busy" / "*.parquet")))
        if 2 <= done < total:
            break
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; make the busy stage slower")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, mid-run
    proc.wait()
    partial = len(glob.glob(str(resumed / "manifests" / "busy" / "*.parquet")))
    assert partial < total, "nothing was left to resume"
    assert not (resumed / "export" / "export.json").exists()

    _finish(_cli(config, resumed))
    for pattern in ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*"):
        a, b = _files(ref, pattern), _files(resumed, pattern)
        assert a.keys() == b.keys() and a, pattern
        assert a == b, f"{pattern} differs after resume"
    for stage in ("pattern", "busy", "meanf"):
        assert _rows(ref, stage) == _rows(resumed, stage)
    manifest = Path("export") / "manifest.parquet"
    assert pq.read_table(ref / manifest).equals(pq.read_table(resumed / manifest))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path: Path) -> None:
    config, out, proc = _running_with_commits(tmp_path)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text.decode(errors="replace")[-3000:]
    assert b"run the same command again to resume" in text
    _finish(_cli(config, out))
    history = [json.loads(p.read_text()) for p in sorted((out / "history").glob("*.json"))]
    busy = history[-1]["stages"]["busy"]
    assert busy["resumed"] >= 2 and busy["resumed"] + busy["computed"] == 8
