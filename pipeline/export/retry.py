"""Retries for the tables and export tasks (until the engine's fault classification lands).

Ray itself re-runs a task whose worker died, was killed for memory or lost its node
(``max_retries``); ``retry_exceptions`` adds transient storage errors raised inside a task. What
still reaches the driver is any ``ray.exceptions.RayError``: the caller retries it a few more
times, then records the failure (a history row), never a bare traceback.
"""

from __future__ import annotations

from typing import Any

import ray.exceptions

# Every failure Ray reports: task errors, worker crashes, out-of-memory kills, node deaths, lost objects.
RETRYABLE: tuple[type[BaseException], ...] = (ray.exceptions.RayError,)
SYSTEM_RETRIES = 3
DRIVER_ATTEMPTS = 3


def remote_options(num_cpus: float, memory_bytes: int, **extra: Any) -> dict[str, Any]:
    """Task options: the declared CPU and memory (Ray schedules by them and its memory monitor
    kills the task, not the node, when it grows past them), and retries of system failures and of
    transient I/O errors."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": SYSTEM_RETRIES,
                            "retry_exceptions": [OSError, TimeoutError]}
    if memory_bytes > 0:
        opts["memory"] = int(memory_bytes)
    opts.update(extra)
    return opts
