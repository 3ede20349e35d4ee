"""The one join of the run: a sample's row of a stage is its own row, else its parent's.

A sample derived by a stage (a face crop cut from an image) has rows of its own from that stage on;
for the stages that ran before it existed, its lineage is its parent's row. Input assembly, the
catalog's ``samples`` view and lineage all need that rule, so it is written here once, in the two
forms the code base needs: a DuckDB SQL fragment (the catalog) and an Arrow row index (per-shard
input assembly, which must not go through Python lists).

The Arrow form takes a stage's first row when it holds a sample id twice; the SQL form joins every
such row (deduplicating would cost a run-wide aggregate per stage), so a repeated key must be made
an error row with an id of its own upstream (ingest does so), never a second row under the same id.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from manifests.sql import q
from manifests.vocabulary import PARENT_ID, SAMPLE_ID

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
