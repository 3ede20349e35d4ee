"""Kernels the identity stages share: centroids from sums, robust centres, scores against them.

Stage files hold a stage's rules and its order of distributed steps; the arithmetic two stages use is
written here once, so neither imports the other's privates. Every function works on one block of rows
(a shard, an identity partition) and depends only on its arguments.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from facekit.thresholds import Metric
from facekit.vector_index import embedding_matrix, normalise_rows, one_space, table_spaces, train_cells
from stages.base import SAMPLE_ID, Batch, Corpus, Rows

EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")
CELL_SAMPLE_MIN = 20_000  # vectors drawn (over all shards) to train the k-means cells, at least
LOO_MEDIAN_MAX = 64  # above this many images one image barely moves a median; use the plain median


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, metric: Metric, block: int = 8192) -> np.ndarray:
    """Float32 centroids, computed in blocks of rows: whole-table float64 temporaries would be two more
    copies of the identity table (every step is per row, so blocks change no bit)."""
    out = np.empty(sums.shape, dtype=np.float32)
    for s in range(0, len(sums), block):
        means = sums[s : s + block] / np.maximum(counts[s : s + block], 1)[:, None]
        out[s : s + block] = normalise_rows(means) if metric.higher_is_same else means
    return out


def loo_scores(x: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray, metric: Metric,
               inlier: np.ndarray) -> np.ndarray:
    """Leave-one-out score of each row from its identity's inlier sums and counts (any subset of rows:
    the sums may come from the whole run)."""
    scores = np.full(len(x), np.nan, dtype=np.float32)
    m = counts[codes] - inlier  # inliers other than the row
    ok = m > 0
    ref = (sums[codes[ok]] - x[ok] * inlier[ok, None]) / m[ok, None]
    if metric.higher_is_same:
        ref = normalise_rows(ref)
    scores[ok] = metric.score(x[ok], ref.astype(np.float32))
    return scores


def median_scores(x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, inlier: np.ndarray) -> np.ndarray:
    """Score of each row against the coordinate-wise median of its identity's other inliers (of all of
    them above ``LOO_MEDIAN_MAX``): needs every row of an identity, so ``x`` holds whole identities."""
    scores = np.full(len(x), np.nan, dtype=np.float32)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(k + 1))
    for c in range(k):
        rows = order[starts[c] : starts[c + 1]]
        good = rows[inlier[rows]]
        ref = np.full((rows.size, x.shape[1]), np.nan, dtype=np.float64)
        whole = np.median(x[good], axis=0) if good.size > LOO_MEDIAN_MAX else None
        for r, row in enumerate(rows):
            others = good[good != row]
            if others.size:
                ref[r] = whole if whole is not None else np.median(x[others], axis=0)
        ok = ~np.isnan(ref[:, 0])
        if metric.higher_is_same:
            ref[ok] = normalise_rows(ref[ok])
        scores[rows[ok]] = metric.score(x[rows[ok]], ref[ok].astype(np.float32))
    return scores


def next_inliers(same: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Rows the next pass builds centres from: those found the same identity, except that an identity
    left with fewer than 2 of them keeps all its rows."""
    enough = np.bincount(codes[same], minlength=k) >= 2
    return same | ~enough[codes]


def impostor_scores(
    x: np.ndarray, codes: np.ndarray, cents: np.ndarray, metric: Metric, limit: int, seed: int
) -> np.ndarray:
    """Each row vs identity centroids other than its own: all of them, or ``limit`` random ones."""
    n, k = len(x), len(cents)
    if k < 2:
        return np.empty(0, dtype=np.float32)
    if n * (k - 1) <= limit:
        rows = np.repeat(np.arange(n), k)
        others = np.tile(np.arange(k), n)
        keep = others != codes[rows]
        rows, others = rows[keep], others[keep]
    else:
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, n, limit)
        shift = rng.integers(1, k, limit)  # never the row's own identity
        others = (codes[rows] + shift) % k
    out = np.empty(rows.size, dtype=np.float32)
    step = 1 << 18
    for s in range(0, rows.size, step):
        out[s : s + step] = metric.score(x[rows[s : s + step]], cents[others[s : s + step]])
    return out


def nearest_other(scores: np.ndarray, ids: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From a 2-nearest search: each row's nearest identity that is not its own ``own`` code (the first
    hit, or the second where the first is itself); (identity codes, scores)."""
    pick = np.where(ids[:, 0] == own, 1, 0)
    at = np.arange(len(ids))
    return ids[at, pick], scores[at, pick]


def commit_unjudged(table: pa.Table, index: int, columns: list[str]) -> Batch:
    """A shard's rows when there is nothing to judge: every sample kept, the stage's columns empty."""
    return Rows(table.column(SAMPLE_ID).to_pylist(), columns).batch()


def embedding_census(table: pa.Table, index: int) -> dict[str, Any]:
    """Rows, rows with a usable vector, and the spaces and metrics they declare (one shard)."""
    valid = np.zeros(table.num_rows, dtype=bool)
    spaces: set[str] = set()
    metrics: set[str] = set()
    if set(EMBEDDING_COLUMNS) <= set(table.column_names):
        _, valid = embedding_matrix(table)
        spaces, metrics = table_spaces(table, valid)
    return {"n": table.num_rows, "valid": int(valid.sum()), "spaces": spaces, "metrics": metrics}


def census_space(census: list[dict[str, Any]]) -> tuple[str, Metric]:
    """The run's one embedding space and its metric, from every shard's census (two spaces: an error)."""
    return one_space(set().union(*(c["spaces"] for c in census)), set().union(*(c["metrics"] for c in census)))


def unit_vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows and their vectors, normalised in cosine spaces (what the stages compare)."""
    x, valid = embedding_matrix(table)
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        return rows, np.zeros((0, x.shape[1]), dtype=np.float32)
    metric = Metric(table.column("embedding_metric")[int(rows[0])].as_py())
    xv = normalise_rows(x[rows]) if metric.higher_is_same else x[rows]
    return rows, np.ascontiguousarray(xv, dtype=np.float32)


def vector_sample(table: pa.Table, index: int, per_shard: int, seed: int) -> np.ndarray:
    """Up to ``per_shard`` of a shard's vectors, drawn by (seed, shard index): the same draw on a rerun."""
    _, x = unit_vectors(table)
    if len(x) <= per_shard:
        return x
    pick = np.sort(np.random.default_rng([seed, index]).choice(len(x), per_shard, replace=False))
    return x[pick]


def corpus_cells(corpus: Corpus, n_valid: int, nlist: int, seed: int) -> np.ndarray:
    """``nlist`` k-means cells trained in one task on a bounded sample of the run's vectors (32 per cell,
    at least ``CELL_SAMPLE_MIN``, spread over the shards); one all-zero cell when ``nlist`` is 1."""
    if nlist <= 1:
        return np.zeros((1, 1), dtype=np.float32)
    per_shard = max(1, -(-min(n_valid, max(nlist * 32, CELL_SAMPLE_MIN)) // max(1, len(corpus.shards))))
    sample = np.concatenate(corpus.map(vector_sample, list(EMBEDDING_COLUMNS), per_shard, seed))
    cells: np.ndarray = corpus.call(train_cells, sample, nlist, seed)
    return cells
