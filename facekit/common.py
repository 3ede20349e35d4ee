"""The small vocabulary the toolbox shares with the stages: params base, model identity, stable hashes.

It lives here, not in stages/, so that facekit imports neither Ray nor the pipeline: a notebook can
load a backend or the renderer with nothing but this package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

# The batch shape and the two columns every labeler and backend helper may read.
from manifests.vocabulary import IMAGE as IMAGE
from manifests.vocabulary import SAMPLE_ID as SAMPLE_ID
from manifests.vocabulary import Batch as Batch


class Strict(BaseModel):
    """Base of every model that holds user config: unknown keys are errors, values are immutable once
    validated, and every float is finite. NaN compares false with every bound, so a NaN threshold
    would switch its check off without a word; infinity is no threshold either. A field that means
    "no limit" says so with None."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class Params(Strict):
    """Base for params and model specs."""


@dataclass(frozen=True)
class ModelInfo:
    """What a stage ran, for lineage: a model name plus a revision or a hash of its weight files."""

    name: str = ""
    revision: str = ""


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order and Python's hash seed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sample_seed(run_seed: int, sample_id: str, purpose: str = "") -> int:
    """Per-sample seed derived from the sample id, so a sample's bytes never depend on scheduling."""
    digest = hashlib.sha256(f"{run_seed}:{sample_id}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
