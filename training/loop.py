"""The loop every training job runs on each Ray Train worker.

A trainer says what differs between jobs: the network and how a checkpoint restores it, the sample
decoder, the loss, the tensors a checkpoint holds and the evaluation. The rest is one rule for all:
seeds (identical initial weights on every rank, augmentation draws that differ per rank), resume,
optimizer, learning-rate schedule, the step count (epochs converted with the split's sample count, so
every DDP rank stops at the same step), mixed precision, logging, the checkpoint cadence and the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import ray.train.torch
import torch
from torch import nn

from training.checkpoints import Checkpoint, restore_optimizer, save_checkpoint
from training.config import RunLength
from training.ddp import ddp_consistency, parameters_digest, setup_worker, unwrap
from training.export_index import load_export
from training.job_layout import TrainResult, find_resume, job_dir, write_json
from training.optimizers import build_optimizer, lr_at, set_lr
from training.shard_loader import Sample, ShardStream, make_loader
from training.step_log import StepLog

# (input, target) on the worker's device and the step about to run -> the loss to minimise.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Precision:
    """Mixed precision on CUDA: the autocast type, and whether the loss is scaled (float16 gradients
    underflow without it; bfloat16 has float32's range)."""

    dtype: torch.dtype
    scaled: bool


@dataclass
class Trained:
    """Where a worker's loop stopped."""

    step: int
    total: int
    checkpoint: str | None
    log: StepLog
    ddp_check: list[dict[str, Any]] | None = None


class WorkerJob:
    """One worker's view of a training job: its validated config, where it writes, the export split it
    trains on and its rank."""

    def __init__(self, loop_config: dict[str, Any], config_model: type[RunLength], kind: str) -> None:
        # Any: the trainer's own config model (its data, model and optimizer sections).
        self.cfg: Any = cast(Any, config_model.model_validate(loop_config["config"]))
        self.kind = kind
        self.run_dir: str = loop_config["run_dir"]
        data = self.cfg.data
        self.storage: dict[str, Any] = data.storage_options
        self.worker = setup_worker(self.cfg.scaling)
        self.export = load_export(data.export, self.storage)
        self.split = self.export.split(data.train_split)
        self.jdir = job_dir(self.run_dir, self.cfg.job)
        self.start_step = 0

    def train(
        self,
        build: Callable[[], nn.Module],
        restore: Callable[[nn.Module, Checkpoint], None],
        decoder: Callable[[Sample], Any],
        loss: LossFn,
        tensors: Callable[[nn.Module], dict[str, dict[str, torch.Tensor]]],
        precision: Precision,
        lineage: dict[str, Any] | None = None,
        ddp_check: bool = False,
    ) -> tuple[nn.Module, Trained]:
        """Build (or resume) the network and run the steps; returns the DDP-wrapped model and where the
        loop stopped. ``tensors`` are what a checkpoint stores of the unwrapped model; ``lineage`` is
        added to every checkpoint's metadata."""
        cfg, worker = self.cfg, self.worker
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        net = build()
        resume = find_resume(self.jdir, cfg, self.kind, self.export.sha256)
        if resume is not None:
            restore(net, resume)
            self.start_step = resume.step
        model = ray.train.torch.prepare_model(net)
        optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        if resume is not None:
            restore_optimizer(optimizer, resume)

        global_batch = cfg.data.batch_size * worker.world_size
        steps_per_epoch = max(1, self.split.samples // global_batch)
        total = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
        stream = ShardStream(
            self.split.shards,
            decoder,
            rank=worker.rank,
            world_size=worker.world_size,
            seed=cfg.seed * 1_000_003 + self.start_step,
            shuffle_buffer=cfg.data.shuffle_buffer,
            start_epoch=self.start_step // steps_per_epoch,
            storage_options=self.storage,
        )
        loader = make_loader(stream, cfg.data.batch_size, cfg.data.loader_workers)
        # Augmentation draws differ per rank.
        torch.manual_seed(cfg.seed + 7919 * (worker.rank + 1) + self.start_step)

        amp = cfg.amp and worker.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=amp and precision.scaled)
        if resume is not None and scaler.is_enabled() and resume.meta.get("grad_scaler"):
            scaler.load_state_dict(resume.meta["grad_scaler"])
        log = StepLog(cfg, self.kind, worker, self.run_dir, total, self.start_step, global_batch,
                      steps_per_epoch, self.storage)
        meta = {
            "kind": self.kind,
            "job": cfg.job,
            "config": cfg.model_dump(mode="json"),
            "export": self.export.lineage(),
            "world_size": worker.world_size,
            **(lineage or {}),
        }

        def checkpoint(step: int) -> str:
            scaled = {"grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}
            return save_checkpoint(
                self.jdir,
                step,
                tensors(unwrap(model)),
                {**meta, **scaled} if precision.scaled else meta,
                optimizer=optimizer,
                keep=cfg.checkpoint.keep,
                storage_options=self.storage,
            )

        digest_before = parameters_digest(model) if ddp_check else ""
        done = Trained(self.start_step, total, resume.path if resume is not None else None, log)
        model.train()
        batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]] = (
            iter(loader) if done.step < total else iter(())
        )
        for inputs, targets, keys in batches:
            inputs = inputs.to(worker.device, non_blocking=True)
            targets = targets.to(worker.device, non_blocking=True)
            lr = lr_at(done.step, total, cfg.optimizer)
            set_lr(optimizer, lr)
            with torch.autocast(device_type=worker.device.type, dtype=precision.dtype, enabled=amp):
                value = loss(model, inputs, targets, done.step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()  # a disabled scaler passes the loss and the step through
            if cfg.optimizer.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            done.step += 1
            if ddp_check and done.ddp_check is None:
                done.ddp_check = ddp_consistency(model, digest_before, list(keys), worker.rank)
                if worker.is_chief:
                    write_json(f"{self.jdir}/ddp_check.json", done.ddp_check, self.storage)
            log.after_step(done.step, float(value.detach()), lr)
            if log.checkpoint_due(done.step):
                if worker.is_chief:
                    done.checkpoint = checkpoint(done.step)
                log.after_checkpoint(done.step)
            if done.step >= total:
                break
        log.finish(done.step)
        del batches, loader  # stop loader worker processes before evaluation
        return model, done

    def result(self, done: Trained, evaluation: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's summary of the job, as ``train_*`` return it."""
        return TrainResult(
            job=self.cfg.job,
            kind=self.kind,
            run_dir=self.run_dir,
            job_dir=self.jdir,
            start_step=self.start_step,
            final_step=done.step,
            total_steps=done.total,
            checkpoint=done.checkpoint,
            export_sha256=self.export.sha256,
            world_size=self.worker.world_size,
            wall_s=0.0,
            last_loss=done.log.last_loss,
            eval=evaluation,
            ddp_check=done.ddp_check,
        ).to_dict()
