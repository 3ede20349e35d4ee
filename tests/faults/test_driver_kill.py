"""The driver SIGKILLed at random moments, N times, then resumed: byte-identical to an uninterrupted
run, no duplicate rows, nothing half-visible."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import KillDrill
from tests.pipeline.engine.test_resume import CONFIG

KILLS = int(os.environ.get("FF_FAULT_KILLS", "3"))
STAGES = ("pattern", "busy", "meanf")


def _committed(root: Path) -> int:
    return sum(len(glob.glob(str(root / "manifests" / s / "*.parquet"))) for s in STAGES)


@pytest.mark.faults
def test_sigkill_at_random_moments_then_resume_is_byte_identical_with_no_duplicates(
        kill_drill: Callable[[dict[str, Any]], KillDrill]) -> None:
    drill = kill_drill(CONFIG)
    # Increasing kill points over the run's commits (0 = before the first commit: startup, planning).
    targets = sorted(drill.rng.sample(range(_committed(drill.ref) - 1), KILLS))
    for target in targets:
        if drill.kill_when(lambda t=target: _committed(drill.out) >= t, 300, 0.4):
            assert not (drill.out / "export" / "export.json").exists()
    files = ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*")
    drill.resume_matches_reference(files, STAGES)
