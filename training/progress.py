"""Progress lines for training: steps/s, images/s, loss, learning rate and ETA, printed by rank 0.

Lines rather than a live bar: Ray forwards worker stdout to the driver line by line, where a
redrawing bar would interleave with other workers' logs. Rates are over the last window, so a slow
first step (compilation, loader start) does not distort the ETA for long.
"""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console

from pipeline.terminal import console as make_console
from pipeline.terminal import styled


class ProgressReporter:
    def __init__(
        self,
        job: str,
        total_steps: int,
        start_step: int,
        global_batch: int,
        enabled: bool = True,
        console: Console | None = None,
    ) -> None:
        self.job, self.total_steps, self.global_batch = job, total_steps, global_batch
        self.enabled = enabled
        self.console = console or make_console(soft_wrap=True)
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._start_step, self._start_time = start_step, self._last_time
        self.steps_per_s = 0.0

    def update(
        self, step: int, loss: float, lr: float, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Returns the rates it measured (logged as metrics too)."""
        now = time.perf_counter()
        steps = step - self._last_step
        self.steps_per_s = steps / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        remaining = max(self.total_steps - step, 0)
        eta = timedelta(seconds=int(remaining / self.steps_per_s)) if self.steps_per_s > 0 else "?"
        rates = {"steps_per_s": self.steps_per_s, "samples_per_s": self.steps_per_s * self.global_batch}
        if self.enabled:
            parts = [
                f"step {step}/{self.total_steps}",
                f"loss {loss:.4f}",
                f"lr {lr:.2e}",
                f"{self.steps_per_s:.2f} steps/s",
                f"{rates['samples_per_s']:.0f} img/s",
                f"ETA {eta}",
            ]
            parts += [f"{k} {v:.4g}" for k, v in (extra or {}).items()]
            self.console.print(styled((self.job, "bold"), " ", " | ".join(parts)))
        return rates

    def finish(self, step: int) -> float:
        elapsed = time.perf_counter() - self._start_time
        if self.enabled:
            self.console.print(styled((self.job, "bold"), f" done: {step - self._start_step} steps in {elapsed:.1f}s"))
        return elapsed
