"""The one submit / collect / retry loop for Ray tasks the driver waits on (global stages, export, the
run's tables). Per-shard stage work goes through the scheduler instead (pipeline/engine/scheduler.py),
which needs bisection and actor bookkeeping on top of the same classification.

Each call is submitted, results come back in call order, and a failure is answered by
``faults.classify``: work Ray lost or a transient failure is submitted again (a fresh task), up to
``attempts`` in all; a permanent failure (the work raised) ends the loop at once, since the same inputs
give the same answer. Either way the pending tasks are cancelled and ``error`` is raised with one line
naming the step, the task and what it raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ray

from pipeline.engine.faults import Fault, classify, describe

log = logging.getLogger(__name__)
MAX_TASK_ATTEMPTS = 3
SYSTEM_RETRIES = 2  # Ray's own re-runs of a task whose worker or node died, before the driver sees it


class TaskFailedError(RuntimeError):
    """A task failed for good: permanently, or every attempt was lost or transient."""


def task_options(num_cpus: float, memory_bytes: int = 0, num_gpus: float = 0.0, **extra: Any) -> dict[str, Any]:
    """Ray options of a driver-awaited task: the declared CPU, GPU and memory (Ray schedules by them and
    its memory monitor kills the task, not the node, when it grows past them) and Ray's own re-runs of
    lost work."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": SYSTEM_RETRIES}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if memory_bytes > 0:
        opts["memory"] = int(memory_bytes)
    opts.update(extra)
    return opts


def run_tasks(what: str, n: int, submit: Callable[[int, bool], Any], *, kept: bool = False,
              attempts: int = MAX_TASK_ATTEMPTS, error: type[TaskFailedError] = TaskFailedError) -> list[Any]:
    """Run ``n`` tasks and return their results in call order.

    ``submit(i, fresh)`` starts task ``i`` and returns its ref (``fresh``: a retry, which must not go to a
    parked actor that may be the one that failed). ``kept``: the task has two returns; the driver fetches
    the first and gets ``(first, ref of the second)``, the second staying in the object store."""
    out: list[Any] = [None] * n
    tries = [1] * n
    pending: dict[Any, tuple[int, Any]] = {}

    def start(i: int, fresh: bool) -> None:
        refs = submit(i, fresh)
        first, second = (refs[0], refs[1]) if kept else (refs, None)
        pending[first] = (i, second)

    for i in range(n):
        start(i, False)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i, second = pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as exc:  # every failure is classified; none ends the loop unseen
                fault = classify(exc)
                if fault == Fault.PERMANENT or tries[i] >= attempts:
                    _cancel(pending)
                    raise error(f"{what} task {i} failed, attempt {tries[i]} of {attempts}: {fault} "
                                f"({type(exc).__name__}): {_last_line(exc)}") from exc
                tries[i] += 1
                log.info("%s task %d: %s failure (%s), attempt %d", what, i, fault, type(exc).__name__, tries[i])
                start(i, True)
                continue
            out[i] = (value, second) if kept else value
    return out


def run_calls(what: str, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], options: dict[str, Any], *,
              kept: bool = False, error: type[TaskFailedError] = TaskFailedError) -> list[Any]:
    """``run_tasks`` over plain Ray tasks: ``fn(*call)`` for each call."""
    remote = ray.remote(fn).options(**options, **({"num_returns": 2} if kept else {}))
    return run_tasks(what, len(calls), lambda i, _fresh: remote.remote(*calls[i]), kept=kept, error=error)


def _cancel(pending: dict[Any, Any]) -> None:
    for other in pending:
        try:
            ray.cancel(other, force=True)
        except ValueError:  # a task on an actor (a parked worker) cannot be force-killed alone
            ray.cancel(other)


def _last_line(exc: BaseException) -> str:
    text = describe(exc).strip()
    return (text.splitlines()[-1] if text else type(exc).__name__)[:500]
