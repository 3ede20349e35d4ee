"""The recognition network as trained (backbone + margin head) and as used (backbone from a checkpoint)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.checkpoints import CheckpointError, load_checkpoint
from training.config import RecognitionTrainConfig
from training.iresnet import IResNet, build_iresnet
from training.margin_losses import MarginSoftmaxHead, margin_from_config


class RecognitionModule(nn.Module):
    """One module so DDP wraps both parts: ``loss = module(images, labels)``."""

    def __init__(self, backbone: IResNet, head: MarginSoftmaxHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


def build_recognition_module(cfg: RecognitionTrainConfig, num_classes: int) -> RecognitionModule:
    backbone = build_iresnet(cfg.model.name, cfg.model.embedding_size, cfg.data.input_size, cfg.model.dropout)
    loss = cfg.loss
    margin = margin_from_config(loss.kind, loss.scale, loss.m1, loss.m2, loss.m3)
    head = MarginSoftmaxHead(cfg.model.embedding_size, num_classes, margin, loss.sample_rate)
    return RecognitionModule(backbone, head)


def load_backbone(
    checkpoint: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[IResNet, dict[str, Any]]:
    """The embedding network of a recognition checkpoint (checkpoint or job folder), in eval mode."""
    ckpt = load_checkpoint(checkpoint, storage_options, stems=("model",))
    if ckpt.meta.get("kind") != "recognition":
        raise CheckpointError(f"{ckpt.path}: not a recognition checkpoint (kind {ckpt.meta.get('kind')!r})")
    cfg = RecognitionTrainConfig.model_validate(ckpt.config)
    backbone = build_iresnet(cfg.model.name, cfg.model.embedding_size, cfg.data.input_size, cfg.model.dropout)
    backbone.load_state_dict(ckpt.tensors["model"])
    return backbone.to(device).eval(), {**ckpt.meta, "checkpoint_path": ckpt.path}
