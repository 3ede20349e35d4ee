"""Fault runs on a shared machine: Ray's own out-of-memory killer must not be the fault under test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray_oom_killer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The subprocess runs inherit it; the faults injected here are SIGKILL, node loss and bad files.
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
