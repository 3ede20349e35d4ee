"""Per-step bookkeeping shared by the training loops: loss window, progress line, metrics, cadence.

Every rank calls ``after_step`` and ``after_checkpoint`` at the same steps (they contain
collectives: the loss mean across ranks, and Ray Train's report, which is a barrier); only rank 0
prints and writes.
"""

from __future__ import annotations

from typing import Any

import ray.train

from training.config import RunLength
from training.ddp import WorkerInfo, mean_across_ranks
from training.metrics_store import MetricsWriter
from training.progress import ProgressReporter


class StepLog:
    def __init__(
        self,
        cfg: RunLength,
        kind: str,
        worker: WorkerInfo,
        run_dir: str,
        total_steps: int,
        start_step: int,
        global_batch: int,
        steps_per_epoch: int,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.worker = cfg, worker
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.writer = MetricsWriter(run_dir, cfg.job, kind, storage_options) if worker.is_chief else None
        self.progress = ProgressReporter(
            cfg.job, total_steps, start_step, global_batch, enabled=worker.is_chief
        )
        self.last_loss: float | None = None
        self._sum, self._n = 0.0, 0

    def after_step(self, step: int, loss: float, lr: float) -> None:
        self._sum += loss
        self._n += 1
        if step % self.cfg.log_every and step != self.total_steps:
            return
        self.last_loss = mean_across_ranks(self._sum / self._n, self.worker.device)
        self._sum, self._n = 0.0, 0
        rates = self.progress.update(step, self.last_loss, lr)
        if self.writer is not None:
            self.writer.log(
                step, {"loss": self.last_loss, "lr": lr, **rates}, epoch=step / self.steps_per_epoch
            )

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0 or step == self.total_steps

    def after_checkpoint(self, step: int) -> None:
        """Metrics of the committed steps become visible; all ranks meet at Ray's report."""
        if self.writer is not None:
            self.writer.flush()
        loss = self.last_loss if self.last_loss is not None else float("nan")
        ray.train.report({"step": step, "loss": loss})

    def log_eval(self, step: int, values: dict[str, Any], dataset: str) -> None:
        if self.writer is None:
            return
        numeric = {
            k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.writer.log(step, numeric, phase="eval", dataset=dataset)
        self.writer.flush(tag="eval")

    def finish(self, step: int) -> float:
        return self.progress.finish(step)
