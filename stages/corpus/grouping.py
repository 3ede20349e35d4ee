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

from collections import Counter
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import AgglomerativeClustering

from facekit.thresholds import Metric, defaults_for
from facekit.vector_index import EXACT_MAX, embedding_matrix, normalise_rows, range_pairs, space_of
from stages.base import (
    IDENTITY_ID,
    SAMPLE_ID,
    Batch,
    GlobalStage,
    Params,
    Resources,
    StageContext,
    rows_ok,
    stable_hash,
)

EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")


class GroupingParams(Params):
    method: Literal["agglomerative", "connected_components"] = "agglomerative"
    threshold: float | None = None  # pair score in the space's metric; None: the space's grouping default
    linkage: Literal["average", "complete", "single"] = "average"
    gt_column: str | None = None  # ground-truth labels to score the grouping against (not used to group)
    agglomerative_max: int = Field(20_000, ge=2)
    exact_max: int = Field(EXACT_MAX, ge=0)
    nprobe: int = Field(16, ge=1)
    id_prefix: str = "g"


def group_id(prefix: str, member_ids: list[str]) -> str:
    return prefix + stable_hash([min(member_ids)], 12)


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
    needs: ClassVar[tuple[str, ...]] = EMBEDDING_COLUMNS
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
        for i in np.flatnonzero(~valid):
            out["keep"][i] = False
            out["reason"][i] = "no embedding to group"
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
            for i in group:
                out[IDENTITY_ID][i] = gid
                out["group_size"][i] = len(group)
                out["threshold"][i] = threshold
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

    def _agglomerative(self, x: np.ndarray, metric: Metric, threshold: float) -> np.ndarray:
        """Average-linkage clusters cut at the threshold (as a distance: 1 - cosine for cosine spaces)."""
        cut = 1.0 - threshold if metric.higher_is_same else threshold
        model = AgglomerativeClustering(
            n_clusters=None,
            distance_threshold=float(np.nextafter(cut, np.inf)),  # sklearn merges below the cut; make it <=
            metric="cosine" if metric.higher_is_same else "euclidean",
            linkage=self.params.linkage,
        )
        return model.fit_predict(x.astype(np.float64)).astype(np.int64)
