"""``stages.base.Corpus`` in one process: the Ray corpus's own task functions, called in order.

A global stage's algorithm (shuffles, rounds, joins by shard index) is the same whichever corpus runs it;
this one runs every task in the calling process, one after another, reading the same shards and writing
its shuffles to the same work folder as ``RayCorpus``. Tests of a stage's decisions use it without
starting Ray, and a profile of one stage sees every step in one process. Objects that Ray would keep in
its store (``put``, ``call(kept=True)``) are kept here as plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from manifests.storage import RunStorage
from pipeline.engine.execution import ShardResult, StageSpec
from pipeline.engine.global_exec import RayCorpus, _resolve, run_corpus_steps, write_summary
from stages.base import GlobalStage, ObjectStoreValue


class LocalCorpus(RayCorpus):
    """The Ray corpus's operations with every task run in this process, in submission order."""

    def __init__(self, spec: StageSpec, stage: GlobalStage, shards: Sequence[str], todo: Sequence[str],
                 partitions: int | None = None, shards_per_task: int = 1) -> None:
        super().__init__(spec, stage, shards, todo, partitions)
        self.shards_per_task = shards_per_task

    def _run(self, what: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]], kept: bool = False) -> list[Any]:
        out = []
        for c in calls:
            args = tuple(_local(a) for a in c)
            out.append(fn(*args))
        return out

    def put(self, value: Any) -> Any:
        return value

    def _chunks(self, keep: set[str] | None = None) -> list[list[tuple[str, int]]]:
        items = [(sh, i) for i, sh in enumerate(self.shards) if keep is None or sh in keep]
        per = self.shards_per_task
        return [items[i : i + per] for i in range(0, len(items), per)]

    def call(self, fn: Callable[..., Any], *args: Any, kept: bool = False,
             convert: Callable[[Any], Any] | None = None) -> Any:
        resolved = _resolve(self.store, self.spec.stage_id, tuple(_local(a) for a in args))
        if kept:
            small, large = fn(*resolved)
            return small, ObjectStoreValue(large, convert)
        return fn(*resolved)


def _local(arg: Any) -> Any:
    """An ``ObjectStoreValue`` holds its value itself here: hand the task the value (converted), as Ray's
    fetch would."""
    if isinstance(arg, ObjectStoreValue):
        return arg.convert(arg.ref) if arg.convert else arg.ref
    return arg


def run_local(spec: StageSpec, shards: list[str], todo: Iterable[str], partitions: int | None = None,
              shards_per_task: int = 1) -> tuple[list[ShardResult], dict[str, Any] | None]:
    """Run one distributed global stage in this process over ``shards``, commit ``todo``, write its summary
    where the runner writes it; returns the shard results and the summary."""
    keep = set(todo)
    store = RunStorage(spec.context.run_dir, spec.context.storage_options)
    stage = spec.build()
    assert isinstance(stage, GlobalStage) and stage.distributed()
    corpus = LocalCorpus(spec, stage, shards, [s for s in shards if s in keep], partitions, shards_per_task)
    summary = run_corpus_steps(corpus, store)
    write_summary(store, spec.stage_id, summary)
    return corpus.results, summary
