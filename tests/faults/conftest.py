"""Fault runs on a shared machine: Ray's own out-of-memory killer must not be the fault under test."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.engine.test_resume import _assert_resumed_identical, _cli, _finish, _reference


class KillDrill:
    """A reference run, then the same config run into ``out`` and SIGKILLed at chosen moments, then resumed
    to the end and compared with the reference byte for byte."""

    def __init__(self, tmp_path: Path, raw: dict[str, Any], rng: random.Random) -> None:
        self.config, self.ref = _reference(tmp_path, raw)
        self.out = tmp_path / "resumed"
        self.rng = rng
        self.killed = 0

    def kill_when(self, reached: Callable[[], bool], wait_s: float, max_delay_s: float) -> bool:
        """Start the run, wait until ``reached()`` (or the run ends, or ``wait_s`` pass), let a random
        delay of up to ``max_delay_s`` pass so the kill lands anywhere (mid-write, mid-commit, between
        steps), then SIGKILL the driver's process group. False when the run finished first."""
        proc = _cli(self.config, self.out)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.poll() is None and not reached():
            time.sleep(0.02)
        if proc.poll() is not None:
            return False
        time.sleep(self.rng.uniform(0, max_delay_s))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.killed += 1
        return True

    def resume_matches_reference(self, files: tuple[str, ...], stages: tuple[str, ...]) -> None:
        assert self.killed >= 1, "no kill landed before the run finished"
        _finish(_cli(self.config, self.out))
        _assert_resumed_identical(self.ref, self.out, files, stages,
                                  f"{self.killed} kills (its fault seed is printed above)")


@pytest.fixture(autouse=True)
def _no_ray_oom_killer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The subprocess runs inherit it; the faults injected here are SIGKILL, node loss and bad files.
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")


@pytest.fixture
def fault_rng() -> random.Random:
    """Where the kills land: a fresh seed each run, printed so that FF_FAULT_SEED replays a failure."""
    seed = int(os.environ.get("FF_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))
    print(f"fault seed {seed} (FF_FAULT_SEED={seed} replays it)")
    return random.Random(seed)




@pytest.fixture
def kill_drill(tmp_path: Path, fault_rng: random.Random) -> Callable[[dict[str, Any]], KillDrill]:
    """``kill_drill(raw_config)``: runs the reference, returns the drill for that config."""
    return lambda raw: KillDrill(tmp_path, raw, fault_rng)
