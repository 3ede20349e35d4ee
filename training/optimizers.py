"""Optimizer and learning-rate schedule, as a pure function of the step so resume needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from training.config import OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Linear warmup, then poly (power 2, as arcface_torch), cosine, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "poly":
        return cfg.lr * (1.0 - progress) ** 2
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
