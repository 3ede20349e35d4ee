"""Neighbour search over embedding columns: exact FAISS for small runs, a partitioned self-join above.

Global stages ask two questions of a set of vectors: "which pairs are within a threshold?" (dedup,
grouping, separation) and "what are the k nearest of these queries?" (nearest other identity).

Up to ``EXACT_MAX`` vectors both are answered exactly with ``IndexFlatIP`` / ``IndexFlatL2``
(range_search and search run as BLAS matrix products). Above it, kNN uses ``IndexIVFFlat`` and range
pairs come from an IVF-partitioned self-join: vectors are PCA-reduced to ``PCA_DIM`` dimensions,
cut into k-means cells (FAISS), each stored in its nearest cell and probing its ``nprobe`` nearest
ones; every probed cell is scored against its members with one matrix product in the reduced space,
and the few candidate pairs that pass are re-scored exactly in the full space. That is FAISS's IVF
search batched per cell rather than per query: ``IndexIVFFlat.search`` scans one vector at a time
(~15 GFLOP/s measured on these 2 cores, 1M x 512-d would take minutes), a per-cell product runs at
BLAS speed on an 8x smaller dimension. Returned scores are exact, so a pair is never a false
positive; recall is traded for time by ``nprobe`` (bench/bench_near_duplicates.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from facekit.thresholds import Metric

EXACT_MAX = 20_000  # all-pairs exact search costs n^2 d: 20k x 512-d is ~0.4 TFLOP, a few seconds
PCA_DIM = 64  # coarse-assignment space; distances shrink uniformly under a projection, ranks barely move
ASSIGN_CHUNK = 65_536  # rows per cell-assignment task


@dataclass(frozen=True)
class Pairs:
    """Unordered neighbour pairs (i < j) with their exact score in the metric's own units."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    exact: bool  # True when the candidate set was exhaustive

    def __len__(self) -> int:
        return int(self.i.size)


def embedding_matrix(table: pa.Table, column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 matrix of a list column and a mask of the rows that have a vector.

    Rows without a vector (an upstream error) get zeros and ``False`` in the mask.
    """
    col = table.column(column).combine_chunks()
    n = len(col)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if not valid.any():
        return np.zeros((n, 0), dtype=np.float32), valid
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        # flatten() skips null lists, so scatter the rows back into place
        x = np.zeros((n, d), dtype=np.float32)
        x[valid] = flat.reshape(-1, d)
        return x, valid
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise TypeError(f"column {column!r} must be a list of floats, got {col.type}")
    lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    d = int(lengths[valid][0])
    if np.any(lengths[valid] != d):
        raise ValueError(f"column {column!r}: vectors of different lengths {sorted(set(lengths[valid]))}")
    x = np.zeros((n, d), dtype=np.float32)
    x[valid] = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return x, valid


def group_sums(codes: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Per-code sums of the rows of ``x`` in float64, shape (size, d): ``np.add.at(out, codes, x)``
    bit for bit (each code's rows are added in row order), about 7x faster on 10,000 x 128 (add.at's
    scatter is per element; a stable sort and ``add.reduceat`` add whole rows)."""
    out = np.zeros((size, x.shape[1]), dtype=np.float64)
    if codes.size == 0:
        return out
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    out[sorted_codes[starts]] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    return out


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine spaces compare unit vectors)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def space_of(table: pa.Table, valid: np.ndarray) -> tuple[str, Metric]:
    """The one embedding space and metric of the rows that have vectors; mixing spaces is an error."""
    spaces = {s for s, ok in zip(table.column("embedding_space").to_pylist(), valid, strict=True) if ok}
    metrics = {m for m, ok in zip(table.column("embedding_metric").to_pylist(), valid, strict=True) if ok}
    if len(spaces) != 1 or len(metrics) != 1:
        raise ValueError(
            f"expected one embedding space and metric, got spaces {sorted(map(str, spaces))} "
            f"and metrics {sorted(map(str, metrics))}: thresholds are only comparable within one space"
        )
    return spaces.pop(), Metric(metrics.pop())


def _faiss_metric(metric: Metric) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric.higher_is_same else faiss.METRIC_L2


def _to_score(raw: np.ndarray, metric: Metric) -> np.ndarray:
    """FAISS returns inner products or squared L2; convert to the metric's units."""
    if metric.higher_is_same:
        return raw.astype(np.float32, copy=False)
    return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)


def default_nlist(n: int) -> int:
    """About 2 sqrt(n) cells: balances assigning to cells (n * nlist) against the join (n^2 / nlist).

    Measured at 1M x 512-d, nprobe 16: 2000 cells 46 s / recall 0.9967, 4000 cells 47 s / 0.9935."""
    return int(min(8192, max(16, round(2 * math.sqrt(n)))))


def build_index(
    x: np.ndarray, metric: Metric, exact_max: int = EXACT_MAX, nprobe: int = 16, seed: int = 0
) -> faiss.Index:
    """A flat (exact) index up to ``exact_max`` vectors, an ``IndexIVFFlat`` above it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    index: Any
    if n <= exact_max:
        index = faiss.IndexFlatIP(d) if metric.higher_is_same else faiss.IndexFlatL2(d)
    else:
        nlist = default_nlist(n)
        quantizer = faiss.IndexFlatIP(d) if metric.higher_is_same else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, _faiss_metric(metric))
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, min(n, nlist * 64), replace=False))]
        index.train(train)
        index.nprobe = nprobe
    index.add(x)
    return index


def knn(
    x: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: Metric,
    exact_max: int = EXACT_MAX,
    nprobe: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest database rows of each query: (scores, ids), best first; missing neighbours are -1."""
    index = build_index(x, metric, exact_max=exact_max, nprobe=nprobe, seed=seed)
    k = min(k, len(x))
    raw, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return _to_score(raw, metric), ids


def range_pairs(
    x: np.ndarray,
    metric: Metric,
    threshold: float,
    exact_max: int = EXACT_MAX,
    nlist: int | None = None,
    nprobe: int = 16,
    seed: int = 0,
    coarse_dim: int = PCA_DIM,
    slack: float = 2.0,
) -> Pairs:
    """Every pair (i < j) whose score passes ``threshold`` (inclusive): exact up to ``exact_max`` rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return Pairs(empty, empty, np.empty(0, dtype=np.float32), exact=True)
    if n <= exact_max:
        return _exact_pairs(x, metric, threshold)
    return _partitioned_pairs(
        x, metric, threshold, nlist or default_nlist(n), nprobe, seed, coarse_dim, slack
    )


def range_rows(lims: np.ndarray) -> np.ndarray:
    """The query row of each result of a FAISS range search (``lims`` holds the per-query offsets)."""
    counts = np.diff(np.asarray(lims, dtype=np.int64)).astype(np.int64)
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def _exact_pairs(x: np.ndarray, metric: Metric, threshold: float) -> Pairs:
    d = x.shape[1]
    index: Any
    if metric.higher_is_same:
        index = faiss.IndexFlatIP(d)
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # FAISS keeps ip > radius
    else:
        index = faiss.IndexFlatL2(d)
        radius = float(np.nextafter(np.float32(threshold) ** 2, np.float32(np.inf)))  # keeps d2 < radius
    index.add(x)
    lims, raw, ids = index.range_search(x, radius)
    rows = range_rows(lims)
    return _finish(rows, ids.astype(np.int64), _to_score(raw, metric), metric, threshold, exact=True)


def _finish(
    a: np.ndarray, b: np.ndarray, score: np.ndarray, metric: Metric, threshold: float, exact: bool
) -> Pairs:
    """Orient pairs i < j, drop self pairs and repeats, keep those passing the threshold."""
    ok = (a != b) & metric.same(score, threshold)
    a, b, score = a[ok], b[ok], score[ok]
    i, j = np.minimum(a, b), np.maximum(a, b)
    code = i * (int(max(j.max(initial=0), i.max(initial=0))) + 1) + j
    _, first = np.unique(code, return_index=True)
    return Pairs(i[first], j[first], score[first], exact=exact)


def _projection(x: np.ndarray, sample: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    """PCA to ``dim`` dimensions and the share of the data's variance it keeps (1.0 when not reduced)."""
    d = x.shape[1]
    if d <= dim:
        return x, 1.0
    pca = faiss.PCAMatrix(d, dim)
    pca.train(np.ascontiguousarray(x[sample]))
    z = pca.apply(x)
    kept = float(z[sample].var(axis=0).sum() / max(x[sample].var(axis=0).sum(), 1e-12))
    return z, min(1.0, kept)


def _exact_scores(x: np.ndarray, a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    out = np.empty(a.size, dtype=np.float32)
    step = 1 << 13  # two gathered (step, d) blocks at a time: 8 MiB at 128-d
    for s in range(0, a.size, step):
        out[s : s + step] = metric.score(x[a[s : s + step]], x[b[s : s + step]])
    return out


def _partitioned_pairs(
    x: np.ndarray,
    metric: Metric,
    threshold: float,
    nlist: int,
    nprobe: int,
    seed: int,
    coarse_dim: int,
    slack: float,
) -> Pairs:
    """IVF self-join in a PCA space, then exact scores for the candidates.

    A pair within distance r has its projected distance within r too (a projection never lengthens a
    vector), so ``|P(a-b)|^2 <= r^2`` loses nothing; it is also weak when the projection keeps a small
    share ``f`` of the variance. Near-duplicate differences spread over all dimensions keep about ``f``
    of their length squared in the projection, so candidates are pairs with
    ``|P(a-b)|^2 <= min(1, slack * f) r^2``: with ``slack`` 2 and 64 kept dimensions a difference must
    put twice its share into the projection to be missed (~5 sigma for isotropic noise); ``slack`` inf
    restores the lossless bound.
    """
    n = len(x)
    nlist = min(nlist, n)
    nprobe = max(1, min(nprobe, nlist))
    rng = np.random.default_rng(seed)
    workers = _workers()
    with _single_threaded_kernels(), ThreadPoolExecutor(workers) as pool:
        # Cells only partition the join (scores are exact), so a short k-means on a small sample does.
        sample = np.sort(rng.choice(n, min(n, max(nlist * 16, 20_000)), replace=False))
        z, kept = _projection(x, sample, coarse_dim)
        km = faiss.Kmeans(
            z.shape[1], nlist, niter=5, seed=seed, max_points_per_centroid=16, min_points_per_centroid=1
        )
        km.train(np.ascontiguousarray(z[sample]))
        chunks = [z[s : s + ASSIGN_CHUNK] for s in range(0, n, ASSIGN_CHUNK)]
        cells = np.concatenate([c for _, c in pool.map(lambda q: km.index.search(q, nprobe), chunks)])

        # Rounding between a block product and a row-wise score: the exact check in _finish decides.
        loose = threshold - 1e-4 if metric.higher_is_same else threshold + 1e-4

        def passes(score: np.ndarray) -> np.ndarray:
            return metric.same(score, loose)

        r2 = threshold * threshold if not metric.higher_is_same else max(0.0, 2.0 - 2.0 * threshold)
        bound = -0.5 * min(1.0, slack * kept) * r2
        # -|za - zb|^2 / 2 as one inner product: [za, -|za|^2/2, 1] . [zb, 1, -|zb|^2/2]
        half_sq = -0.5 * np.einsum("ij,ij->i", z, z)
        ones = np.ones((n, 1), dtype=np.float32)
        q_aug = np.hstack([z, half_sq[:, None], ones])
        member_order, member_bounds = _group_by(cells[:, 0], nlist)
        m_sorted = np.hstack([z, ones, half_sq[:, None]])[member_order]  # a cell's members: one block
        del z, ones
        probe_order, probe_bounds = _group_by(cells.ravel(), nlist)
        probe_points = probe_order // nprobe  # the row whose probe list holds this entry
        del cells, probe_order

        def join(cells_: range) -> tuple[np.ndarray, np.ndarray]:
            found_a, found_b = [], []
            for cell in cells_:
                m0, m1 = member_bounds[cell], member_bounds[cell + 1]
                p0, p1 = probe_bounds[cell], probe_bounds[cell + 1]
                if m1 == m0 or p1 == p0:
                    continue
                queries = probe_points[p0:p1]
                members = member_order[m0:m1]
                hits = np.flatnonzero(q_aug[queries] @ m_sorted[m0:m1].T >= bound)  # 10x a 2-d nonzero
                # Only pairs that pass stay: candidates of a loose threshold are most of the run's pairs.
                if hits.size * 8 > queries.size * members.size:
                    # A weak coarse bound (a loose threshold: centroid collisions, grouping) passes much
                    # of the block; scoring the block in full dimensions is cheaper than gathering hits.
                    hits = np.flatnonzero(passes(_block_scores(x[queries], x[members], metric)))
                    hit_q, hit_m = np.divmod(hits, members.size)
                else:
                    hit_q, hit_m = np.divmod(hits, members.size)
                    ok = passes(metric.score(x[queries[hit_q]], x[members[hit_m]]))
                    hit_q, hit_m = hit_q[ok], hit_m[ok]
                found_a.append(queries[hit_q])
                found_b.append(members[hit_m])
            empty = np.empty(0, dtype=np.int64)
            return np.concatenate(found_a or [empty]), np.concatenate(found_b or [empty])

        step = max(1, nlist // (8 * workers))
        parts = list(pool.map(join, [range(c, min(c + step, nlist)) for c in range(0, nlist, step)]))
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    keep = a != b
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    code = np.unique(a * n + b)  # a pair probed from both sides appears twice
    a, b = code // n, code % n
    return _finish(a, b, _exact_scores(x, a, b, metric), metric, threshold, exact=False)


def _block_scores(q: np.ndarray, m: np.ndarray, metric: Metric) -> np.ndarray:
    """Every query against every member, in the metric's own score (a (len(q), len(m)) block)."""
    dots = q @ m.T
    if metric.higher_is_same:
        return dots
    sq = np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", m, m)[None, :] - 2.0 * dots
    return np.sqrt(np.maximum(sq, 0.0))


def _group_by(keys: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouping equal keys (stable) and each key's [start, stop) bounds in that order."""
    small = keys.astype(np.uint16) if bins <= np.iinfo(np.uint16).max else keys
    order = np.argsort(small, kind="stable")  # numpy radix-sorts 16-bit keys: linear time
    bounds = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=bins))])
    return order, bounds


def _workers() -> int:
    """CPUs this process may use (the cgroup / affinity view, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _single_threaded_kernels() -> Iterator[None]:
    """One BLAS and one OpenMP thread per call, parallelism from our own threads instead.

    The join is thousands of small products: multithreaded OpenBLAS runs them 6x slower than one
    thread (15 vs 91 GFLOP/s measured for 2200x66 @ 66x137 on a shared 2-core machine), and FAISS's
    OpenMP k-means and assignment were 2-4x slower with 2 threads than with 1 when other processes
    share the cores. Coarse-grained Python threads (numpy and FAISS release the GIL) use the cores
    without that overhead.
    """
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(old)


# ---------------------------------------------------------------- per-partition helpers (distributed stages)


def table_spaces(table: pa.Table, valid: np.ndarray) -> tuple[set[str], set[str]]:
    """The embedding spaces and metrics of the rows that have vectors (checked across shards by the
    caller: thresholds only compare within one space)."""
    if not valid.any():
        return set(), set()
    sp = table.column("embedding_space").filter(pa.array(valid)).unique().to_pylist()
    me = table.column("embedding_metric").filter(pa.array(valid)).unique().to_pylist()
    return {str(s) for s in sp}, {str(m) for m in me}


def one_space(spaces: set[str], metrics: set[str]) -> tuple[str, Metric]:
    """The run's one space and metric; mixing spaces is an error (same message as ``space_of``)."""
    if len(spaces) != 1 or len(metrics) != 1:
        raise ValueError(
            f"expected one embedding space and metric, got spaces {sorted(spaces)} "
            f"and metrics {sorted(metrics)}: thresholds are only comparable within one space"
        )
    return next(iter(spaces)), Metric(next(iter(metrics)))


def serialize_index(index: faiss.Index) -> np.ndarray:
    """An index as bytes, to build it once and send it to every task."""
    return faiss.serialize_index(index)


def deserialize_index(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data))


def train_cells(sample: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """k-means cells (SemDeDup's clustering step) from a sample; ``nlist`` centroids, deterministic."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    nlist = max(1, min(nlist, len(sample)))
    if nlist == 1:
        return sample.mean(axis=0, keepdims=True).astype(np.float32)
    with _single_threaded_kernels():
        km = faiss.Kmeans(sample.shape[1], nlist, niter=10, seed=seed, max_points_per_centroid=64,
                          min_points_per_centroid=1)
        km.train(sample)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign_cells(x: np.ndarray, cells: np.ndarray, spill: int) -> np.ndarray:
    """The ``spill`` nearest cells of each vector (L2 to the centroids), nearest first."""
    if len(cells) == 1 or len(x) == 0:
        return np.zeros((len(x), 1), dtype=np.int64)
    index = faiss.IndexFlatL2(cells.shape[1])
    index.add(np.ascontiguousarray(cells, dtype=np.float32))
    with _single_threaded_kernels():
        _, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), min(spill, len(cells)))
    return ids.astype(np.int64)


def cell_pairs(x: np.ndarray, ids: np.ndarray, metric: Metric, threshold: float,
               block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (ids[a] < ids[b]) of one cell whose exact score passes ``threshold`` (inclusive):
    blocked all-pairs products, so a cell of any size stays within ``block`` x n scores at a time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    found_a, found_b, found_s = [], [], []
    sq = np.einsum("ij,ij->i", x, x) if not metric.higher_is_same else None
    for s in range(0, n, block):
        q = x[s : s + block]
        dots = q @ x[s:].T  # only the upper triangle: partners at or after the block start
        if metric.higher_is_same:
            score = dots
        else:
            assert sq is not None
            score = np.sqrt(np.maximum(sq[s : s + block, None] + sq[None, s:] - 2.0 * dots, 0.0))
        qa, qb = np.nonzero(metric.same(score, threshold))
        qb = qb + s
        keep = (qa + s) < qb
        qa, qb = qa[keep] + s, qb[keep]
        found_a.append(qa)
        found_b.append(qb)
        found_s.append(score[qa - s, qb - s].astype(np.float32))
    if not found_a:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0, dtype=np.float32)
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    ia, ib = ids[a], ids[b]
    return np.minimum(ia, ib), np.maximum(ia, ib), np.concatenate(found_s)
