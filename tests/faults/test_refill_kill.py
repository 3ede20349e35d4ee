"""A run with refill rounds, its driver SIGKILLed at random moments (one of them inside a refill round),
then resumed: byte-identical to an uninterrupted run, no duplicate rows, nothing half-visible."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import KillDrill
from tests.pipeline.test_refill import RAW, STAGES

KILLS = int(os.environ.get("FF_FAULT_KILLS", "3"))


def _source_commits(root: Path, prefix: str = "") -> int:
    """Committed fragments of the source stage: never removed by a round, so they only grow."""
    return len(glob.glob(str(root / "manifests" / "pattern" / f"{prefix}[!_.]*.parquet")))


@pytest.mark.faults
def test_sigkill_during_refill_rounds_then_resume_is_byte_identical(
        kill_drill: Callable[[dict[str, Any]], KillDrill]) -> None:
    drill = kill_drill(RAW)
    assert _source_commits(drill.ref, "r") > 0, "the reference run made no refill round"
    # One kill as soon as a refill round has committed a shard, the others at random source commits,
    # each followed by a random delay so it lands in a global stage, the tables or a round's planning too.
    total = _source_commits(drill.ref)
    targets = [("r", 1), *sorted(("", drill.rng.randrange(total)) for _ in range(KILLS - 1))]
    for prefix, target in targets:
        drill.kill_when(lambda p=prefix, t=target: _source_commits(drill.out, p) >= t, 600, 3.0)
    files = ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*", "report/refill.json")
    drill.resume_matches_reference(files, STAGES)
