"""The last streaming phase's actors, kept for the run's closing steps (compaction, the run tables).

When the last shard of a run is committed, its actors are idle processes that already hold pyarrow,
fsspec and this package. A Ray task at that moment needs a new worker process instead (Python, Ray
and the same imports: seconds on a small machine), and the run's end waits for it. So the executor
parks those actors (their stages torn down, their models released) and the closing steps run on
them through :class:`WarmWorkers`, which hands back Ray object refs exactly as a task would, so the
callers' wait-and-retry loops do not change. Retries and runs without parked actors use plain tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import ray


class WarmWorkers:
    """Round-robin over parked actors, else a Ray task with the given options."""

    def __init__(self, actors: list[Any] | None = None) -> None:
        self.actors = list(actors or [])
        self._next = 0

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, fn: Callable[..., Any], *args: Any, options: dict[str, Any] | None = None,
               fresh: bool = False, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the next parked actor; ``fresh`` (a retry) or no actor: a task."""
        if self.actors and not fresh:
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            return actor.call.remote(fn, args, kwargs)
        return ray.remote(fn).options(**(options or {})).remote(*args, **kwargs)

    def close(self) -> None:
        """The cluster's resources go back before anything that needs them (the export) starts."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(actor)
        self.actors = []
