"""A worker node removed mid-run on a 3-node local Ray cluster: the run completes, byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import REPO
from tests.pipeline.engine.test_resume import CONFIG, _files, _reference, _rows


@pytest.mark.faults
def test_a_worker_node_removed_mid_run_still_completes_byte_identical(tmp_path: Path) -> None:
    config, ref = _reference(tmp_path, CONFIG)
    out = tmp_path / "cluster"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.faults.node_loss_run", str(config), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["removed"], "the node was not removed before the run finished"
    for pattern in ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet"):
        a, b = _files(ref, pattern), _files(out, pattern)
        assert a.keys() == b.keys() and a, pattern
        assert a == b, f"{pattern} differs after losing a node"
    for stage in ("pattern", "busy", "meanf"):
        assert _rows(ref, stage) == _rows(out, stage)
