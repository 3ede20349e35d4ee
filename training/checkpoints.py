"""Training checkpoints: safetensors for every tensor, JSON for everything else, no pickle anywhere.

Layout, under ``<run>/train/<job>/checkpoints/step-<step>/``::

    model.safetensors      the network (what inference and evaluation load)
    head.safetensors       the classifier centres (recognition only; needed to resume, not to embed)
    optimizer.safetensors  optimizer state tensors, flattened to ``state.<param>.<name>``
    checkpoint.json        step, config, export lineage (sha256 of export.json), optimizer scalars,
                           sha256 of each file. Written last: it is the commit marker.

A directory without ``checkpoint.json`` is a checkpoint being written or one a crash cut short;
readers ignore it. On a local disk the whole directory is built under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FORMAT = "facefoundry-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or belongs to other data or another model."""


@dataclass
class Checkpoint:
    path: str
    step: int
    meta: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "model", "head", ...

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})


def checkpoint_dir(job_dir: str, step: int) -> str:
    return f"{job_dir.rstrip('/')}/checkpoints/step-{step:08d}"


def state_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module state dict as standalone contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state dict -> (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in rest.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": dict(sorted(state.items())), "param_groups": rest["param_groups"]}


def save_checkpoint(
    job_dir: str,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    keep: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write and commit one checkpoint; ``tensors`` maps a file stem to a state dict. Returns its path.
    ``keep`` > 0 deletes all but the newest ``keep`` committed checkpoints afterwards."""
    fs, _ = fsspec.core.url_to_fs(job_dir, **(storage_options or {}))
    final = checkpoint_dir(job_dir, step)
    _, final_path = fsspec.core.url_to_fs(final, **(storage_options or {}))
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    work = f"{final_path}.tmp-{uuid.uuid4().hex[:8]}" if local else final_path
    fs.makedirs(work, exist_ok=True)
    files: dict[str, str] = {}
    payloads = {stem: state_tensors(state) for stem, state in tensors.items()}
    full_meta = dict(meta)
    if optimizer is not None:
        opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
        payloads["optimizer"] = opt_tensors
        full_meta["optimizer"] = opt_rest
    for stem, payload in payloads.items():
        data = save_safetensors(payload, metadata={"format": CHECKPOINT_FORMAT, "step": str(step)})
        fs.pipe_file(posixpath.join(work, f"{stem}.safetensors"), data)
        files[f"{stem}.safetensors"] = hashlib.sha256(data).hexdigest()
    full_meta.update(
        format=CHECKPOINT_FORMAT,
        step=step,
        files=files,
        saved_at=time.time(),
        torch_version=torch.__version__,
    )
    fs.pipe_file(posixpath.join(work, CHECKPOINT_META), json.dumps(full_meta, indent=1, default=str).encode())
    if work != final_path:
        if fs.exists(final_path):  # a re-run of the same step: the newer one wins
            fs.rm(final_path, recursive=True)
        fs.mv(work, final_path, recursive=True)
    if keep > 0:
        for _, old in list_checkpoints(job_dir, storage_options)[:-keep]:
            fs.rm(fsspec.core.url_to_fs(old, **(storage_options or {}))[1], recursive=True)
    return final


def list_checkpoints(job_dir: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """Committed checkpoints of a job, oldest first, as (step, path)."""
    fs, root = fsspec.core.url_to_fs(job_dir, **(storage_options or {}))
    folder = posixpath.join(root, "checkpoints")
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
        if match and fs.exists(posixpath.join(entry, CHECKPOINT_META)):
            found.append((int(match.group(1)), f"{job_dir.rstrip('/')}/checkpoints/{match.group(0)}"))
    return sorted(found)


def latest_checkpoint(job_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    found = list_checkpoints(job_dir, storage_options)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """A checkpoint directory, or a job directory (its latest checkpoint)."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if fs.exists(posixpath.join(root, CHECKPOINT_META)):
        return path
    latest = latest_checkpoint(path, storage_options)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a job directory with committed checkpoints")
    return latest


def load_checkpoint(
    path: str, storage_options: dict[str, Any] | None = None, stems: tuple[str, ...] | None = None
) -> Checkpoint:
    """Read a committed checkpoint (or a job directory's latest) and verify its file hashes."""
    path = resolve_checkpoint(path, storage_options)
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    meta = json.loads(fs.cat_file(posixpath.join(root, CHECKPOINT_META)))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, digest in meta.get("files", {}).items():
        stem = name.removesuffix(".safetensors")
        if stems is not None and stem not in stems:
            continue
        data = fs.cat_file(posixpath.join(root, name))
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path}/{name}: sha256 does not match checkpoint.json (corrupt or edited)")
        tensors[stem] = load_safetensors(data)
    return Checkpoint(path=path, step=int(meta["step"]), meta=meta, tensors=tensors)


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    if "optimizer" not in checkpoint.tensors or "optimizer" not in checkpoint.meta:
        raise CheckpointError(f"{checkpoint.path}: no optimizer state to resume from")
    optimizer.load_state_dict(
        unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.meta["optimizer"])
    )
