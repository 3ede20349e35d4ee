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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, get_args

import numpy as np
import pyarrow as pa
from pydantic import Field

# Re-exported: stages import the shared vocabulary from here (manifests/vocabulary.py defines it).
from facekit.common import ModelInfo as ModelInfo
from facekit.common import Params as Params
from facekit.common import Strict as Strict
from facekit.common import sample_seed as sample_seed
from facekit.common import stable_hash as stable_hash

# A column of encoded image bytes the engine writes into the stage's shard tar (manifests/schema.py).
from manifests.schema import member_field as member_field
from manifests.vocabulary import DETAIL as DETAIL
from manifests.vocabulary import IDENTITY_ID as IDENTITY_ID
from manifests.vocabulary import IMAGE as IMAGE
from manifests.vocabulary import IMAGE_EXT as IMAGE_EXT
from manifests.vocabulary import IMAGE_SOURCE as IMAGE_SOURCE
from manifests.vocabulary import KEEP as KEEP
from manifests.vocabulary import KEY as KEY
from manifests.vocabulary import PARENT_ID as PARENT_ID
from manifests.vocabulary import REASON as REASON
from manifests.vocabulary import SAMPLE_ID as SAMPLE_ID
from manifests.vocabulary import STATUS as STATUS
from manifests.vocabulary import STATUS_ERROR as STATUS_ERROR
from manifests.vocabulary import STATUS_OK as STATUS_OK
from manifests.vocabulary import Batch as Batch
from manifests.vocabulary import Reason as Reason
from manifests.vocabulary import Rows as Rows
from manifests.vocabulary import rows_ok as rows_ok


class TransientError(RuntimeError):
    """A failure that says nothing about the sample (a model server down, a storage 5xx, throttling).

    Raise it (or let it propagate) instead of recording an error row: the engine retries the whole
    shard with backoff, and only what is really wrong with a sample becomes that sample's error row.
    """


class InputError(ValueError):
    """The source's configured input cannot give a single sample (no folder there, nothing to read in
    it): a user error, raised before any work. ``key`` is the param's path below the stage
    (``params.root``); the runner names the stage and refuses the run like an invalid config."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class StageKind(enum.StrEnum):
    """How the runner schedules a stage."""

    SOURCE = "source"  # plans shards and creates samples
    MAPPER = "mapper"  # adds columns per sample (may derive several samples from one)
    FILTER = "filter"  # adds scores and a keep/reason decision; never deletes data
    GLOBAL = "global"  # needs every sample of the run at once (dedup, separation, grouping)
    SINK = "sink"  # reads decisions as a view and exports


class Resources(Strict):
    """What one worker of a stage needs; Ray sizes actors from this."""

    cpus: float = Field(1.0, ge=0.0, description="CPUs one worker reserves")
    gpus: float = Field(0.0, ge=0.0, description="GPUs one worker reserves (fractions share a GPU)")
    memory_gb: float = Field(0.0, ge=0.0, description="memory one worker (or a global stage's task) reserves, GiB")


class EmptyParams(Params):
    pass


@dataclass(frozen=True)
class StageContext:
    """Run-level facts a stage may need; immutable and cheap to send to workers."""

    run_dir: str
    stage_id: str
    seed: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    # The run's identities block (images per identity, perturbation schedule) for generator sources.
    identities: dict[str, Any] | None = None


P = TypeVar("P", bound=Params)


class Stage(Generic[P]):
    """Base class. A stage names its params type once, as the generic argument
    (``class DetectStage(Stage[DetectParams])``): that is its ``params_model`` and the type of
    ``self.params``. Subclasses set the ClassVars and implement ``process`` (or ``run_global``)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    params_model: ClassVar[type[Params]] = EmptyParams
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 32
    writes_pixels: ClassVar[bool] = False
    # The stage's own manifest columns (besides the common lineage and decision columns).
    columns: ClassVar[tuple[pa.Field, ...]] = ()
    # Columns this stage reads that earlier stages write (besides sample_id/key/identity_id/parent_id and
    # the image). The runner refuses, before any work, a config where no earlier stage writes one.
    reads: ClassVar[tuple[str, ...]] = ()
    # Columns it uses when an earlier stage wrote them (a crop's align matrix, 68 points): not required by
    # the config check, but kept by the projected read. A stage that declares neither reads every column.
    optional_reads: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "params_model" in cls.__dict__:
            return  # declared explicitly (plugins written before the generic form)
        for base in getattr(cls, "__orig_bases__", ()):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, Params):
                    cls.params_model = arg
                    return

    def __init__(self, params: P, context: StageContext) -> None:
        self.params: P = params
        self.context = context

    def setup(self) -> None:
        """Load models. Called once per worker before the first batch."""

    def teardown(self) -> None:
        """Release what ``setup`` took (server sessions, GPU memory) when the worker retires."""

    def model_info(self) -> ModelInfo:
        return ModelInfo()

    def prepare(self, store: Any) -> None:
        """Build run-level inputs once per run, in the driver, before any shard of any stage runs (a
        source's identities table, a filter's reference index); must be idempotent so a resumed run
        reuses them. ``store`` is the run's RunStorage."""

    def finish(self, store: Any) -> None:
        """Once per run, in the driver, after every phase ran: write run-level summaries from the
        committed manifests (never from memory: shards may have run in earlier invocations)."""

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

    def input_columns(self) -> tuple[str, ...]:
        """Upstream columns this configured stage reads. Override when they depend on params."""
        return tuple(self.reads)

    def projected_columns(self) -> set[str] | None:
        """The upstream columns to load for this stage, or None for all of them."""
        wanted = {*self.input_columns(), *self.optional_reads}
        return wanted or None

    def rows(self, batch: Batch) -> Rows:
        """An output builder for ``batch``: one ok, kept row per input sample, own columns empty."""
        return Rows(batch[SAMPLE_ID], [f.name for f in self.output_fields()])


class SourceStage(Stage[P]):
    """Creates samples. ``plan`` cuts the work into shards described by small JSON-able dicts;
    ``read`` turns one shard description into batches. The plan is frozen in the run on first use,
    so a resumed run cuts exactly the same shards."""

    kind: ClassVar[StageKind] = StageKind.SOURCE
    writes_pixels: ClassVar[bool] = True

    def prepare(self, store: Any) -> None:
        """Create run-level inputs before the plan is cut (a generator writes its identities table);
        called once per run in the driver, and must be idempotent so a resumed run reuses them."""

    def check_input(self) -> None:
        """Raise InputError when the configured input cannot be read at all (a folder that does not
        exist, a pattern that matches nothing). Called by the runner before any work, so a mistyped
        path is refused in a second, never frozen into the run as an empty plan."""

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        raise NotImplementedError


class RowError(Exception):
    """Raised by ``FilterStage.score_row`` (or any per-row helper) when one row cannot be scored:
    that row becomes an error row with this rule and detail, the rest of the batch goes on."""

    def __init__(self, rule: str, detail: object = None) -> None:
        super().__init__(f"{rule}: {detail}" if detail is not None else rule)
        self.rule = rule
        self.detail = detail


class FilterStage(Stage[P]):
    """Scores samples, then decides. Scores are always stored, so an export can re-decide with
    other thresholds without running the stage again.

    Implement either ``score_row(batch, i) -> {column: value}`` (raise ``RowError`` or ImageError to
    fail that one row) or, where batching pays, ``score(batch, rows)`` that fills ``rows`` and calls
    ``rows.fail`` for rows it cannot score. ``decide(scores)`` turns one row of scores into None
    (keep) or the ``Reason`` it is dropped for; ``Checks`` builds that reason from thresholds.
    """

    kind: ClassVar[StageKind] = StageKind.FILTER

    def score_row(self, batch: Batch, i: int) -> dict[str, Any]:
        raise NotImplementedError(f"filter {self.name!r} implements neither score() nor score_row()")

    def score(self, batch: Batch, rows: Rows) -> None:
        for i in range(len(rows)):
            try:
                rows.set(i, **self.score_row(batch, i))
            except RowError as exc:
                rows.fail(i, exc.rule, exc.detail)
            except ValueError as exc:  # ImageError and bad landmark arrays: this row's data is unusable
                rows.fail(i, getattr(exc, "rule", "unusable_input"), getattr(exc, "detail", exc))

    def decide(self, scores: dict[str, Any]) -> Reason | None:
        raise NotImplementedError

    def thresholds(self) -> dict[str, dict[str, float]]:
        """The thresholds this filter's decision applies, per score column, as ``{"min": x}`` and/or
        ``{"max": y}``: the report draws them over the score histograms, the card lists them."""
        return {}

    def process(self, batch: Batch) -> Batch:
        rows = self.rows(batch)
        self.score(batch, rows)
        names = [f.name for f in self.output_fields()]
        for i in range(len(rows)):
            if rows.failed(i):
                continue
            reason = self.decide({c: rows.data[c][i] for c in names})
            if reason is not None:
                rows.drop(i, reason.rule, reason.detail)
        return rows.batch()


class Checks:
    """Threshold checks of one row. Every failed check is listed in the detail (``"yaw 34.2 > 30;
    sharpness 12.0 < 25"``); the first one names the rule (``yaw_above_max``), so a card groups drops
    by rule while the row keeps all its numbers. A None value or a None limit is no check."""

    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []

    def min(self, name: str, value: float | None, limit: float | None, fmt: str = ".2f") -> Checks:
        if value is not None and limit is not None and value < limit:
            self.failed.append((f"{name}_below_min", f"{name} {value:{fmt}} < {limit:g}"))
        return self

    def max(self, name: str, value: float | None, limit: float | None, fmt: str = ".2f") -> Checks:
        if value is not None and limit is not None and value > limit:
            self.failed.append((f"{name}_above_max", f"{name} {value:{fmt}} > {limit:g}"))
        return self

    def max_abs(self, name: str, value: float | None, limit: float | None, fmt: str = ".1f") -> Checks:
        if value is not None and limit is not None and abs(value) > limit:
            self.failed.append((f"{name}_above_max", f"|{name}| {abs(value):{fmt}} > {limit:g}"))
        return self

    def reason(self) -> Reason | None:
        if not self.failed:
            return None
        return Reason(self.failed[0][0], "; ".join(detail for _, detail in self.failed))


@dataclass(frozen=True)
class StoredTable:
    """A table stored in the run's work folder (alias: ``Gathered``): in a task's arguments it stands for
    the whole of a small shuffle (every piece written to its partition 0), read there in the task, so a
    table of identities reaches the tasks that need it without passing through the driver."""

    name: str
    sort_by: str | None = None  # a column to sort the table by, once per task
    convert: Callable[[pa.Table | None], Any] | None = None  # applied once per task (not once per shard)


@dataclass(frozen=True)
class ObjectStoreValue:
    """A value a task left in Ray's object store (``Corpus.call(..., kept=True)``; alias: ``Kept``): in a
    later task's arguments it is fetched there, and ``convert`` applied once per task (deserialising an
    index once, not once per shard)."""

    ref: Any
    convert: Callable[[Any], Any] | None = None


# The shard-keyed shuffle(s) a per-shard task gets its own piece of (``side=``; alias: ``Side``).
ShardKeyedInput = str | tuple[str, ...] | None

# Aliases of the three names above, kept because plugin stages may import them; use the names above.
Gathered = StoredTable
Kept = ObjectStoreValue
Side = ShardKeyedInput


class Corpus(Protocol):
    """The distributed operations a global stage composes; pipeline.engine.global_exec runs them on Ray.

    Every ``fn`` runs in a task: ``map`` / ``shuffle`` / ``commit`` call ``fn(table, shard_index, *args)``
    on one shard's live samples (carried columns + the ``columns`` asked for, as Arrow); ``reduce`` calls
    ``fn(table_or_None, partition, *args)`` on one shuffle partition, and ``reshuffle`` does the same but
    ``fn`` returns ``(pieces, result)``: its pieces become the partitions of another shuffle (an iterative
    algorithm's next round), only ``result`` comes back. Results come back in shard / partition order, so a
    stage that folds them in that order is deterministic.

    Per-sample results go back to the shards by a shuffle keyed by shard index: ``side=name`` hands
    ``map`` / ``shuffle`` / ``commit`` that shuffle's partition ``shard_index`` (or None) as the first
    extra argument (``side=(a, b)``: one list of both pieces), so no task gets a table of the whole run.
    ``put`` is for shared inputs that do not grow with the samples (k-means cells, the few duplicate
    links). A table that grows with the identities goes through storage instead: a reduce writes it to
    partition 0 of a shuffle (a piece key ``(name, 0)``), and ``gathered(name)`` in any task's arguments
    stands for it (a ``StoredTable``); ``call(fn, ..., kept=True)`` runs ``fn`` -> ``(small, large)`` and
    returns ``(small, ObjectStoreValue)``: ``large`` stays in the object store and the ``ObjectStoreValue``
    passes it to later tasks.
    """

    shards: list[str]
    partitions: int

    def plan_partitions(self, rows: int) -> int: ...

    def put(self, value: Any) -> Any: ...

    def map(self, fn: Callable[..., Any], columns: Sequence[str], *args: Any,
            side: ShardKeyedInput = None) -> list[Any]: ...

    def shuffle(self, name: str, fn: Callable[..., dict[int, pa.Table]], columns: Sequence[str],
                *args: Any, side: ShardKeyedInput = None) -> int: ...

    def reduce(self, name: str, fn: Callable[..., Any], *args: Any) -> list[Any]: ...

    def reshuffle(self, name: str, source: str, fn: Callable[..., tuple[dict[Any, pa.Table], Any]],
                  *args: Any) -> list[Any]: ...

    def discard(self, name: str) -> None:
        """Delete a shuffle's files once no later step reads them (an iteration's previous round)."""
        ...

    def call(self, fn: Callable[..., Any], *args: Any, kept: bool = False,
             convert: Callable[[Any], Any] | None = None) -> Any: ...

    def gathered(self, name: str, sort_by: str | None = None,
                 convert: Callable[[pa.Table | None], Any] | None = None) -> StoredTable: ...

    def commit(self, fn: Callable[..., Batch], *args: Any, side: ShardKeyedInput = None) -> Any: ...

    def dropped_before(self) -> int:
        """Rows dropped in the shards an earlier attempt already committed (for a resumed summary)."""
        ...


class GlobalStage(Stage):
    """Sees every live sample of the run. ``needs`` names the upstream columns it reads (never the
    pixels).

    Two forms: ``run_corpus(corpus)`` composes distributed operations (no process holds the samples) and
    ends with ``corpus.commit``, one manifest fragment per shard; ``run_global(table)`` gets every live
    sample in one Arrow table and returns one row per sample -- the single-process form, kept for
    methods that need everything at once (average linkage, medians) and for small runs. ``distributed()``
    says which form these params use.
    """

    kind: ClassVar[StageKind] = StageKind.GLOBAL
    needs: tuple[str, ...] = ()  # a class default; params may widen it per instance

    def input_columns(self) -> tuple[str, ...]:
        """What the config check requires of earlier stages: ``reads`` and ``needs``."""
        return tuple(dict.fromkeys([*super().input_columns(), *self.needs]))

    def summary(self) -> dict[str, Any] | None:
        """Run-level figures of the decision (groups found, purity against truth), written next to the
        stage's manifests once it ran; None: nothing to write."""
        return None

    def run_global(self, table: pa.Table) -> Batch:
        raise NotImplementedError

    def distributed(self) -> bool:
        return False

    def run_corpus(self, corpus: Corpus) -> None:
        raise NotImplementedError(f"stage {self.name!r} has no distributed form")


def ordinals(shard_index: int, n: int) -> np.ndarray:
    """Run-wide row numbers of one shard's rows: (shard index << 32) | row. Sorting by them gives the
    order of the single-process table (shards in plan order, rows in shard order)."""
    return (np.int64(shard_index) << np.int64(32)) | np.arange(n, dtype=np.int64)
