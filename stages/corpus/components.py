"""Connected components of a graph no process holds: alternating large-star / small-star rounds
(Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014) over edges partitioned by node.

Grouping a corpus links almost every sample, so its graph has as many nodes as the run has samples; a
driver-side union-find would hold the run. Each round here reads and rewrites the edge list once,
partition by partition (``Corpus.reshuffle``), and every component converges to a star around its
smallest node. A node's label is that smallest node, so labels depend neither on the partitioning nor on
the order of the edges. Rounds: O(log^2 n) at worst, a handful on face graphs (measured in
bench/bench_scale.py).

Edge tables have two int64 columns, ``u`` (the node the partition is keyed by) and ``v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stages.base import Corpus

MAX_ROUNDS = 100  # far above O(log^2 n) for any run that fits in int64 ordinals
SHARD_SHIFT = np.int64(32)  # stages.base.ordinals: (shard index << 32) | row
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: nearby ordinals land in different partitions


def node_partition(nodes: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each node: a multiplicative hash, not ``node % parts`` (an ordinal's low bits
    are its row, so rows of all shards would pile up in the same few partitions for small shards)."""
    mixed = nodes.astype(np.uint64) * _MIX  # wraps modulo 2**64, as intended
    return ((mixed >> np.uint64(33)) % np.uint64(parts)).astype(np.int64)


def key_partition(values: np.ndarray, parts: int) -> np.ndarray:
    """A stable partition of each value (strings or numbers; pandas' fixed-key SipHash, the same in every
    process, unlike Python's salted ``hash``)."""
    import pandas as pd

    if values.size == 0:
        return np.empty(0, dtype=np.int64)
    return (pd.util.hash_array(np.asarray(values, dtype=object)) % np.uint64(parts)).astype(np.int64)


def split_by(key: np.ndarray, columns: dict[str, np.ndarray | pa.Array]) -> dict[int, pa.Table]:
    """One table per distinct ``key`` value (a partition or a shard index), rows in their given order."""
    if key.size == 0:
        return {}
    order = np.argsort(key, kind="stable")
    keys, starts = np.unique(key[order], return_index=True)
    full = pa.table(columns).take(pa.array(order))
    ends = np.r_[starts[1:], key.size]
    return {int(k): full.slice(int(s), int(t - s)) for k, s, t in zip(keys, starts, ends, strict=True)}


def both_ways(a: np.ndarray, b: np.ndarray, parts: int) -> dict[int, pa.Table]:
    """Undirected edges as pieces keyed by each endpoint, so a partition sees every neighbour of its nodes."""
    u, v = np.concatenate([a, b]), np.concatenate([b, a])
    return split_by(node_partition(u, parts), {"u": u, "v": v})


def _edges(table: pa.Table | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct edges sorted by (u, v), without self-loops, and where each node's run of edges starts."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows == 0:
        return e, e, e
    u = table.column("u").to_numpy()
    v = table.column("v").to_numpy()
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] & (u != v)
    u, v = u[keep], v[keep]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if u.size else e
    return u, v, starts


def large_star(table: pa.Table | None, part: int, parts: int) -> tuple[dict[int, pa.Table], bool]:
    """Every larger neighbour of a node is re-pointed to the smallest node of its neighbourhood.

    Input: edges both ways keyed by ``u``. Output: each edge once, keyed by its larger end (small-star's
    input). The result says whether this partition's part of the graph already is a forest of stars
    around their smallest nodes (every node has either no smaller neighbour, or one and no larger)."""
    u, v, starts = _edges(table)
    if u.size == 0:
        return {}, True
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, u.size]))
    smallest = np.minimum(u[starts], np.minimum.reduceat(v, starts))
    smaller = np.add.reduceat((v < u).astype(np.int64), starts)
    larger = np.add.reduceat((v > u).astype(np.int64), starts)
    stars = bool(np.all((smaller == 0) | ((smaller == 1) & (larger == 0))))
    up = v > u
    child, root = v[up], smallest[group][up]
    return split_by(node_partition(child, parts), {"u": child, "v": root}), stars


def small_star(table: pa.Table | None, part: int, parts: int) -> tuple[dict[int, pa.Table], None]:
    """A node and its smaller neighbours are all pointed at the smallest of them.

    Input: each edge once, keyed by its larger end ``u`` (so ``v < u``). Output: edges both ways."""
    u, v, starts = _edges(table)
    if u.size == 0:
        return {}, None
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, u.size]))
    smallest = np.minimum.reduceat(v, starts)
    to = smallest[group]
    other = v != to
    a = np.concatenate([u[starts], v[other]])
    b = np.concatenate([smallest, to[other]])
    return both_ways(a, b, parts), None


def star_labels(table: pa.Table | None, part: int) -> tuple[dict[int, pa.Table], tuple[int, int]]:
    """On a forest of stars (edges both ways keyed by node): each node with its component's smallest
    node, keyed by the node's shard index (a shard's commit reads only its own labels)."""
    u, v, starts = _edges(table)
    if u.size == 0:
        return {}, (0, 0)
    node = u[starts]
    root = np.minimum(node, np.minimum.reduceat(v, starts))
    pieces = split_by(node >> SHARD_SHIFT, {"node": node, "root": root})
    return pieces, (int(node.size), int((root == node).sum()))


@dataclass(frozen=True)
class Components:
    labels: str  # a shuffle keyed by shard index: tables (node, root) of every node that has an edge
    nodes: int
    components: int
    rounds: int  # large-star passes, the last one the check that found stars


def components(corpus: Corpus, edges: str) -> Components:
    """Label every node of the graph in shuffle ``edges`` (both ways, keyed by ``node_partition``) with the
    smallest node of its component. Deletes the rounds' edge lists (not ``edges``)."""
    current = edges
    rounds = 0
    for r in range(MAX_ROUNDS):
        rounds = r + 1
        large = f"{edges}-large{r}"
        done = all(corpus.reshuffle(large, current, large_star, corpus.partitions))
        if done:
            corpus.discard(large)
            break
        if current != edges:
            corpus.discard(current)
        current = f"{edges}-small{r}"
        corpus.reshuffle(current, large, small_star, corpus.partitions)
        corpus.discard(large)
    else:
        raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    labels = f"{edges}-labels"
    counts = corpus.reshuffle(labels, current, star_labels)
    if current != edges:
        corpus.discard(current)
    return Components(labels, sum(c[0] for c in counts), sum(c[1] for c in counts), rounds)
