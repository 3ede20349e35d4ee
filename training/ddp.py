"""Worker-side facts and collectives of a Ray Train (DDP) worker, valid in local mode too.

Every helper here is a collective when DDP is on: all ranks call it at the same step, or none do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from training.config import ScalingConfig


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def setup_worker(scaling: ScalingConfig) -> WorkerInfo:
    if scaling.torch_threads:
        torch.set_num_threads(scaling.torch_threads)
    ctx = ray.train.get_context()
    return WorkerInfo(
        rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=ray.train.torch.get_device()
    )


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(module: nn.Module) -> nn.Module:
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    assert isinstance(inner, nn.Module)
    return inner


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def gather(obj: Any) -> list[Any]:
    """Every rank's object, on every rank."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameters_digest(module: nn.Module) -> str:
    """sha256 over every parameter's bytes (not buffers: BatchNorm running stats are per rank in DDP)."""
    h = hashlib.sha256()
    for name, p in unwrap(module).named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def ddp_consistency(module: nn.Module, before: str, batch_keys: list[str], rank: int) -> list[dict[str, Any]]:
    """After a step: each rank's parameter digest and the samples it trained on. With gradients
    all-reduced, digests are equal although every rank saw different samples."""
    mine = {
        "rank": rank,
        "params_before": before,
        "params_after": parameters_digest(module),
        "batch_keys": list(batch_keys),
    }
    return sorted(gather(mine), key=lambda r: r["rank"])
