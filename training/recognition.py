"""``facefoundry train recognition``: IResNet + margin softmax on the exported shards, on Ray Train.

The loop counts optimizer steps (epochs are converted with the split's sample count), so every DDP
rank stops at the same step. Rank 0 logs, writes checkpoints and metrics, and at the end verifies
the model on the export's held-out identities. A new invocation with the same job name resumes
from the latest checkpoint (the loader's order is re-drawn from the resumed step, as arcface_torch
does; exact replay of the sample stream is not attempted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from training.augmentations import recognition_train_transform
from training.checkpoints import restore_optimizer, save_checkpoint
from training.config import RecognitionTrainConfig
from training.ddp import (
    WorkerInfo,
    ddp_consistency,
    parameters_digest,
    setup_worker,
    unwrap,
)
from training.export_index import ExportError, ExportIndex, load_export
from training.job_layout import TrainResult, find_resume, job_dir, write_json
from training.optimizers import build_optimizer, lr_at, set_lr
from training.ray_launch import absolute_url, launch_job
from training.recognition_model import RecognitionModule, build_recognition_module
from training.shard_loader import RecognitionDecoder, ShardStream, make_loader
from training.step_log import StepLog
from training.verification import evaluate_on_export

KIND = "recognition"


def train_recognition(config: RecognitionTrainConfig, new: bool = False) -> TrainResult:
    """Train (or resume; with ``new``, start the job over) a recognition model; returns rank 0's
    summary. Ray must be reachable (``ray.init`` done by the caller, or Ray starts a local instance)
    unless scaling.num_workers is 0."""
    export = load_export(config.data.export, config.data.storage_options)
    run_dir = absolute_url(config.output_dir or export.run_dir)
    config = config.model_copy(
        update={
            "data": config.data.model_copy(update={"export": absolute_url(config.data.export)}),
            "output_dir": run_dir,
        }
    )
    split = export.split(config.data.train_split)
    if split.identities < 2:
        raise ExportError(
            f"split {split.name!r} has {split.identities} identities; training needs two or more"
        )
    return launch_job(recognition_train_loop, config, KIND, export.sha256, run_dir, new)


def recognition_train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker; returns the summary on rank 0 and None elsewhere."""
    cfg = RecognitionTrainConfig.model_validate(loop_config["config"])
    run_dir = loop_config["run_dir"]
    storage = cfg.data.storage_options
    worker = setup_worker(cfg.scaling)
    export = load_export(cfg.data.export, storage)
    split = export.split(cfg.data.train_split)
    jdir = job_dir(run_dir, cfg.job)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    module = build_recognition_module(cfg, num_classes=split.identities)
    resume = find_resume(jdir, cfg, KIND, export.sha256)
    start_step = 0
    if resume is not None:
        module.backbone.load_state_dict(resume.tensors["model"])
        module.head.load_state_dict(resume.tensors["head"])
        start_step = resume.step
    model = ray.train.torch.prepare_model(module)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    if resume is not None:
        restore_optimizer(optimizer, resume)

    global_batch = cfg.data.batch_size * worker.world_size
    steps_per_epoch = max(1, split.samples // global_batch)
    total = cfg.max_steps or math.ceil((cfg.epochs or 1.0) * steps_per_epoch)
    stream = ShardStream(
        split.shards,
        RecognitionDecoder(recognition_train_transform(cfg.data.augment, cfg.data.input_size)),
        rank=worker.rank,
        world_size=worker.world_size,
        seed=cfg.seed * 1_000_003 + start_step,
        shuffle_buffer=cfg.data.shuffle_buffer,
        start_epoch=start_step // steps_per_epoch,
        storage_options=storage,
    )
    loader = make_loader(stream, cfg.data.batch_size, cfg.data.loader_workers)
    torch.manual_seed(cfg.seed + 7919 * (worker.rank + 1) + start_step)  # augmentation draws differ per rank

    amp = cfg.amp and worker.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if resume is not None and amp and resume.meta.get("grad_scaler"):
        scaler.load_state_dict(resume.meta["grad_scaler"])
    log = StepLog(cfg, KIND, worker, run_dir, total, start_step, global_batch, steps_per_epoch, storage)
    lineage = {
        "kind": KIND,
        "job": cfg.job,
        "config": cfg.model_dump(mode="json"),
        "export": export.lineage(),
        "world_size": worker.world_size,
        "num_classes": split.identities,
    }
    digest_before = parameters_digest(model) if cfg.ddp_check else ""
    ddp_report: list[dict[str, Any]] | None = None
    step, last_ckpt = start_step, (resume.path if resume is not None else None)
    model.train()
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]] = iter(loader) if step < total else iter(())
    for images, labels, keys in batches:
        images = images.to(worker.device, non_blocking=True)
        labels = labels.to(worker.device, non_blocking=True)
        lr = lr_at(step, total, cfg.optimizer)
        set_lr(optimizer, lr)
        unwrap(model).head.step = step  # type: ignore[union-attr]  # head is the margin module
        with torch.autocast(device_type=worker.device.type, dtype=torch.float16, enabled=amp):
            loss = model(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optimizer.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if cfg.ddp_check and ddp_report is None:
            ddp_report = ddp_consistency(model, digest_before, list(keys), worker.rank)
            if worker.is_chief:
                write_json(f"{jdir}/ddp_check.json", ddp_report, storage)
        log.after_step(step, float(loss.detach()), lr)
        if log.checkpoint_due(step):
            if worker.is_chief:
                last_ckpt = _checkpoint(model, optimizer, scaler, jdir, step, lineage, cfg)
            log.after_checkpoint(step)
        if step >= total:
            break
    log.finish(step)
    del batches, loader  # stop loader worker processes before evaluation

    if not worker.is_chief:
        return None
    backbone = unwrap(model).backbone
    assert isinstance(backbone, nn.Module)
    eval_result = _evaluate(backbone, export, cfg, worker, step, jdir, log)
    return TrainResult(
        job=cfg.job,
        kind=KIND,
        run_dir=run_dir,
        job_dir=jdir,
        start_step=start_step,
        final_step=step,
        total_steps=total,
        checkpoint=last_ckpt,
        export_sha256=export.sha256,
        world_size=worker.world_size,
        wall_s=0.0,
        last_loss=log.last_loss,
        eval=eval_result,
        ddp_check=ddp_report,
    ).to_dict()


def _checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    jdir: str,
    step: int,
    lineage: dict[str, Any],
    cfg: RecognitionTrainConfig,
) -> str:
    inner: RecognitionModule = unwrap(model)  # type: ignore[assignment]
    meta = {**lineage, "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}
    tensors = {"model": inner.backbone.state_dict(), "head": inner.head.state_dict()}
    return save_checkpoint(
        jdir,
        step,
        tensors,
        meta,
        optimizer=optimizer,
        keep=cfg.checkpoint.keep,
        storage_options=cfg.data.storage_options,
    )


def _evaluate(
    backbone: torch.nn.Module,
    export: ExportIndex,
    cfg: RecognitionTrainConfig,
    worker: WorkerInfo,
    step: int,
    jdir: str,
    log: StepLog,
) -> dict[str, Any] | None:
    split = cfg.data.eval_split
    if (
        split is None
        or split not in export.split_names
        or not export.manifest["splits"][split].get("samples")
    ):
        return None
    result = evaluate_on_export(
        backbone, export, split, cfg.eval, cfg.data.input_size, worker.device, cfg.seed
    )
    backbone.train()
    write_json(f"{jdir}/eval/verification-step-{step:08d}.json", result, cfg.data.storage_options)
    log.log_eval(step, result, result["dataset"])
    return result
