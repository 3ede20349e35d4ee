"""Driver side: run a training loop on Ray Train's TorchTrainer (DDP, gloo on CPU, NCCL on GPU).

Checkpoints are not handed to Ray: rank 0 writes them to the run folder itself (see checkpoints.py),
so a model is readable without Ray and a restarted worker group (``max_failures``) or a new
invocation both resume from the same place. Ray's own run folder (``<run>/train/<job>/ray``) only
holds its bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

import pipeline
from training.config import ScalingConfig


def project_runtime_env() -> dict[str, Any]:
    """Workers import this package by name. When it runs from a source checkout rather than an
    installed distribution, put the checkout on the workers' PYTHONPATH."""
    root = Path(pipeline.__file__).resolve().parent.parent
    if "site-packages" in root.parts:
        return {}
    paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def run_train_loop(
    loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], scaling: ScalingConfig, job_dir: str
) -> Any:
    """Run ``loop(loop_config)`` on ``scaling.num_workers`` workers; returns rank 0's return value."""
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name="ray",
            storage_path=job_dir,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            worker_runtime_env=project_runtime_env() or None,  # type: ignore[call-arg]  # Ray Train v2 API
        ),
    )
    return trainer.fit().return_value  # type: ignore[attr-defined]  # Ray Train v2's Result


def absolute_url(path: str) -> str:
    """Workers may run in another working directory: make local paths absolute, keep URLs as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def launch_job(loop: Callable[[dict[str, Any]], dict[str, Any] | None], config: Any, kind: str,
               export_sha256: str, run_dir: str, new: bool = False) -> Any:
    """What every training job does on the driver: with ``new``, delete the job's earlier files; refuse a
    resume against another export or network before any worker starts; run the loop on Ray Train, and
    time it."""
    import time

    from training.job_layout import TrainResult, find_resume, job_dir, remove_job

    folder = job_dir(run_dir, config.job)
    if new:
        remove_job(run_dir, config.job, config.data.storage_options)
    find_resume(folder, config, kind, export_sha256, with_tensors=False)
    started = time.perf_counter()
    summary = run_train_loop(loop, {"config": config.model_dump(mode="json"), "run_dir": run_dir},
                             config.scaling, folder)
    summary["wall_s"] = time.perf_counter() - started
    return TrainResult(**summary)
