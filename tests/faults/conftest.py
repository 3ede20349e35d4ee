"""Fault runs on a shared machine: Ray's own out-of-memory killer must not be the fault under test."""

from __future__ import annotations

import os
import random

import pytest


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
