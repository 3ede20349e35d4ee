"""``facefoundry train recognition``: IResNet + margin softmax on the exported shards, on Ray Train.

The loop counts optimizer steps (epochs are converted with the split's sample count), so every DDP
rank stops at the same step. Rank 0 logs, writes checkpoints and metrics, and at the end verifies
the model on the export's held-out identities. A new invocation with the same job name resumes
from the latest checkpoint (the loader's order is re-drawn from the resumed step, as arcface_torch
does; exact replay of the sample stream is not attempted).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.augmentations import recognition_train_transform
from training.checkpoints import Checkpoint
from training.config import RecognitionTrainConfig
from training.ddp import WorkerInfo, unwrap
from training.export_index import ExportError, ExportIndex, load_export
from training.job_layout import TrainResult, write_json
from training.loop import Precision, WorkerJob
from training.ray_launch import absolute_url, launch_job
from training.recognition_model import RecognitionModule, build_recognition_module
from training.shard_loader import RecognitionDecoder
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
    job = WorkerJob(loop_config, RecognitionTrainConfig, KIND)
    cfg: RecognitionTrainConfig = job.cfg
    classes = job.split.identities
    model, done = job.train(
        build=lambda: build_recognition_module(cfg, num_classes=classes),
        restore=_restore,
        decoder=RecognitionDecoder(recognition_train_transform(cfg.data.augment, cfg.data.input_size)),
        loss=_margin_loss,
        tensors=_tensors,
        precision=Precision(torch.float16, scaled=True),
        lineage={"num_classes": classes},
        ddp_check=cfg.ddp_check,
    )
    if not job.worker.is_chief:
        return None
    backbone = unwrap(model).backbone
    assert isinstance(backbone, nn.Module)
    return job.result(done, _evaluate(backbone, job.export, cfg, job.worker, done.step, job.jdir, done.log))


def _restore(module: nn.Module, checkpoint: Checkpoint) -> None:
    assert isinstance(module, RecognitionModule)
    module.backbone.load_state_dict(checkpoint.tensors["model"])
    module.head.load_state_dict(checkpoint.tensors["head"])


def _margin_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
    unwrap(model).head.step = step  # type: ignore[union-attr]  # head is the margin module
    loss: torch.Tensor = model(images, labels)
    return loss


def _tensors(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    assert isinstance(module, RecognitionModule)
    return {"model": module.backbone.state_dict(), "head": module.head.state_dict()}


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
