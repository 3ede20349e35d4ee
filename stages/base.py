"""The stage contract: what a stage declares and the two calls the runner makes on it.

A stage is one class. It declares a params model (pydantic), a name, a version, its kind, the
resources one worker needs, a batch size and the Arrow fields it adds; the runner calls
``setup()`` once per worker (load models there, never in ``__init__``) and ``process(batch)`` per
batch. Nothing in pipeline/ or manifests/ knows any particular stage.

A batch is a column dict: ``{column: list}``, every list the same length (one entry per sample).
It is the one representation used everywhere: stages read and add columns, the runner turns a
stage's own columns into an Arrow table with the stage's declared schema for its manifest.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

Batch = dict[str, list[Any]]

# Columns every batch carries between stages (besides image bytes).
SAMPLE_ID = "sample_id"
KEY = "key"
IDENTITY_ID = "identity_id"
PARENT_ID = "parent_id"
IMAGE = "image"
IMAGE_EXT = "image_ext"
# Decision columns every stage emits for every row.
STATUS = "status"
KEEP = "keep"
REASON = "reason"

STATUS_OK = "ok"
STATUS_ERROR = "error"


class StageKind(enum.StrEnum):
    """How the runner schedules a stage."""

    SOURCE = "source"  # plans shards and creates samples
    MAPPER = "mapper"  # adds columns per sample (may derive several samples from one)
    FILTER = "filter"  # adds scores and a keep/reason decision; never deletes data
    GLOBAL = "global"  # needs every sample of the run at once (dedup, separation, grouping)
    SINK = "sink"  # reads decisions as a view and exports


class Resources(BaseModel):
    """What one worker of a stage needs; Ray sizes actors from this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, ge=0.0)
    gpus: float = Field(0.0, ge=0.0)
    memory_gb: float = Field(0.0, ge=0.0)


class Params(BaseModel):
    """Base for stage params: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class EmptyParams(Params):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What a stage ran, for lineage: a model name plus a revision or a hash of its weight files."""

    name: str = ""
    revision: str = ""


@dataclass(frozen=True)
class StageContext:
    """Run-level facts a stage may need; immutable and cheap to send to workers."""

    run_dir: str
    stage_id: str
    seed: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    # The run's identities block (images per identity, perturbation schedule) for generator sources.
    identities: dict[str, Any] | None = None


class Stage:
    """Base class. Subclasses set the ClassVars and implement ``process`` (or ``run_global``)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    params_model: ClassVar[type[Params]] = EmptyParams
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 32
    writes_pixels: ClassVar[bool] = False
    # The stage's own manifest columns (besides the common lineage and decision columns).
    columns: ClassVar[tuple[pa.Field, ...]] = ()

    def __init__(self, params: Params, context: StageContext) -> None:
        self.params = params
        self.context = context

    def setup(self) -> None:
        """Load models. Called once per worker before the first batch."""

    def model_info(self) -> ModelInfo:
        return ModelInfo()

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        """Problems that would stop ``setup()`` (missing model files, unreachable server), found
        without loading anything; each names where it looked and how to fix it."""
        return []

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError(f"stage {self.name!r} does not implement process()")

    def output_fields(self) -> tuple[pa.Field, ...]:
        """The stage's own manifest columns. Override when they depend on params (embedding size)."""
        return tuple(self.columns)


class SourceStage(Stage):
    """Creates samples. ``plan`` cuts the work into shards described by small JSON-able dicts;
    ``read`` turns one shard description into batches. The plan is frozen in the run on first use,
    so a resumed run cuts exactly the same shards."""

    kind: ClassVar[StageKind] = StageKind.SOURCE
    writes_pixels: ClassVar[bool] = True

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        raise NotImplementedError


class FilterStage(Stage):
    """Scores samples, then decides. ``score`` returns the score columns; ``decide`` turns one
    row of scores into (keep, reason). Scores are always stored, so an export can re-decide with
    other thresholds without running the stage again."""

    kind: ClassVar[StageKind] = StageKind.FILTER

    def score(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def decide(self, scores: dict[str, Any]) -> tuple[bool, str | None]:
        raise NotImplementedError

    def process(self, batch: Batch) -> Batch:
        scores = self.score(batch)
        n = len(batch[SAMPLE_ID])
        out: Batch = {SAMPLE_ID: list(batch[SAMPLE_ID]), **scores}
        keeps, reasons = [], []
        for i in range(n):
            keep, reason = self.decide({k: v[i] for k, v in scores.items()})
            keeps.append(keep)
            reasons.append(None if keep else reason)
        out[STATUS] = [STATUS_OK] * n
        out[KEEP] = keeps
        out[REASON] = reasons
        return out


class GlobalStage(Stage):
    """Sees every live sample of the run at once. ``needs`` names the upstream columns it reads
    (never the pixels); ``run_global`` returns one row per sample with the stage's columns and
    decision. The runner cuts the result back into per-shard manifest fragments."""

    kind: ClassVar[StageKind] = StageKind.GLOBAL
    needs: ClassVar[tuple[str, ...]] = ()

    def run_global(self, table: pa.Table) -> Batch:
        raise NotImplementedError


def rows_ok(sample_ids: Sequence[str]) -> Batch:
    """Decision columns for rows that all pass."""
    n = len(sample_ids)
    return {
        SAMPLE_ID: list(sample_ids),
        STATUS: [STATUS_OK] * n,
        KEEP: [True] * n,
        REASON: [None] * n,
    }


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order and Python's hash seed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sample_seed(run_seed: int, sample_id: str, purpose: str = "") -> int:
    """Per-sample seed derived from the sample id, so a sample's bytes never depend on scheduling."""
    digest = hashlib.sha256(f"{run_seed}:{sample_id}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
