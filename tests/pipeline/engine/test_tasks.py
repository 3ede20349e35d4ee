"""The one driver-side task loop: work Ray lost and transient failures are run again, a task that raises
is not, and every result comes back in call order. Real Ray tasks, real worker deaths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.engine.tasks import TaskFailedError, run_calls, task_options
from stages.base import TransientError

pytestmark = pytest.mark.usefixtures("ray_session")


def _count(marker: Path) -> int:
    """How many times this task ran before (one byte appended per run)."""
    with open(marker, "ab") as f:
        f.write(b".")
    return marker.stat().st_size - 1


def _dies_once(marker: str, value: int) -> int:
    if _count(Path(marker)) == 0:
        os._exit(17)  # the worker process dies: Ray reports the work lost
    return value


def _down_once(marker: str, value: int) -> int:
    if _count(Path(marker)) == 0:
        raise TransientError("model server at 127.0.0.1:9 refused the connection")
    return value


def _raises(marker: str, value: int) -> int:
    _count(Path(marker))
    raise ValueError(f"bad params {value}")


def test_a_worker_that_dies_and_a_server_that_is_down_are_retried_and_results_keep_call_order(
        tmp_path: Path) -> None:
    # max_retries=0: Ray itself re-runs nothing, so the second run is the loop's.
    opts = task_options(0.5, max_retries=0)
    died = run_calls("test", _dies_once, [(str(tmp_path / f"d{i}"), i) for i in range(3)], opts)
    down = run_calls("test", _down_once, [(str(tmp_path / f"t{i}"), 10 + i) for i in range(3)], opts)
    assert died == [0, 1, 2] and down == [10, 11, 12]
    assert all((tmp_path / f"d{i}").stat().st_size == 2 for i in range(3))  # each really died once


def test_a_task_that_raises_fails_at_once_with_what_it_raised(tmp_path: Path) -> None:
    with pytest.raises(TaskFailedError, match=r"step task 0 failed, attempt 1 of 3: permanent .*bad params 7"):
        run_calls("step", _raises, [(str(tmp_path / "p"), 7)], task_options(0.5, max_retries=0))
    assert (tmp_path / "p").stat().st_size == 1  # run once, never again
