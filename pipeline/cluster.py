"""Connecting to Ray and sizing stage actors so that every phase fits the cluster.

On a 2-core laptop a naive "1 CPU per actor" plan deadlocks as soon as two stages are alive at
once. Stages alive together (one phase) split the cluster's CPUs between them; Ray CPU requests are
logical, so fractional requests are fine, and an idle stage leaves its cores to the busy ones.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import ray

from stages.base import Resources


class ClusterFitError(RuntimeError):
    pass


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local embedded Ray (and so owns it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                        "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        import manifests
        import pipeline
        import stages

        if os.environ.get("FACEFOUNDRY_UPLOAD_CODE", "1") == "1":
            env["py_modules"] = [pipeline, stages, manifests]
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    tmp = os.environ.get("FACEFOUNDRY_RAY_TMP") or tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _temp_dir=tmp,
             runtime_env=env, log_to_driver=True, configure_logging=False)
    return True


@dataclass(frozen=True)
class ActorPlan:
    workers: int
    num_cpus: float
    num_gpus: float
    memory: int | None


def cluster_totals() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def plan_actors(stages: list[tuple[str, Resources, int | None]], cpus: float, gpus: float) -> dict[str, ActorPlan]:
    """Split the cluster between the stages alive in one phase.

    GPU stages get whole (or declared fractional) GPUs, as many actors as fit. CPU shares are equal
    per stage; each stage's per-actor request is its declared CPUs capped at its share, and it gets as
    many actors as its share holds (at least one), bounded by the stage's ``workers`` setting.
    """
    if not stages:
        return {}
    share = cpus / len(stages)
    out: dict[str, ActorPlan] = {}
    for stage_id, res, max_workers in stages:
        if res.gpus > 0:
            if gpus < res.gpus:
                raise ClusterFitError(
                    f"stage {stage_id!r} declares gpus={res.gpus} but the cluster has {gpus:g} GPU(s); "
                    f"run it on a GPU cluster (--address) or set stages.{stage_id}.resources.gpus=0"
                )
            n = max(1, math.floor(gpus / res.gpus + 1e-9))
            cpu_req = min(res.cpus, share / n)
        else:
            cpu_req = min(res.cpus, share) if res.cpus > 0 else 0.0
            n = max(1, math.floor(share / cpu_req + 1e-9)) if cpu_req > 0 else 1
        if max_workers is not None:
            n = min(n, max_workers)
        memory = int(res.memory_gb * 2**30) if res.memory_gb > 0 else None
        out[stage_id] = ActorPlan(workers=n, num_cpus=round(cpu_req, 4), num_gpus=res.gpus, memory=memory)
    return out
