"""Global stages as distributed work: projected per-shard reads, parallel Ray tasks, shuffles over
partitioned Arrow IPC files, and the same per-shard commits as every other stage.

A global stage (stages/corpus) composes the operations of ``stages.base.Corpus``; this module runs them
on Ray. The driver only coordinates: every read of samples happens in a task, one shard (or one shuffle
partition) at a time, and only the columns the stage declares (``needs``) are read, as Arrow. What comes
back to the driver is counts, thresholds, bounded samples and the few duplicate links, never a table of
samples or of identities: per-identity tables go from task to task through the run's work folder
(``StoredTable``) or the object store (``ObjectStoreValue``).

Failures: every task declares the stage's memory (``resources.memory_gb`` -> Ray ``memory=``) and runs
through pipeline.engine.tasks: work Ray lost (an OOM kill by Ray's memory monitor, a dead worker or
node, a lost object) or a transient failure is retried; a task that raises, or one whose attempts are
spent, fails the stage with ``GlobalStageError``, which the runner records in the run's history like
any failed shard.

Resume: decisions are a pure function of the committed upstream manifests, so a re-run recomputes the
small global tables and commits only the shards that are not committed yet: a killed global stage
resumes byte-identically (except the worker/time columns).
"""

from __future__ import annotations

import itertools
import logging
import math
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from threadpoolctl import threadpool_limits

from manifests.layout import (
    SHUFFLE_SUFFIX,
    global_work_dir,
    global_work_partition,
    global_work_path,
    stage_summary_path,
)
from manifests.reader import ShardReader, shard_rows
from manifests.schema import CARRIED
from manifests.storage import RunStorage
from pipeline.engine.execution import (
    ShardResult,
    StageSpec,
    UpstreamInfo,
    build_manifest,
    commit_manifest,
    manifest_path,
    summarise,
    worker_name,
)
from pipeline.engine.faults import UpstreamNotCommittedError
from pipeline.engine.tasks import TaskFailedError, run_calls, task_options
from stages.base import (
    IDENTITY_ID,
    KEEP,
    PARENT_ID,
    SAMPLE_ID,
    STATUS,
    STATUS_OK,
    Batch,
    GlobalStage,
    ObjectStoreValue,
    ShardKeyedInput,
    StoredTable,
)

log = logging.getLogger(__name__)
ROWS_PER_PARTITION = 100_000  # default shuffle partition size (records): a partition must fit one task
TASKS_PER_CPU = 4

class GlobalStageError(TaskFailedError):
    """A global stage gave up (a permanent failure, or retries spent); the message names the step and the
    last failure."""


# ---------------------------------------------------------------- projected, vectorised input


def read_shard_columns(store: RunStorage, upstream: Sequence[UpstreamInfo], shard: str,
                       columns: Iterable[str]) -> pa.Table:
    """The live samples of one shard with the carried columns and ``columns``, as one Arrow table: the
    one reader's rows (``manifests.reader.shard_rows``, verified fragments, own-or-parent join)."""
    return shard_rows(ShardReader(store, shard, lost=UpstreamNotCommittedError), upstream, columns)


# ---------------------------------------------------------------- Ray tasks


def _side_args(store: RunStorage, stage_id: str, side: str | tuple[str, ...] | None, index: int) -> tuple[Any, ...]:
    """The piece of shuffle ``side`` keyed by this shard's index as the first extra argument (none without a
    side); for several sides, one list of their pieces, in the order named."""
    if side is None:
        return ()
    if isinstance(side, str):
        return (_read_partition(store, stage_id, side, index),)
    return ([_read_partition(store, stage_id, s, index) for s in side],)


def _resolve(store: RunStorage, stage_id: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Arguments with every ``StoredTable`` marker replaced by its table and every ``ObjectStoreValue`` by its
    value, read here in the task (the driver never holds them)."""
    def read(g: StoredTable) -> Any:
        table = _read_partition(store, stage_id, g.name, 0)
        table = table.sort_by(g.sort_by) if table is not None and g.sort_by else table
        return g.convert(table) if g.convert else table

    def fetch(k: ObjectStoreValue) -> Any:
        value = ray.get(k.ref)
        return k.convert(value) if k.convert else value

    return tuple(read(a) if isinstance(a, StoredTable) else fetch(a) if isinstance(a, ObjectStoreValue) else a
                 for a in args)


def _shard_task(url: str, options: dict[str, Any], upstream: tuple[UpstreamInfo, ...],
                items: list[tuple[str, int]], columns: tuple[str, ...], stage_id: str, side: ShardKeyedInput,
                fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn`` on each of a few consecutive shards, one shard's table in memory at a time."""
    store = RunStorage(url, options)
    args = _resolve(store, stage_id, args)
    return [fn(read_shard_columns(store, upstream, shard, columns), index,
               *_side_args(store, stage_id, side, index), *args) for shard, index in items]


def _write_pieces(store: RunStorage, stage_id: str, name: str, source: str,
                  pieces: dict[int, pa.Table] | dict[int | tuple[str, int], pa.Table]) -> int:
    """Each piece into its partition of shuffle ``name`` (key ``part``) or of another shuffle (key
    ``(other, part)``: a reduce that feeds two later steps writes both at once)."""
    rows = 0
    for key, table in pieces.items():
        if table.num_rows == 0:
            continue
        target, part = (name, key) if isinstance(key, int) else key
        store.write_atomic(_ipc_bytes(table), *global_work_path(stage_id, target, part, source))
        rows += table.num_rows
    return rows


def _shuffle_task(url: str, options: dict[str, Any], upstream: tuple[UpstreamInfo, ...],
                  items: list[tuple[str, int]], columns: tuple[str, ...], stage_id: str, side: ShardKeyedInput,
                  name: str, fn: Callable[..., Any], *args: Any) -> list[int]:
    """Map each shard to partition pieces and write each as an Arrow IPC file under the run's work folder."""
    store = RunStorage(url, options)
    args = _resolve(store, stage_id, args)
    counts = []
    for shard, index in items:
        table = read_shard_columns(store, upstream, shard, columns)
        pieces: dict[int, pa.Table] = fn(table, index, *_side_args(store, stage_id, side, index), *args)
        counts.append(_write_pieces(store, stage_id, name, shard, pieces))
    return counts


def _ipc_bytes(table: pa.Table) -> bytes:
    """A shuffle piece as an Arrow IPC file (see manifests.layout.SHUFFLE_SUFFIX for why not Parquet)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _read_partition(store: RunStorage, stage_id: str, name: str, part: int) -> pa.Table | None:
    """Every piece of one partition (in source order) as one table; None when no source wrote to it."""
    folder = global_work_partition(stage_id, name, part)
    tables = [pa.ipc.open_file(pa.py_buffer(store.read_bytes(*folder, fname))).read_all()
              for fname in store.list_files(*folder, suffix=SHUFFLE_SUFFIX)]
    return pa.concat_tables(tables) if tables else None


def _partition_task(url: str, options: dict[str, Any], stage_id: str, name: str, part: int,
                    fn: Callable[..., Any], *args: Any) -> Any:
    """Read every shard's piece of one partition (in shard order) and reduce it."""
    store = RunStorage(url, options)
    return fn(_read_partition(store, stage_id, name, part), part, *_resolve(store, stage_id, args))


def _reshuffle_task(url: str, options: dict[str, Any], stage_id: str, source: str, name: str, part: int,
                    fn: Callable[..., Any], *args: Any) -> Any:
    """Reduce one partition of ``source`` into pieces of shuffle ``name`` (named after this partition, so a
    retried task rewrites the same files) and a small result for the driver."""
    store = RunStorage(url, options)
    pieces, result = fn(_read_partition(store, stage_id, source, part), part, *_resolve(store, stage_id, args))
    _write_pieces(store, stage_id, name, f"p{part:05d}", pieces)
    return result


def _call_task(url: str, options: dict[str, Any], stage_id: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` while nothing else of the stage runs: FAISS / BLAS may use every CPU Ray gives this node (a
    pooled worker keeps the one thread of the one-CPU tasks it was started for). The task still reserves
    one CPU: reserving the node could wait forever on an idle actor of an earlier stage."""
    here = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("NodeID") == here), 1)
    with threadpool_limits(limits=max(1, int(cpus))):
        return fn(*_resolve(RunStorage(url, options), stage_id, args))


def _kept_call_task(url: str, options: dict[str, Any], stage_id: str, fn: Callable[..., Any],
                    *args: Any) -> tuple[Any, Any]:
    """``fn`` returns (small, large): two Ray returns, so the driver can fetch the first alone."""
    small, large = _call_task(url, options, stage_id, fn, *args)
    return small, large


def _commit_task(url: str, options: dict[str, Any], spec: StageSpec, stage: GlobalStage, side: ShardKeyedInput,
                 items: list[tuple[str, int]], fn: Callable[..., Batch], *args: Any) -> list[ShardResult]:
    store = RunStorage(url, options)
    args = _resolve(store, spec.stage_id, args)
    results = []
    for shard, index in items:
        t0 = time.perf_counter()
        table = read_shard_columns(store, spec.upstream, shard, stage.needs)
        out = fn(table, index, *_side_args(store, spec.stage_id, side, index), *args)
        results.append(commit_rows(store, spec, stage, shard, table, out, t0))
    return results


def commit_rows(store: RunStorage, spec: StageSpec, stage: GlobalStage, shard: str, table: pa.Table,
                out: Batch, t0: float) -> ShardResult:
    """Commit one shard's rows: carried columns from the input (a stage may relabel identity_id), one
    row per live sample, in input order."""
    n = table.num_rows
    sids = table[SAMPLE_ID].to_pylist()
    if out.get(SAMPLE_ID) != sids:
        raise RuntimeError(f"global stage {spec.stage_id!r} returned rows that do not match shard {shard}'s samples")
    out = dict(out)
    out["key"] = table["key"].to_pylist()
    out[PARENT_ID] = table[PARENT_ID].to_pylist()
    labels = table[IDENTITY_ID].to_pylist()
    mine = out.get(IDENTITY_ID)
    out[IDENTITY_ID] = labels if mine is None else [m if m is not None else o for m, o in zip(mine, labels,
                                                                                             strict=True)]
    worker = worker_name()
    per = (time.perf_counter() - t0) * 1000 / max(n, 1)
    manifest = build_manifest(spec, stage, shard, out, None, None, {}, worker, [per] * n)
    commit_manifest(store, spec, shard, manifest)
    return summarise(spec, shard, n, out, time.perf_counter() - t0, worker)


_INLINE = (str, int, float, bool, type(None), ray.ObjectRef, StoredTable, ObjectStoreValue)


def _put_shared_args(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One object-store copy of each argument several calls share. Ray puts a large argument of a call in
    the store once per call: a centroid table handed to N map tasks would be N copies in the driver's
    memory, and its size grows with the identities of the run."""
    uses = Counter(id(a) for c in calls for a in c if not isinstance(a, _INLINE) and not callable(a))
    refs: dict[int, Any] = {}
    for key, value in ((id(a), a) for c in calls for a in c):
        if uses.get(key, 0) > 1 and key not in refs:
            refs[key] = ray.put(value)
    return [tuple(refs.get(id(a), a) for a in c) for c in calls]


class RayCorpus:
    """``stages.base.Corpus`` on Ray: one task per shard or partition, each declaring the stage's memory."""

    def __init__(self, spec: StageSpec, stage: GlobalStage, shards: Sequence[str], todo: Sequence[str],
                 partitions: int | None = None) -> None:
        self.spec = spec
        self.stage = stage
        self.shards = list(shards)
        self.todo = set(todo)
        self.store = RunStorage(spec.context.run_dir, spec.context.storage_options)
        res = stage.resources
        self.options = task_options(max(res.cpus, 0.1), int(res.memory_gb * 2**30), res.gpus)
        self.partitions = 1
        self._fixed = partitions
        self.results: list[ShardResult] = []

    def plan_partitions(self, rows: int) -> int:
        """Shuffle partitions for ``rows`` records (fixed when the caller asked for a number)."""
        self.partitions = self._fixed or max(1, math.ceil(rows / ROWS_PER_PARTITION))
        return self.partitions

    def _run(self, what: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]], kept: bool = False) -> list[Any]:
        """Every call as a task (pipeline.engine.tasks: results in call order, lost or transient failures
        retried). ``kept``: ``fn`` has two returns; the driver fetches the first and gets ``(first, ref)``
        where ``ref`` names the second, left in the object store for later tasks."""
        t0 = time.perf_counter()
        out = run_calls(f"global stage {self.spec.stage_id!r}: {what}", fn, _put_shared_args(calls), self.options,
                        kept=kept, error=GlobalStageError)
        log.debug("global stage %s: %s, %d tasks, %.2f s, driver peak RSS %.0f MiB", self.spec.stage_id, what,
                  len(calls), time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return out

    # -- the Corpus operations

    def put(self, value: Any) -> Any:
        return ray.put(value)

    def _chunks(self, keep: set[str] | None = None) -> list[list[tuple[str, int]]]:
        """Consecutive shards per task: about TASKS_PER_CPU tasks per CPU, so per-task overhead does not
        grow with the shard count while every core stays busy and a retry redoes little."""
        items = [(sh, i) for i, sh in enumerate(self.shards) if keep is None or sh in keep]
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per = max(1, math.ceil(len(items) / (TASKS_PER_CPU * cpus)))
        return [items[i : i + per] for i in range(0, len(items), per)]

    def map(self, fn: Callable[..., Any], columns: Sequence[str], *args: Any,
            side: ShardKeyedInput = None) -> list[Any]:
        st = self.store
        calls = [(st.url, st.storage_options, self.spec.upstream, chunk, tuple(columns), self.spec.stage_id, side,
                  fn, *args) for chunk in self._chunks()]
        return [r for part in self._run("map", _shard_task, calls) for r in part]

    def shuffle(self, name: str, fn: Callable[..., dict[int, pa.Table]], columns: Sequence[str], *args: Any,
                side: ShardKeyedInput = None) -> int:
        st = self.store
        st.remove(*global_work_dir(self.spec.stage_id, name), recursive=True)
        calls = [(st.url, st.storage_options, self.spec.upstream, chunk, tuple(columns), self.spec.stage_id, side,
                  name, fn, *args) for chunk in self._chunks()]
        return int(sum(sum(part) for part in self._run(f"shuffle {name}", _shuffle_task, calls)))

    def reduce(self, name: str, fn: Callable[..., Any], *args: Any) -> list[Any]:
        st = self.store
        calls = [(st.url, st.storage_options, self.spec.stage_id, name, p, fn, *args) for p in range(self.partitions)]
        return self._run(f"reduce {name}", _partition_task, calls)

    def reshuffle(self, name: str, source: str, fn: Callable[..., tuple[dict[int, pa.Table], Any]],
                  *args: Any) -> list[Any]:
        st = self.store
        st.remove(*global_work_dir(self.spec.stage_id, name), recursive=True)
        calls = [(st.url, st.storage_options, self.spec.stage_id, source, name, p, fn, *args)
                 for p in range(self.partitions)]
        return self._run(f"reshuffle {source} -> {name}", _reshuffle_task, calls)

    def discard(self, name: str) -> None:
        self.store.remove(*global_work_dir(self.spec.stage_id, name), recursive=True)

    def call(self, fn: Callable[..., Any], *args: Any, kept: bool = False,
             convert: Callable[[Any], Any] | None = None) -> Any:
        """One task that runs while nothing else of the stage does (a k-means, a centroid search over all
        identities): multi-threaded over its node's CPUs."""
        st, sid = self.store, self.spec.stage_id
        if kept:
            small, ref = self._run("call (kept)", _kept_call_task, [(st.url, st.storage_options, sid, fn, *args)],
                                   True)[0]
            return small, ObjectStoreValue(ref, convert)
        return self._run("call", _call_task, [(st.url, st.storage_options, sid, fn, *args)])[0]

    def gathered(self, name: str, sort_by: str | None = None,
                 convert: Callable[[pa.Table | None], Any] | None = None) -> StoredTable:
        return StoredTable(name, sort_by, convert)

    def commit(self, fn: Callable[..., Batch], *args: Any, side: ShardKeyedInput = None) -> list[ShardResult]:
        st = self.store
        calls = [(st.url, st.storage_options, self.spec, self.stage, side, chunk, fn, *args)
                 for chunk in self._chunks(self.todo)]
        self.results = [r for part in self._run("commit", _commit_task, calls) for r in part]
        return self.results


    def dropped_before(self) -> int:
        total = 0
        for sh in self.shards:
            if sh not in self.todo:
                with self.store.fs.open(self.store.path(*manifest_path(self.spec.stage_id, sh)), "rb") as f:
                    keep = pq.read_table(f, columns=[KEEP, STATUS])
                total += int(pc.sum(pc.and_(pc.invert(keep[KEEP]), pc.equal(keep[STATUS], STATUS_OK))).as_py() or 0)
        return total


# ---------------------------------------------------------------- the stage as a whole


def _whole_table_task(url: str, options: dict[str, Any], spec: StageSpec, stage: GlobalStage,
                      shards: list[str], todo: list[str]) -> tuple[list[ShardResult], Any]:
    """Stages (or params) without a distributed form: one task reads the projected columns of every
    shard as Arrow, runs ``run_global`` once and commits per shard (vectorised split, no rescans)."""
    t0 = time.perf_counter()
    store = RunStorage(url, options)
    stage.setup()
    tables = [read_shard_columns(store, spec.upstream, sh, stage.needs) for sh in shards]
    sizes = [t.num_rows for t in tables]
    if tables:
        schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
        table = pa.concat_tables([t.cast(schema) for t in tables])
    else:
        table = pa.table({c: pa.array([], pa.string()) for c in CARRIED})
    del tables
    out = stage.run_global(table)
    n = table.num_rows
    for col in (STATUS, KEEP):
        out.setdefault(col, [STATUS_OK if col == STATUS else True] * n)
    bounds = [0, *itertools.accumulate(sizes)]
    results = []
    for sh, a, b in zip(shards, bounds[:-1], bounds[1:], strict=True):
        if sh not in todo:
            continue
        part = {k: v[a:b] for k, v in out.items() if isinstance(v, list) and len(v) == n}
        results.append(commit_rows(store, spec, stage, sh, table.slice(a, b - a), part, t0))
    return results, stage.summary()


def run_global_distributed(spec: StageSpec, shards: list[str], todo: Iterable[str],
                           partitions: int | None = None) -> list[ShardResult]:
    """Run one global stage over ``shards`` and commit ``todo`` (the shards not committed yet).

    Called from the driver with Ray initialised. Raises ``GlobalStageError`` when a step keeps failing.
    """
    todo_list = [s for s in shards if s in set(todo)]
    store = RunStorage(spec.context.run_dir, spec.context.storage_options)
    stage = spec.build()
    assert isinstance(stage, GlobalStage)
    if stage.distributed():
        corpus = RayCorpus(spec, stage, shards, todo_list, partitions)
        summary = run_corpus_steps(corpus, store)
        results = corpus.results
    else:
        res = stage.resources
        results, summary = run_calls(
            f"global stage {spec.stage_id!r}: whole-table", _whole_table_task,
            [(store.url, store.storage_options, spec, stage, shards, todo_list)],
            task_options(max(res.cpus, 0.1), int(res.memory_gb * 2**30), res.gpus), error=GlobalStageError)[0]
    write_summary(store, spec.stage_id, summary)
    return results


def run_corpus_steps(corpus: RayCorpus, store: RunStorage) -> dict[str, Any] | None:
    """The stage's distributed steps on ``corpus`` (Ray or in-process), its work folder removed after;
    the stage's summary."""
    corpus.stage.setup()
    try:
        corpus.stage.run_corpus(corpus)
    finally:
        store.remove(*global_work_dir(corpus.spec.stage_id), recursive=True)
    return corpus.stage.summary()


def write_summary(store: RunStorage, stage_id: str, summary: dict[str, Any] | None) -> None:
    """A global stage's run-level summary where the report and status read it."""
    if summary is not None:
        import json

        store.write_atomic(json.dumps(summary, indent=2, sort_keys=True, default=str).encode(),
                           *stage_summary_path(stage_id))

