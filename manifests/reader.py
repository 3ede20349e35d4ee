"""The one reader of a shard's rows, and the one join of the run: a sample's row of a stage is its own
row, else its parent's.

A sample derived by a stage (a face crop cut from an image) has rows of its own from that stage on;
for the stages that ran before it existed, its lineage is its parent's row. Per-shard stage input,
global-stage tasks, the run's tables and the catalog's ``samples`` view all need that rule, so it is
written here once, in the two forms the code base needs: an Arrow row index (``own_or_parent_rows``,
used by ``ShardReader`` / ``shard_rows``) and a DuckDB SQL fragment (the catalog).

A repeated sample id in one stage's fragment: the first row wins (Arrow's ``index_in`` takes the first
match). A stage never writes one (ingest makes a repeated key an error row with an id of its own); the
SQL form joins every such row (deduplicating would cost a run-wide aggregate per stage).

``ShardReader`` opens each committed fragment of one shard once, verified (size and checksum, the whole
file) before any column is used, and hands out projections of it as Arrow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from manifests.commit import CorruptFragmentError, TarRecord, read_manifest_verified, uncommit
from manifests.layout import manifest_path
from manifests.schema import CARRIED, COMMON_NAMES
from manifests.sql import q
from manifests.storage import RunStorage
from manifests.vocabulary import KEEP, PARENT_ID, SAMPLE_ID, STATUS, STATUS_OK

# Builds the exception for a fragment that is absent or failed verification (stage id, shard, why).
LostFragment = Callable[[str, str, str], BaseException]

# ---------------------------------------------------------------- Arrow


def _ids(values: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    return pa.array(values, pa.string())


def own_or_parent_rows(sample_ids: pa.Array | pa.ChunkedArray | Sequence[str | None],
                       parent_ids: pa.Array | pa.ChunkedArray | Sequence[str | None],
                       stage_sample_ids: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    """For each sample, the index of its own row in a stage (``stage_sample_ids``), else of its
    parent's row, else null. Vectorised: one hash lookup per sample, no Python loop."""
    lookup = _ids(stage_sample_ids)
    own = pc.index_in(_ids(sample_ids), value_set=lookup, skip_nulls=True)
    parent = pc.index_in(_ids(parent_ids), value_set=lookup, skip_nulls=True)
    return pc.coalesce(own, parent)


def take_own_or_parent(stage_table: pa.Table, sample_ids: pa.Array | pa.ChunkedArray | Sequence[str | None],
                       parent_ids: pa.Array | pa.ChunkedArray | Sequence[str | None],
                       columns: Sequence[str] | None = None) -> pa.Table:
    """``stage_table``'s rows aligned to ``sample_ids`` by the rule above (null where neither the
    sample nor its parent has a row); only ``columns`` are taken."""
    rows = own_or_parent_rows(sample_ids, parent_ids, stage_table.column(SAMPLE_ID))
    table = stage_table.select(list(columns)) if columns is not None else stage_table
    return table.take(rows)


# ---------------------------------------------------------------- reading one shard


class Upstream(Protocol):
    """What the reader needs to know of an upstream stage (pipeline.engine.execution.UpstreamInfo)."""

    @property
    def stage_id(self) -> str: ...
    @property
    def prune(self) -> bool: ...
    @property
    def columns(self) -> tuple[str, ...]: ...


class ShardReader:
    """The committed fragments of one shard, each read once and verified whole before use.

    ``held``: tables a fused chain already holds for this shard (used as they are, never re-read).
    ``lost``: what to raise for a fragment that is absent or fails verification; with it, the corrupt
    file is uncommitted first (so no resume counts it and the shard is recomputed). Without it, the
    reader's own FileNotFoundError / CorruptFragmentError propagate and nothing is changed."""

    def __init__(self, store: RunStorage, shard: str, *, lost: LostFragment | None = None,
                 held: dict[str, pa.Table] | None = None) -> None:
        self.store = store
        self.shard = shard
        self.lost = lost
        self.tables: dict[str, pa.Table] = dict(held or {})
        self.tars: dict[str, TarRecord | None] = {}

    def fragment(self, stage_id: str, columns: Iterable[str] | None = None) -> pa.Table:
        """The stage's fragment of this shard, projected to those of ``columns`` it has (all: None)."""
        table = self.tables.get(stage_id)
        if table is None:
            table = self.tables[stage_id] = self._read(stage_id)
        if columns is None:
            return table
        wanted = set(columns)
        return table.select([c for c in table.column_names if c in wanted])

    def tar(self, stage_id: str) -> TarRecord | None:
        """The shard tar the stage committed with its fragment (None: none, or the fragment was held)."""
        self.fragment(stage_id, ())
        return self.tars.get(stage_id)

    def own_columns(self, stage_id: str) -> list[str]:
        return [c for c in self.fragment(stage_id).column_names if c not in COMMON_NAMES]

    def _read(self, stage_id: str) -> pa.Table:
        try:
            table, record = read_manifest_verified(self.store, stage_id, self.shard)
        except FileNotFoundError:
            if self.lost is None:
                raise
            raise self.lost(stage_id, self.shard, "manifest fragment missing") from None
        except CorruptFragmentError as exc:
            if self.lost is None:
                raise
            uncommit(self.store, exc.path)
            raise self.lost(stage_id, self.shard, str(exc)) from None
        self.tars[stage_id] = record.tar
        return table

    def lose(self, stage_id: str, reason: str) -> BaseException:
        """A verified fragment whose shard tar turned out missing or corrupt: uncommit the fragment (the
        shard is recomputed) and return the error to raise."""
        uncommit(self.store, self.store.path(*manifest_path(stage_id, self.shard)))
        return (self.lost or _corrupt)(stage_id, self.shard, reason)


def _corrupt(stage_id: str, shard: str, reason: str) -> BaseException:
    return CorruptFragmentError(f"{stage_id}/{shard}", reason)


def live(table: pa.Table, prune: bool) -> pa.Array:
    """The rows a stage passes on: status ok, and kept when the stage prunes."""
    mask = pc.equal(table[STATUS], STATUS_OK)
    if prune:
        mask = pc.and_(mask, table[KEEP])
    return pc.fill_null(mask, False)


def shard_rows(reader: ShardReader, upstream: Sequence[Upstream], columns: Iterable[str] | None) -> pa.Table:
    """The live samples of one shard (those the last upstream stage passes on) with the carried columns
    and each upstream stage's own columns among ``columns`` (all of them: None), joined by the
    own-or-parent rule; where two stages write one column the later one wins, and a column no stage
    wrote comes back as nulls. A stage whose declared columns hold none of ``columns`` is not opened."""
    want = None if columns is None else list(dict.fromkeys(columns))
    last = upstream[-1]
    base = reader.fragment(last.stage_id)
    base = base.filter(live(base, last.prune)).select(list(CARRIED))
    out: dict[str, pa.ChunkedArray | pa.Array] = {c: base[c] for c in CARRIED}
    own_names: list[str] = []
    for u in upstream:
        if want is not None and u.columns and not set(u.columns) & set(want):
            continue
        own = [c for c in reader.own_columns(u.stage_id) if want is None or c in want]
        if not own:
            continue
        tab = reader.fragment(u.stage_id)
        rows = own_or_parent_rows(base[SAMPLE_ID], base[PARENT_ID], tab[SAMPLE_ID])
        for c in own:
            out[c] = tab[c].take(rows)
            own_names.append(c)
    names = [*CARRIED, *dict.fromkeys(c for c in (want if want is not None else own_names) if c not in CARRIED)]
    return pa.table({c: out[c] if c in out else pa.nulls(base.num_rows) for c in names})


# ---------------------------------------------------------------- SQL


def own_or_parent_sql(base: str, source: str, alias: str, columns: Sequence[str], *, has_own: str | None = None
                      ) -> tuple[str, dict[str, str]]:
    """The same rule as a SQL fragment for ``FROM <base> ...``.

    ``base`` is the alias of a relation with one row per sample (``sample_id``, ``parent_id``),
    ``source`` the SQL of a relation (a view name or a parenthesised query) with the stage's rows.
    ``has_own``: a boolean SQL expression over ``base`` saying whether the sample has a row of its
    own in this stage, when the caller knows it (the catalog does, from one pass over the
    decisions); then one equi-join on the right key reads the stage once. Without it, two joins
    (own id, parent id) and the own row wins.
    Returns the join clause(s) and, per requested column, the chosen value; ``sample_id`` is the id
    of the row used (the parent's for a fallback), null where there was none. Only the requested
    columns are projected, so DuckDB reads no others from the Parquet files behind ``source``.
    """
    wanted = [c for c in dict.fromkeys(columns) if c != SAMPLE_ID]
    projection = ", ".join([q(SAMPLE_ID), *(q(c) for c in wanted)])
    sid, pid = f"{base}.{q(SAMPLE_ID)}", f"{base}.{q(PARENT_ID)}"
    if has_own is not None:
        row = q(f"{alias}__row")
        joins = (f"LEFT JOIN (SELECT {projection} FROM {source}) {row} "
                 f"ON {row}.{q(SAMPLE_ID)} = (CASE WHEN {has_own} THEN {sid} ELSE {pid} END)")
        exprs = {c: f"{row}.{q(c)}" for c in wanted}
        exprs[SAMPLE_ID] = f"{row}.{q(SAMPLE_ID)}"
        return joins, exprs
    own, par = q(f"{alias}__own"), q(f"{alias}__parent")
    joins = (
        f"LEFT JOIN (SELECT {projection} FROM {source}) {own} ON {own}.{q(SAMPLE_ID)} = {sid} "
        f"LEFT JOIN (SELECT {projection} FROM {source}) {par} ON {par}.{q(SAMPLE_ID)} = {pid}"
    )
    hit = f"{own}.{q(SAMPLE_ID)} IS NOT NULL"
    exprs = {c: f"CASE WHEN {hit} THEN {own}.{q(c)} ELSE {par}.{q(c)} END" for c in wanted}
    exprs[SAMPLE_ID] = f"coalesce({own}.{q(SAMPLE_ID)}, {par}.{q(SAMPLE_ID)})"
    return joins, exprs
