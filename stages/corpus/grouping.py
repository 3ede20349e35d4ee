"""Grouping: cluster the face embeddings of an unlabelled corpus into identities.

Two well-kept methods:
- ``agglomerative`` (default up to ``agglomerative_max`` samples): scikit-learn's
  AgglomerativeClustering with average linkage cut at the threshold. Average linkage does not chain:
  two groups merge only if their members are close on average, which is what keeps look-alikes apart.
  It needs the full distance matrix, so it is for corpora up to tens of thousands of faces.
- ``connected_components``: single linkage on the FAISS range-search graph at the threshold
  (facekit.vector_index: exact, or partitioned for large corpora), components by scipy.sparse.csgraph.
  It scales to millions; a lower threshold than average linkage's keeps it from chaining.

Above ``agglomerative_max`` samples it switches to connected components (the method used is in
``summary()``). Group ids are deterministic: "g" + a stable hash of the group's smallest sample_id, so
a rerun or a reshuffled input gives the same ids. A sample without an embedding cannot be grouped
and is dropped with that reason. With ground-truth labels (``gt_column``), ``summary()`` reports
purity (share of samples in their group's majority label), inverse purity (the same, labels vs groups)
and group counts for the run report.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from facekit.thresholds import Metric, defaults_for
from facekit.vector_index import (
    EXACT_MAX,
    cell_pairs,
    default_nlist,
    embedding_matrix,
    normalise_rows,
    one_space,
    range_pairs,
    space_of,
    train_cells,
)
from stages.base import (
    IDENTITY_ID,
    SAMPLE_ID,
    Batch,
    Corpus,
    GlobalStage,
    Params,
    Resources,
    Rows,
    StageContext,
    rows_ok,
    stable_hash,
)
from stages.corpus.components import SHARD_SHIFT, both_ways, components, node_partition, split_by
from stages.corpus.dedup import _cell_records, _dedup_census, _unit_vectors, _vector_sample

NO_EMBEDDING = "no_embedding"  # the rule: a sample without a vector cannot be grouped

EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")


class GroupingParams(Params):
    method: Literal["agglomerative", "connected_components"] = Field(
        "agglomerative", description=
        "agglomerative (scikit-learn, per component above agglomerative_max) or connected_components")
    threshold: float | None = Field(
        None, description="pair score in the space's metric; null: the space's grouping default")
    linkage: Literal["average", "complete", "single"] = Field("average", description="agglomerative linkage")
    gt_column: str | None = Field(
        None, description="ground-truth labels the grouping is scored against (purity), never used to group")
    agglomerative_max: int = Field(
        20_000, ge=2, description="largest component clustered by agglomerative linkage in one task")
    exact_max: int = Field(
        EXACT_MAX, ge=0, description="up to this many vectors the edge search is exact, above it per k-means cell")
    nprobe: int = Field(16, ge=1, description="IVF cells probed by an approximate search")
    id_prefix: str = Field("g", description="prefix of the group ids assigned as identity_id")
    spill: int = Field(
        2, ge=1, le=8, description="k-means cells each vector joins in the distributed edge search (see dedup)")
    cells: int | None = Field(
        None, ge=1, description="k-means cells of the distributed edge search; null: sized from the row count")
    partitions: int | None = Field(None, ge=1, description="shuffle partitions; null: from the row count")


def group_id(prefix: str, member_ids: list[str]) -> str:
    """``prefix`` + the stable hash of the smallest member id (computed for every sample of a run)."""
    first = min(member_ids)
    if first.isascii() and first.isprintable() and '"' not in first and "\\" not in first:
        # What json.dumps writes for such a string, without its per-call setup (3x faster)
        return prefix + hashlib.sha256(f'["{first}"]'.encode()).hexdigest()[:12]
    return prefix + stable_hash([first], 12)


def purity(groups: list[Any], labels: list[Any]) -> float:
    """Share of samples that carry their group's most common label."""
    by_group: dict[Any, Counter] = {}
    for g, lab in zip(groups, labels, strict=True):
        by_group.setdefault(g, Counter())[lab] += 1
    total = sum(sum(c.values()) for c in by_group.values())
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / max(1, total)


class GroupingStage(GlobalStage):
    """Assigns identity ids to unlabelled faces by clustering their embeddings."""

    name: ClassVar[str] = "grouping"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = GroupingParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    needs: tuple[str, ...] = EMBEDDING_COLUMNS
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("group_size", pa.int32()),
        pa.field("threshold", pa.float32()),
    )

    params: GroupingParams
    _summary: dict[str, Any]

    def __init__(self, params: Params, context: StageContext) -> None:
        super().__init__(params, context)
        gt = self.params.gt_column
        self.needs = (*EMBEDDING_COLUMNS, gt) if gt else EMBEDDING_COLUMNS

    def summary(self) -> dict[str, Any]:
        """Group counts, and purity against ``gt_column`` when given, for the run report."""
        return dict(getattr(self, "_summary", {}))

    def run_global(self, table: pa.Table) -> Batch:
        p = self.params
        n = table.num_rows
        ids = table.column(SAMPLE_ID).to_pylist()
        out = rows_ok(ids)
        for f in self.columns:
            out[f.name] = [None] * n
        out[IDENTITY_ID] = [None] * n  # a common manifest column, returned to relabel samples
        x, valid = embedding_matrix(table)
        rows = np.flatnonzero(valid)
        out["detail"] = [None] * n
        for i in np.flatnonzero(~valid):
            out["keep"][i] = False
            out["reason"][i] = NO_EMBEDDING
        if rows.size == 0:
            self._summary = {"groups": 0}
            return out
        space, metric = space_of(table, valid)
        xv = normalise_rows(x[rows]) if metric.higher_is_same else x[rows]
        threshold = defaults_for(space).grouping if p.threshold is None else float(p.threshold)
        method = p.method if rows.size <= p.agglomerative_max else "connected_components"
        if rows.size == 1:
            comp = np.zeros(1, dtype=np.int64)
        elif method == "agglomerative":
            comp = self._agglomerative(xv, metric, threshold)
        else:
            pairs = range_pairs(
                xv, metric, threshold, exact_max=p.exact_max, nprobe=p.nprobe, seed=self.context.seed
            )
            graph = coo_matrix((np.ones(len(pairs)), (pairs.i, pairs.j)), shape=(rows.size, rows.size))
            comp = connected_components(graph, directed=False)[1]

        members: dict[int, list[int]] = {}
        for r, c in enumerate(comp.tolist()):
            members.setdefault(c, []).append(int(rows[r]))
        for group in members.values():
            gid = group_id(p.id_prefix, [ids[i] for i in group])
            for member in group:
                out[IDENTITY_ID][member] = gid
                out["group_size"][member] = len(group)
                out["threshold"][member] = threshold
        sizes = [len(g) for g in members.values()]
        self._summary = {
            "method": method,
            "embedding_space": space,
            "threshold": threshold,
            "groups": len(sizes),
            "singletons": sum(1 for s in sizes if s == 1),
            "largest_group": max(sizes),
        }
        if p.gt_column and p.gt_column in table.column_names:
            gt = table.column(p.gt_column).to_pylist()
            got = [out[IDENTITY_ID][i] for i in rows]
            truth = [gt[i] for i in rows]
            self._summary |= {
                "purity": purity(got, truth),
                "inverse_purity": purity(truth, got),
                "gt_identities": len(set(truth)),
            }
        return out

    # ------------------------------------------------------------ distributed form

    def distributed(self) -> bool:
        return True

    def run_corpus(self, corpus: Corpus) -> None:
        """Threshold edges from the same cell search as dedup, each partition's edges reduced to a
        spanning forest, components from those; with ``agglomerative``, average linkage runs per
        component (an average-linkage cluster never spans two components of the threshold graph, so this
        is the same clustering) wherever the component fits one task (``agglomerative_max``)."""
        p = self.params
        census = corpus.map(_dedup_census, list(self.needs))
        n_valid = sum(c["valid"] for c in census)
        if n_valid == 0:
            self._summary = {"groups": 0}
            corpus.commit(self._commit, None)
            return
        space, metric = one_space(set().union(*(c["spaces"] for c in census)),
                                  set().union(*(c["metrics"] for c in census)))
        threshold = defaults_for(space).grouping if p.threshold is None else float(p.threshold)
        nlist = p.cells or (1 if n_valid <= p.exact_max else default_nlist(n_valid))
        if nlist > 1:
            per_shard = max(1, -(-min(n_valid, max(nlist * 32, 20_000)) // max(1, len(census))))
            sample = np.concatenate(corpus.map(_vector_sample, list(EMBEDDING_COLUMNS), per_shard, self.context.seed))
            cells = corpus.call(train_cells, sample, nlist, self.context.seed)
            del sample
        else:
            cells = np.zeros((1, 1), dtype=np.float32)
        spill = 1 if nlist == 1 else p.spill
        corpus.partitions = p.partitions or corpus.plan_partitions(n_valid * spill)
        corpus.shuffle("cells", _cell_records, list(EMBEDDING_COLUMNS), corpus.put(cells), spill, corpus.partitions)
        corpus.reshuffle("edges", "cells", _forest_edges, metric, threshold, corpus.partitions)
        corpus.discard("cells")
        graph = components(corpus, "edges")
        corpus.discard("edges")
        linkage = p.method == "agglomerative"
        method = "connected_components"
        if linkage:
            method = "agglomerative" if n_valid <= p.agglomerative_max else "agglomerative_per_component"
        corpus.shuffle("members", _member_records, list(EMBEDDING_COLUMNS) if linkage else [], corpus.partitions,
                       linkage, side=graph.labels)
        corpus.discard(graph.labels)
        found = corpus.reshuffle("groups", "members", self._groups, linkage, metric, threshold)
        corpus.discard("members")
        k = sum(f[0] for f in found)
        singletons = n_valid - graph.nodes
        self._summary = {
            "method": method, "embedding_space": space, "threshold": threshold, "groups": k + singletons,
            "singletons": singletons, "largest_group": max([f[1] for f in found] + [1]),
            "component_rounds": graph.rounds,
        }
        if p.gt_column:
            self._summary |= self._purity(corpus)
        corpus.commit(self._commit, threshold, side="groups")

    def _groups(self, table: pa.Table | None, part: int, linkage: bool, metric: Metric,
                threshold: float) -> tuple[dict[int, pa.Table], tuple[int, int]]:
        """The groups of one partition of components: each component whole, or split by average linkage
        where it fits one task (``agglomerative_max``); each group's id hashes its smallest sample id.
        Returns (node, group id, size) keyed by the node's shard index, and (groups, largest)."""
        if table is None or table.num_rows == 0:
            return {}, (0, 0)
        root = table.column("root").to_numpy()
        node = table.column("node").to_numpy()
        order = np.lexsort((node, root))  # members in run order inside each component, as linkage saw them
        root, node = root[order], node[order]
        sub = np.zeros(node.size, dtype=np.int64)
        if linkage:
            d = table.schema.field("vector").type.list_size
            x = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d)[order]
            bounds = np.flatnonzero(np.r_[True, root[1:] != root[:-1], True])
            for s, t in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                if 2 <= t - s <= self.params.agglomerative_max:
                    sub[s:t] = self._agglomerative(x[s:t], metric, threshold)
        _, group = np.unique(np.stack([root, sub], axis=1), axis=0, return_inverse=True)
        group = group.ravel()
        firsts = pa.table({"g": group, "sid": table.column("sid").take(pa.array(order))}).group_by(
            "g", use_threads=False).aggregate([("sid", "min")])
        first = np.empty(int(group.max()) + 1, dtype=object)
        first[firsts.column("g").to_numpy()] = firsts.column("sid_min").to_pylist()
        gid = np.array([group_id(self.params.id_prefix, [f]) for f in first.tolist()], dtype=object)
        size = np.bincount(group)
        pieces = split_by(node >> SHARD_SHIFT, {"node": node, "gid": pa.array(gid[group].tolist(), pa.string()),
                                                 "size": size[group].astype(np.int32)})
        return pieces, (int(size.size), int(size.max()))

    def _purity(self, corpus: Corpus) -> dict[str, Any]:
        """Purity and inverse purity as two partitioned group-bys: (group, label) counts keyed once by
        group, once by label, each partition summing its keys' majority counts. Mostly-singleton groupings
        have about one pair per sample, so the pairs never meet in one process."""
        found: dict[str, tuple[int, int, int]] = {}
        for by in ("group", "label"):
            corpus.shuffle(f"pairs-{by}", self._label_records, list(self.needs), by, corpus.partitions,
                           side="groups")
            parts = corpus.reduce(f"pairs-{by}", _majority_counts, by)
            corpus.discard(f"pairs-{by}")
            found[by] = (sum(m for m, _, _ in parts), sum(t for _, t, _ in parts), sum(k for _, _, k in parts))
        total = found["group"][1]
        if total == 0:
            return {}
        return {"purity": found["group"][0] / total, "inverse_purity": found["label"][0] / total,
                "gt_identities": found["label"][2]}

    def _label_records(self, table: pa.Table, index: int, groups: pa.Table | None, by: str,
                       parts: int) -> dict[int, pa.Table]:
        """(group id, ground-truth label, count) of one shard's grouped rows, keyed by group or by label."""
        gt = self.params.gt_column
        if not gt or gt not in table.column_names:
            return {}
        _, valid = embedding_matrix(table)
        gids, _ = self._group_ids(table, groups, valid)
        rows = np.flatnonzero(valid)
        if rows.size == 0:
            return {}
        labels = table.column(gt).take(pa.array(rows))
        pairs = pa.table({"g": pa.array([gids[r] for r in rows.tolist()], pa.string()),
                          "l": labels if pa.types.is_string(labels.type) else pc.cast(labels, pa.string())})
        counts = pairs.group_by(["g", "l"], use_threads=False).aggregate([("g", "count")])
        keys = counts.column("g" if by == "group" else "l").to_pylist()
        part = np.array([zlib.crc32(b"" if k is None else k.encode()) % parts for k in keys], dtype=np.int64)
        return split_by(part, {"g": counts.column("g"), "l": counts.column("l"), "n": counts.column("g_count")})

    def _group_ids(self, table: pa.Table, groups: pa.Table | None,
                   valid: np.ndarray) -> tuple[list[Any], list[Any]]:
        """Every grouped row's group id and size: its linked group's, else a group of its own (None for a
        row without an embedding)."""
        n = table.num_rows
        gids: list[Any] = [None] * n
        sizes: list[Any] = [None] * n
        if groups is not None:
            rows = (groups.column("node").to_numpy() & np.int64(0xFFFFFFFF)).tolist()
            for r, g, k in zip(rows, groups.column("gid").to_pylist(), groups.column("size").to_pylist(),
                               strict=True):
                gids[r] = g
                sizes[r] = k
        alone = np.flatnonzero(valid).tolist()
        sids = table.column(SAMPLE_ID).to_pylist()
        for r in alone:
            if gids[r] is None:
                gids[r] = group_id(self.params.id_prefix, [sids[r]])
                sizes[r] = 1
        return gids, sizes

    def _commit(self, table: pa.Table, index: int, groups: pa.Table | None, threshold: float) -> Batch:
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        _, valid = embedding_matrix(table)
        gids, sizes = self._group_ids(table, groups, valid)
        out.column(IDENTITY_ID, gids)
        out.column("group_size", sizes)
        out.column("threshold", [threshold if v else None for v in valid.tolist()])
        for i in np.flatnonzero(~valid).tolist():
            out.drop(i, NO_EMBEDDING)
        return out.batch()

    def _agglomerative(self, x: np.ndarray, metric: Metric, threshold: float) -> np.ndarray:
        """Average-linkage clusters cut at the threshold (as a distance: 1 - cosine for cosine spaces)."""
        cut = 1.0 - threshold if metric.higher_is_same else threshold
        from sklearn.cluster import AgglomerativeClustering  # here: importing sklearn costs every worker ~1.5 s

        model = AgglomerativeClustering(
            n_clusters=None,
            distance_threshold=float(np.nextafter(cut, np.inf)),  # sklearn merges below the cut; make it <=
            metric="cosine" if metric.higher_is_same else "euclidean",
            linkage=self.params.linkage,
        )
        return model.fit_predict(x.astype(np.float64)).astype(np.int64)


def _majority_counts(table: pa.Table | None, part: int, by: str) -> tuple[int, int, int]:
    """One partition of (group, label, count) pieces: the sum over its keys (groups or labels) of the
    largest count, the total count and the number of keys."""
    if table is None or table.num_rows == 0:
        return 0, 0, 0
    key = "g" if by == "group" else "l"
    pairs = table.group_by(["g", "l"], use_threads=False).aggregate([("n", "sum")])
    best = pairs.group_by(key, use_threads=False).aggregate([("n_sum", "max")])
    return int(pc.sum(best.column("n_sum_max")).as_py()), int(pc.sum(pairs.column("n_sum")).as_py()), best.num_rows


def _forest(table: pa.Table | None, part: int, metric: Metric, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Threshold pairs inside every cell of one partition, reduced to a spanning forest (each local
    component as edges from its smallest node): the same components from at most one edge per node."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows < 2:
        return e, e
    cell = table.column("cell").to_numpy()
    ords = table.column("ordinal").to_numpy()
    d = table.schema.field("vector").type.list_size
    x = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d)
    order = np.lexsort((ords, cell))
    cell, ords, x = cell[order], ords[order], x[order]
    bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
    found_a, found_b = [], []
    for s, t in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if t - s >= 2:
            a, b, _ = cell_pairs(x[s:t], ords[s:t], metric, threshold)
            found_a.append(a)
            found_b.append(b)
    if not found_a:
        return e, e
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    nodes = np.unique(np.concatenate([a, b]))
    m = nodes.size
    comp = connected_components(coo_matrix((np.ones(a.size), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))),
                                           shape=(m, m)), directed=False)[1]
    root = np.full(comp.max() + 1, m, dtype=np.int64)
    np.minimum.at(root, comp, np.arange(m))
    src = nodes[root[comp]]
    keep = src != nodes
    return src[keep], nodes[keep]


def _forest_edges(table: pa.Table | None, part: int, metric: Metric, threshold: float,
                  parts: int) -> tuple[dict[int, pa.Table], int]:
    """One partition's spanning forest as the components' input: edges both ways, keyed by node."""
    a, b = _forest(table, part, metric, threshold)
    return both_ways(a, b, parts), int(a.size)


def _member_records(table: pa.Table, index: int, labels: pa.Table | None, parts: int,
                    with_vectors: bool) -> dict[int, pa.Table]:
    """Each linked sample of one shard with its component (and its vector, for linkage), keyed by
    component."""
    if labels is None or labels.num_rows == 0:
        return {}
    node = labels.column("node").to_numpy()
    root = labels.column("root").to_numpy()
    row = node & np.int64(0xFFFFFFFF)
    cols: dict[str, Any] = {"root": root, "node": node, "sid": table.column(SAMPLE_ID).take(pa.array(row))}
    if with_vectors:
        rows, x = _unit_vectors(table)
        picked = x[np.searchsorted(rows, row)]
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(picked.ravel(), pa.float32()), x.shape[1])
    return split_by(node_partition(root, parts), cols)

