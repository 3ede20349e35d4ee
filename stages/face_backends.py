"""Model backends behind the face stages, as protocols.

The detect / embed / label stages name a backend in their params (``backend: dlib`` or
``backend: insightface`` with a model folder); they never import a library directly. A backend is
a plain class built from a small pydantic spec, loaded once per worker in the stage's ``setup()``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stages.base import ModelInfo


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
    "dlib": "stages.dlib_backend",
    "insightface": "stages.insightface_backend",
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
