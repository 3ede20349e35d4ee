"""Average linkage from per-cluster sums: candidate pairs by k nearest neighbours, merges by reciprocal
nearest neighbours (RAC), vectorised over every component of a partition at once.

A cluster is kept as sufficient statistics: its member count ``n``, the sum ``s`` of its members' vectors
and, in euclidean spaces, the sum ``q`` of their squared norms. Average linkage between clusters A and B
follows from them exactly:

- cosine spaces (unit vectors): mean pairwise cosine = dot(s_A, s_B) / (n_A n_B);
- euclidean spaces: mean pairwise *squared* distance = q_A / n_A + q_B / n_B - 2 dot(s_A, s_B) / (n_A n_B).
  Average linkage runs on squared distances there, cut at threshold^2 (scipy's ``average`` linkage on
  ``sqeuclidean``): the mean of squared distances is what sums give exactly; a mean of distances is not.

Scores are similarities (higher is closer): the mean cosine, or minus the mean squared distance; ``cut``
turns a threshold in the space's units into that scale.

Average linkage is reducible (a merged cluster is never closer to a third one than the closer of its
parts), so merging every reciprocal-nearest pair in a round gives the clusters of sequential HAC over
the same candidate pairs (Sumengen et al., "Scaling Hierarchical Agglomerative Clustering to
Billion-sized Datasets", 2021). Ties are broken by one total order on pairs: score, then the smaller
member id, then the larger; so the answer depends neither on row order nor on partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facekit.thresholds import Metric

BLOCK = 1024  # rows per block of a cell's all-pairs scores: BLOCK x cell size floats at a time
LOOSE = 1e-4  # candidate scores are float32 products; RAC rescores exactly in float64


@dataclass
class Clusters:
    """Clusters as sufficient statistics, one row each: ``ids`` (int64, a cluster's smallest member
    ordinal), ``n`` members, ``s`` sum of member vectors (float64), ``q`` sum of squared norms."""

    ids: np.ndarray
    n: np.ndarray
    s: np.ndarray
    q: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)

    def take(self, rows: np.ndarray) -> Clusters:
        return Clusters(self.ids[rows], self.n[rows], self.s[rows], self.q[rows])

    def means(self) -> np.ndarray:
        """Member means (float32): what k-means cells are assigned by."""
        return (self.s / self.n[:, None]).astype(np.float32)


def singletons(ids: np.ndarray, x: np.ndarray) -> Clusters:
    """Every vector a cluster of its own (level 0)."""
    x64 = x.astype(np.float64)
    return Clusters(ids.astype(np.int64), np.ones(ids.size, dtype=np.int64), x64, np.einsum("ij,ij->i", x64, x64))


def cut(metric: Metric, threshold: float) -> float:
    """The threshold on the similarity scale of ``scores``."""
    return float(threshold) if metric.higher_is_same else -float(threshold) ** 2


def scores(c: Clusters, a: np.ndarray, b: np.ndarray, metric: Metric) -> np.ndarray:
    """Exact average linkage (float64) between clusters ``a`` and ``b`` (row indices), as a similarity."""
    out = np.empty(a.size, dtype=np.float64)
    step = 1 << 14
    for lo in range(0, a.size, step):
        ia, ib = a[lo : lo + step], b[lo : lo + step]
        nn = (c.n[ia] * c.n[ib]).astype(np.float64)
        dot = np.einsum("ij,ij->i", c.s[ia], c.s[ib]) / nn
        out[lo : lo + step] = dot if metric.higher_is_same else 2.0 * dot - c.q[ia] / c.n[ia] - c.q[ib] / c.n[ib]
    return out


def knn_pairs(c: Clusters, k: int, metric: Metric, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one cell: each cluster's ``k`` closest others by average linkage that pass the threshold, as
    pairs of row indices (a < b, each pair once) with their float32 score. Blocked, so a cell of m rows
    holds BLOCK x m scores at a time."""
    m = len(c)
    e = np.empty(0, dtype=np.int64)
    if m < 2 or k < 1:
        return e, e, np.empty(0, dtype=np.float32)
    low = cut(metric, threshold) - LOOSE
    inv = (1.0 / c.n).astype(np.float32)
    s = c.s.astype(np.float32)
    half = (c.q / c.n).astype(np.float32)
    kk = min(k, m - 1)
    found_a, found_b, found_s = [], [], []
    for lo in range(0, m, BLOCK):
        hi = min(m, lo + BLOCK)
        block = (s[lo:hi] @ s.T) * inv[lo:hi, None] * inv[None, :]
        if not metric.higher_is_same:
            block = 2.0 * block - half[lo:hi, None] - half[None, :]
        block[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        top = np.argpartition(-block, kk - 1, axis=1)[:, :kk] if kk < m - 1 else \
            np.broadcast_to(np.arange(m), (hi - lo, m))
        rows = np.repeat(np.arange(lo, hi), top.shape[1])
        cols = top.ravel()
        sc = block[rows - lo, cols]
        ok = sc >= low
        found_a.append(rows[ok])
        found_b.append(cols[ok])
        found_s.append(sc[ok])
    a, b, sc = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    lo_, hi_ = np.minimum(a, b), np.maximum(a, b)
    code, first = np.unique(lo_ * m + hi_, return_index=True)
    return code // m, code % m, sc[first].astype(np.float32)


def nearest(q: Clusters, t: Clusters, metric: Metric, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cluster of ``q``'s closest cluster of ``t`` by exact average linkage, where it passes the
    threshold: (rows of q, rows of t, scores as similarities). Ties go to the smaller id of ``t``."""
    e = np.empty(0, dtype=np.int64)
    if len(q) == 0 or len(t) == 0:
        return e, e, np.empty(0, dtype=np.float64)
    order = np.argsort(t.ids, kind="stable")
    t = t.take(order)
    found_q, found_t, found_s = [], [], []
    for lo in range(0, len(q), BLOCK):
        hi = min(len(q), lo + BLOCK)
        block = (q.s[lo:hi] @ t.s.T) / (q.n[lo:hi, None] * t.n[None, :]).astype(np.float64)
        if not metric.higher_is_same:
            block = 2.0 * block - (q.q[lo:hi] / q.n[lo:hi])[:, None] - (t.q / t.n)[None, :]
        best = np.argmax(block, axis=1)  # the first maximum: the smallest id among equals
        score = block[np.arange(hi - lo), best]
        ok = score >= cut(metric, threshold)
        found_q.append(np.arange(lo, hi)[ok])
        found_t.append(order[best[ok]])
        found_s.append(score[ok])
    return np.concatenate(found_q), np.concatenate(found_t), np.concatenate(found_s)


@dataclass(frozen=True)
class Merged:
    """Each input row's cluster (the row index of its representative: its smallest id) and the rounds."""

    root: np.ndarray
    rounds: int
    merges: int


def rac(c: Clusters, a: np.ndarray, b: np.ndarray, metric: Metric, threshold: float) -> Merged:
    """Average-linkage HAC over the candidate pairs (a, b) (row indices) cut at ``threshold``, by rounds
    of reciprocal-nearest-neighbour merges. ``c`` must be sorted by ``ids``, so a merged cluster's
    representative (the smaller row) holds the smaller id. ``c`` is updated in place (its rows become
    the merged clusters' statistics at their representatives).

    A pair of clusters is a candidate while at least one candidate pair joins their members; each round
    rescores every candidate exactly, every cluster picks its best candidate passing the cut (score,
    then smaller ids), and pairs that picked each other merge."""
    m = len(c)
    root = np.arange(m, dtype=np.int64)
    limit = cut(metric, threshold)
    ea, eb = _distinct(np.minimum(a, b), np.maximum(a, b), m)
    rounds = merges = 0
    while ea.size:
        sc = scores(c, ea, eb, metric)
        ok = sc >= limit
        if not ok.any():
            break
        rounds += 1
        src = np.concatenate([ea[ok], eb[ok]])
        dst = np.concatenate([eb[ok], ea[ok]])
        s2 = np.concatenate([sc[ok], sc[ok]])
        order = np.lexsort((dst, -s2, src))  # per src: best score first, then the smaller partner
        src, dst = src[order], dst[order]
        first = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
        best = np.full(m, -1, dtype=np.int64)
        best[src[first]] = dst[first]
        keep = src[first]
        partner = best[keep]
        pair = (best[partner] == keep) & (keep < partner)
        into, gone = keep[pair], partner[pair]
        c.s[into] += c.s[gone]
        c.n[into] += c.n[gone]
        c.q[into] += c.q[gone]
        parent = np.arange(m, dtype=np.int64)
        parent[gone] = into
        merges += int(into.size)
        root = parent[root]
        ea, eb = parent[ea], parent[eb]
        live = ea != eb
        ea, eb = _distinct(np.minimum(ea[live], eb[live]), np.maximum(ea[live], eb[live]), m)
    return Merged(root, rounds, merges)


def _distinct(a: np.ndarray, b: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    code = np.unique(a.astype(np.int64) * m + b)
    return code // m, code % m
