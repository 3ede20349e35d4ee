"""The driver SIGKILLed at random moments, N times, then resumed: byte-identical to an uninterrupted
run, no duplicate rows, nothing half-visible."""

from __future__ import annotations

import glob
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.pipeline.engine.test_resume import (
    CONFIG,
    _assert_resumed_identical,
    _cli,
    _finish,
    _reference,
)

KILLS = int(os.environ.get("FF_FAULT_KILLS", "3"))
STAGES = ("pattern", "busy", "meanf")


def _committed(root: Path) -> int:
    return sum(len(glob.glob(str(root / "manifests" / s / "*.parquet"))) for s in STAGES)


@pytest.mark.faults
def test_sigkill_at_random_moments_then_resume_is_byte_identical_with_no_duplicates(
        tmp_path: Path, fault_rng: random.Random) -> None:
    config, ref = _reference(tmp_path, CONFIG)
    out = tmp_path / "resumed"
    total = _committed(ref)
    # Increasing kill points over the run's commits (0 = before the first commit: startup, planning).
    targets = sorted(fault_rng.sample(range(total - 1), KILLS))
    killed = 0
    for target in targets:
        proc = _cli(config, out)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and _committed(out) < target:
            time.sleep(0.02)
        if proc.poll() is not None:
            continue  # finished (or got further) before this kill point
        time.sleep(fault_rng.uniform(0, 0.4))  # land anywhere: mid-write, mid-commit, between shards
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed += 1
        assert not (out / "export" / "export.json").exists()
    assert killed >= 1, "no kill landed before the run finished"

    _finish(_cli(config, out))
    files = ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*")
    _assert_resumed_identical(ref, out, files, STAGES, f"{killed} kills (its fault seed is printed above)")
