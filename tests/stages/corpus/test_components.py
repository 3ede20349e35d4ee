"""Connected components as partitioned rounds (stages.corpus.components) on the real Ray engine,
against scipy's single-process components of the same graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.engine.global_exec import RayCorpus
from stages.corpus.components import both_ways, components, node_partition
from stages.corpus.grouping import GroupingParams, GroupingStage
from tests.fixtures.synthetic_corpus import global_spec

SHARDS = 6
ROWS = 64


def _graph(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Long chains in shuffled order (the worst case for label propagation), a star whose centre is not
    its smallest node, a clique, a sparse random graph and isolated pairs, over ordinals of 6 shards."""
    rng = np.random.default_rng(seed)
    nodes = rng.permutation(np.array([(s << 32) | r for s in range(SHARDS) for r in range(ROWS)], dtype=np.int64))
    a: list[int] = []
    b: list[int] = []
    at = 0

    def take(k: int) -> list[int]:
        nonlocal at
        at += k
        return nodes[at - k:at].tolist()

    for _ in range(3):
        chain = take(40)
        a += chain[:-1]
        b += chain[1:]
    star = sorted(take(20))
    a += [star[10]] * 19
    b += star[:10] + star[11:]
    clique = take(6)
    for i in range(6):
        for j in range(i + 1, 6):
            a.append(clique[i])
            b.append(clique[j])
    sparse = take(120)
    for _ in range(90):
        i, j = rng.choice(120, 2, replace=False)
        a.append(sparse[i])
        b.append(sparse[j])
    for _ in range(20):
        p = take(2)
        a.append(p[1])
        b.append(p[0])
    a += a[:7]  # repeated edges and a self-loop must not matter
    b += b[:7]
    a.append(clique[0])
    b.append(clique[0])
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def _seed_edges(table: pa.Table | None, part: int, a: np.ndarray, b: np.ndarray,
                parts: int) -> tuple[dict[int, pa.Table], None]:
    """Partition ``part`` contributes every ``parts``-th edge, keyed both ways, as an edge search would."""
    return both_ways(a[part::parts], b[part::parts], parts), None


def _whole(table: pa.Table | None, part: int) -> pa.Table | None:
    return table


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_partitioned_rounds_label_every_node_with_its_components_smallest_node(
    ray_session: Any, tmp_path: Path, parts: int
) -> None:
    a, b = _graph(seed=parts)
    spec: Any = global_spec(GroupingStage, GroupingParams(), str(tmp_path))
    corpus = RayCorpus(spec, spec.build(), [f"s{i}" for i in range(SHARDS)], [])
    corpus.partitions = parts
    corpus.reshuffle("edges", "nothing", _seed_edges, a, b, parts)

    graph = components(corpus, "edges")

    nodes = np.unique(np.concatenate([a, b]))
    m = nodes.size
    n, comp = connected_components(coo_matrix((np.ones(a.size), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))),
                                              shape=(m, m)), directed=False)
    smallest = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(smallest, comp, nodes)
    expected = dict(zip(nodes.tolist(), smallest[comp].tolist(), strict=True))
    got: dict[int, int] = {}
    corpus.partitions = SHARDS  # the labels are keyed by shard index: one partition per shard
    for shard, table in enumerate(corpus.reduce(graph.labels, _whole)):
        if table is None:
            continue
        node = table.column("node").to_numpy()
        assert (node >> 32 == shard).all(), "a shard's labels hold only that shard's nodes"
        got.update(zip(node.tolist(), table.column("root").to_numpy().tolist(), strict=True))
    assert got == expected
    assert (graph.nodes, graph.components) == (m, n)
    assert graph.rounds <= 12
    assert not list(Path(tmp_path, "work").rglob("*edges-large*")), "every round's edges were deleted"


def test_node_partitions_spread_the_rows_of_small_shards_over_every_partition() -> None:
    nodes = np.array([(s << 32) | r for s in range(1000) for r in range(8)], dtype=np.int64)
    counts = np.bincount(node_partition(nodes, 16), minlength=16)
    assert counts.min() > 0.8 * nodes.size / 16
