"""Connecting to Ray and sizing stage actors so that every phase fits the cluster.

On a 2-core laptop a naive "1 CPU per actor" plan deadlocks as soon as two stages are alive at
once. Stages alive together (one phase) split the cluster's CPUs between them; Ray CPU requests are
logical, so fractional requests are fine, and an idle stage leaves its cores to the busy ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.engine import embedded
from stages.base import Resources


class ClusterFitError(RuntimeError):
    pass


class ClusterConnectError(RuntimeError):
    pass


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """``ray.init`` installs two SIGTERM handlers of its own: a Python one (``sys.exit``) and, under it,
    the C++ failure handler of its core worker, which prints a stack dump of every thread. Afterwards
    the Python handler the process had before (the CLI's clean stop) is put back, else Ray's Python
    one, so that SIGTERM is handled in Python and no dump is printed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local embedded Ray (and so owns it)."""
    if ray.is_initialized():
        return False
    with _sigterm_kept():
        return _connect(address, num_cpus)


def _connect(address: str | None, num_cpus: int | None) -> bool:
    address = address or os.environ.get("RAY_ADDRESS")
    env: dict[str, Any] = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                        "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        import facekit
        import manifests
        import pipeline
        import stages
        import training

        if os.environ.get("FACEFOUNDRY_UPLOAD_CODE", "1") == "1":
            env["py_modules"] = [pipeline, stages, manifests, facekit, training]
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types here
            raise ClusterConnectError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        return False
    tmp = os.environ.get("FACEFOUNDRY_RAY_TMP") or tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    embedded.start(num_cpus=num_cpus or os.cpu_count() or 1, _temp_dir=tmp, runtime_env=env, log_to_driver=True,
                   configure_logging=False)
    return True


def shutdown() -> None:
    """Stop the embedded Ray that :func:`connect` started (see ``embedded.stop``)."""
    embedded.stop()


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray for one command: connected on entry, and stopped on exit when this call started it (a
    cluster it only joined keeps running). Yields whether it owns the Ray."""
    owns = connect(address, num_cpus)
    try:
        yield owns
    finally:
        if owns:
            shutdown()


@dataclass(frozen=True)
class ActorPlan:
    initial: int  # actors started with the phase
    maximum: int  # actors the stage may grow to while it has a backlog
    num_cpus: float
    num_gpus: float
    memory: int | None


def cluster_totals() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def plan_actors(stages: list[tuple[str, Resources, int | None]], cpus: float, gpus: float
                ) -> tuple[dict[str, ActorPlan], int]:
    """Size the actor pools of the stages alive in one phase; returns the plans and the actor budget.

    GPU stages get as many actors as the GPUs hold, from the start. CPU stages start with one actor
    and grow towards one per core while they have a backlog (the runner adds actors to the stage whose
    ready shards wait), so cheap stages do not hold cores that an expensive one needs. Every actor's
    CPU request is capped at cpus / budget, so the whole budget always fits: no deadlock on 2 cores.
    """
    if not stages:
        return {}, 0
    cores = max(1, math.floor(cpus + 1e-9))
    budget = len(stages) + cores
    cap_req = cpus / budget
    out: dict[str, ActorPlan] = {}
    for stage_id, res, max_workers in stages:
        if res.gpus > 0:
            if gpus < res.gpus:
                raise ClusterFitError(
                    f"stage {stage_id!r} declares gpus={res.gpus} but the cluster has {gpus:g} GPU(s); "
                    f"run it on a GPU cluster (--address) or set stages.{stage_id}.resources.gpus=0"
                )
            initial = maximum = max(1, math.floor(gpus / res.gpus + 1e-9))
        else:
            initial = 1
            maximum = max(1, min(cores, math.floor(cpus / res.cpus + 1e-9) if res.cpus > 0 else cores))
        if max_workers is not None:
            initial, maximum = min(initial, max_workers), min(maximum, max_workers)
        memory = int(res.memory_gb * 2**30) if res.memory_gb > 0 else None
        out[stage_id] = ActorPlan(initial=initial, maximum=maximum, num_cpus=round(min(res.cpus, cap_req), 4),
                                  num_gpus=res.gpus, memory=memory)
    if sum(p.maximum for p in out.values()) <= budget:
        # Everything fits at full size: start there rather than pay actor start-up while work waits.
        out = {k: ActorPlan(p.maximum, p.maximum, p.num_cpus, p.num_gpus, p.memory) for k, p in out.items()}
    return out, budget
