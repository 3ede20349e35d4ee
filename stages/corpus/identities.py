"""Per-identity tables kept out of the driver: the pieces consistency and separation share.

A run of WebFace scale has millions of identities; a table of them at 512 dimensions (sums in float64
for exact accumulation, centroids in float32) is tens of GB. So identities are hash-partitioned: each
shard sends one record per identity it holds (its sums, its shard index) to the identity's partition,
a partition task adds them in shard order (the same additions, in the same order, as one process adding
shard after shard: results are bit-identical) and sends each shard back the totals of its own
identities. Only counts come back to the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from facekit.thresholds import Metric
from facekit.vector_index import EXACT_MAX, embedding_matrix, normalise_rows, table_spaces
from stages.base import IDENTITY_ID, Corpus, GlobalStage, Params, Resources
from stages.corpus.kernels import EMBEDDING_COLUMNS, census_space, commit_unjudged

PARTITION_BYTES = 64 << 20  # vector payload of one identity partition
RECORD_ROWS = 640  # bytes a record counts as one row of the engine's row-based partition plan


def _usable(table: pa.Table, valid: np.ndarray) -> np.ndarray:
    """Rows with an embedding and an identity label: the rows identity tables are made of."""
    return valid & ~np.asarray(table.column(IDENTITY_ID).is_null().to_numpy(zero_copy_only=False), dtype=bool)


def space_census(table: pa.Table, index: int) -> dict[str, Any]:
    """One shard's spaces and metrics, and counts only: rows, labelled rows, distinct identities."""
    x, valid = embedding_matrix(table)
    usable = _usable(table, valid)
    spaces, metrics = table_spaces(table, valid)
    ids = table.column(IDENTITY_ID).filter(pa.array(usable)).unique()
    return {"spaces": spaces, "metrics": metrics, "n": table.num_rows, "labelled": int(usable.sum()),
            "identities": len(ids), "dim": x.shape[1]}


def plan_identity_partitions(corpus: Corpus, census: list[dict[str, Any]], fixed: int | None,
                             record_bytes: int) -> int:
    """Partitions for the (identity, shard) records of the run: none holding more than about
    ``PARTITION_BYTES`` of vectors."""
    if fixed:
        corpus.partitions = fixed
        return fixed
    records = sum(c["identities"] for c in census)
    return corpus.plan_partitions(records * max(1, math.ceil(record_bytes / RECORD_ROWS)))


@dataclass(frozen=True)
class IdentitySpace:
    """What an identity stage's distributed steps start from: the run's space, its metric, the number of
    identity partitions and the run's live rows."""

    space: str
    metric: Metric
    parts: int
    rows: int


class IdentityParams(Params):
    """The params of every identity stage: how the search among centroids runs, how the run is cut."""

    exact_max: int = Field(
        EXACT_MAX, ge=0, description=
        "up to this many centroids the search among them is exact, above it approximate (IVF)")
    partitions: int | None = Field(
        None, ge=1, description="identity partitions of the distributed form; null: sized from the run")


class IdentityStage(GlobalStage):
    """A global stage that judges identities by their embeddings' centroids, in the distributed form only;
    what it decided, and how, is its summary."""

    resources: ClassVar[Resources] = Resources(cpus=1.0)
    needs: tuple[str, ...] = EMBEDDING_COLUMNS
    _summary: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Threshold used, how it was chosen, and counts, for the run report."""
        return dict(getattr(self, "_summary", {}))

    def distributed(self) -> bool:
        return True

    def identity_space(self, corpus: Corpus, partitions: int | None, vectors_per_record: int,
                       unjudged: dict[str, Any]) -> IdentitySpace | None:
        """The space and partitions for records of ``vectors_per_record`` vectors each; None, with every
        sample kept unjudged and ``unjudged`` as the summary, when no image carries an identity label."""
        census = corpus.map(space_census, EMBEDDING_COLUMNS)
        if not any(c["labelled"] for c in census):
            self._summary = unjudged
            corpus.commit(commit_unjudged, [f.name for f in self.columns])
            return None
        space, metric = census_space(census)
        d = max(c["dim"] for c in census)
        parts = plan_identity_partitions(corpus, census, partitions, vectors_per_record * 8 * d + 64)
        return IdentitySpace(space, metric, parts, sum(c["n"] for c in census))


def shard_labelled(table: pa.Table, metric: Metric) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors of the labelled rows, unit length in cosine spaces, float32; their row numbers; their
    labels as a str array)."""
    x, valid = embedding_matrix(table)
    rows = np.flatnonzero(_usable(table, valid))
    if metric.higher_is_same and rows.size:
        x = normalise_rows(x)
    xj = np.ascontiguousarray(x[rows], dtype=np.float32) if rows.size else np.zeros((0, x.shape[1]), np.float32)
    labels = np.asarray(table.column(IDENTITY_ID).take(pa.array(rows)).to_pylist(), dtype=object).astype(str)
    return xj, rows, labels


def vectors(x: np.ndarray) -> pa.Array:
    """A (n, d) array as a fixed-size list column (its dtype kept)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).ravel()), x.shape[1])


def matrix(column: pa.ChunkedArray | pa.Array, dtype: type = np.float64) -> np.ndarray:
    """A fixed-size list column back as (n, d)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(arr), d)


def names(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=object).astype(str)


def runs(table: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Records sorted by (identity, shard), where each identity's run starts, and each record's identity
    number: adding a run in order adds the shards in run order."""
    table = table.sort_by([("identity", "ascending"), ("shard", "ascending")])
    ids = names(table.column("identity"))
    first = np.r_[True, ids[1:] != ids[:-1]] if ids.size else np.zeros(0, dtype=bool)
    return table, np.flatnonzero(first), np.cumsum(first) - 1


def aligned(own: np.ndarray, piece: pa.Table | None, what: str) -> np.ndarray:
    """Row of ``piece`` (a shard's side table) for each of the shard's sorted identities ``own``."""
    if piece is None:
        if own.size:
            raise RuntimeError(f"{what}: no identity table came back for this shard's {own.size} identities")
        return np.empty(0, dtype=np.int64)
    ids = names(piece.column("identity"))
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], own)
    pos = np.minimum(pos, max(ids.size - 1, 0))
    if ids.size == 0 or not np.array_equal(ids[order][pos], own):
        raise RuntimeError(f"{what}: the identity table that came back misses some of this shard's identities")
    return order[pos]


def centroid_table(table: pa.Table | None) -> tuple[pa.Array, np.ndarray]:
    """A gathered (identity, centroid) table, sorted by identity, as (identities, float32 centroids): a
    row's position is its code in the run's sorted identity order. Identities stay Arrow strings (no
    Python object per identity of the run)."""
    if table is None or table.num_rows == 0:
        return pa.array([], pa.string()), np.zeros((0, 0), dtype=np.float32)
    return table.column("identity").combine_chunks(), matrix(table.column("centroid"), np.float32)


def codes_in(labels: np.ndarray | pa.Array | pa.ChunkedArray, identities: pa.Array) -> np.ndarray:
    """Each label's position in ``identities`` (-1 where absent), by Arrow's hash lookup."""
    pos = pc.index_in(pa.array(labels, pa.string()) if isinstance(labels, np.ndarray) else labels,
                      value_set=identities)
    return np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def names_at(identities: pa.Array, codes: np.ndarray) -> pa.Array:
    """The identities at ``codes``, null where a code is -1."""
    return identities.take(pa.array(np.maximum(codes, 0), mask=codes < 0))
