"""Where a training job keeps its files, what it returns, and when it may resume.

<run>/train/<job>/checkpoints/step-<n>/   committed checkpoints (checkpoints.py)
<run>/train/<job>/eval/*.json             evaluation results
<run>/train/<job>/ddp_check.json          per-rank weight digests after the first step
<run>/metrics/<job>/*.parquet             metrics (metrics_store.py)
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from training.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint
from training.metrics_store import metrics_dir


def job_dir(run_dir: str, job: str) -> str:
    return f"{run_dir.rstrip('/')}/train/{job}"


def run_dir_of_checkpoint(checkpoint_path: str) -> tuple[str, str] | None:
    """(run dir, job) of ``<run>/train/<job>/checkpoints/step-n``; None for a checkpoint elsewhere."""
    parts = checkpoint_path.rstrip("/").split("/")
    if len(parts) >= 5 and parts[-2] == "checkpoints" and parts[-4] == "train":
        return "/".join(parts[:-4]), parts[-3]
    return None


@dataclass
class TrainResult:
    """What ``train_recognition`` / ``train_enhancement`` return (rank 0's view of the run)."""

    job: str
    kind: str
    run_dir: str
    job_dir: str
    start_step: int  # > 0 when the run resumed from a checkpoint
    final_step: int
    total_steps: int
    checkpoint: str | None
    export_sha256: str
    world_size: int
    wall_s: float
    last_loss: float | None = None
    eval: dict[str, Any] | None = None
    ddp_check: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_resume(job_path: str, config: Any, kind: str, export_sha256: str, with_tensors: bool = True
                ) -> Checkpoint | None:
    """The job's latest checkpoint if resuming is on (``config``: the job's training config). A
    checkpoint made from other data or for another network is an error, not a silent restart: the
    model's lineage would otherwise point at the wrong export, and another network's tensors do not
    load. The driver calls it without tensors to fail before any worker starts."""
    storage_options = config.data.storage_options
    latest = latest_checkpoint(job_path, storage_options)
    if latest is None:
        return None
    if not config.checkpoint.resume:
        raise CheckpointError(
            f"{job_path} already has checkpoints and checkpoint.resume is off: "
            "choose another job name or delete the folder"
        )
    ckpt = load_checkpoint(latest, storage_options, stems=None if with_tensors else ())
    if ckpt.meta.get("kind") != kind:
        raise CheckpointError(f"{latest}: a {ckpt.meta.get('kind')!r} checkpoint, this is a {kind!r} job")
    trained_on = ckpt.meta.get("export", {}).get("export_sha256")
    if trained_on != export_sha256:
        raise CheckpointError(
            f"{latest} was trained on export {trained_on}, the config's export is "
            f"{export_sha256}: use another job name to train on new data"
        )
    old, new = type(config).model_validate(ckpt.config).network(), config.network()
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        raise CheckpointError(
            f"{latest} is another network ({', '.join(changed)}): --new deletes job {config.job!r} and starts "
            "it over, or choose another job name"
        )
    return ckpt


def remove_job(run_dir: str, job: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a job's checkpoints, evaluations and metrics: the job starts over."""
    for url in (job_dir(run_dir, job), metrics_dir(run_dir, job)):
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())
    return url
