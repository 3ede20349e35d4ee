"""A run with refill rounds, its driver SIGKILLed at random moments (one of them inside a refill round),
then resumed: byte-identical to an uninterrupted run, no duplicate rows, nothing half-visible."""

from __future__ import annotations

import glob
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.pipeline.engine.test_resume import _assert_resumed_identical, _cli, _finish, _reference
from tests.pipeline.test_refill import RAW, STAGES

KILLS = int(os.environ.get("FF_FAULT_KILLS", "3"))


def _source_commits(root: Path, prefix: str = "") -> int:
    """Committed fragments of the source stage: never removed by a round, so they only grow."""
    return len(glob.glob(str(root / "manifests" / "pattern" / f"{prefix}[!_.]*.parquet")))


@pytest.mark.faults
def test_sigkill_during_refill_rounds_then_resume_is_byte_identical(
        tmp_path: Path, fault_rng: random.Random) -> None:
    config, ref = _reference(tmp_path, RAW)
    out = tmp_path / "resumed"
    total = _source_commits(ref)
    assert _source_commits(ref, "r") > 0, "the reference run made no refill round"
    # One kill as soon as a refill round has committed a shard, the others at random source commits,
    # each followed by a random delay so it lands in a global stage, the tables or a round's planning too.
    targets = [("r", 1), *sorted(("", fault_rng.randrange(total)) for _ in range(KILLS - 1))]
    killed = 0
    for prefix, target in targets:
        proc = _cli(config, out)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and _source_commits(out, prefix) < target:
            time.sleep(0.02)
        if proc.poll() is not None:
            continue  # finished (or got further) before this kill point
        time.sleep(fault_rng.uniform(0, 3.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed += 1
    assert killed >= 1, "no kill landed before the run finished"

    _finish(_cli(config, out))
    files = ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*", "report/refill.json")
    _assert_resumed_identical(ref, out, files, STAGES, f"{killed} kills (its fault seed is printed above)")
