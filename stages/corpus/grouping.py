"""Grouping: cluster the face embeddings of an unlabelled corpus into identities by average linkage.

Average linkage does not chain: two groups merge only if their members are close on average, which is
what keeps look-alikes apart. Two ways to compute it, one answer:

- ``exact`` (``auto`` up to ``exact_limit`` samples): scikit-learn's AgglomerativeClustering cut at the
  threshold, in one task holding every vector (it needs the full distance matrix).
- ``scalable`` (``auto`` above the limit; forced with ``method: scalable``): average linkage on a sparse
  k-nearest-neighbour graph (stages.corpus.linkage), in levels of distributed steps with bounded memory
  per task. Each level: the points (samples, then clusters as sum vectors and counts) are spread over the
  k-means cells of the dedup search (``spill`` nearest cells each); every point's ``k`` nearest in its
  cells by exact average linkage that pass the threshold are the candidate pairs; components of that
  graph (components.py) are independent (an average-linkage cluster at threshold t never spans two
  components of the graph of pairs >= t), so each is clustered in one task by rounds of
  reciprocal-nearest-neighbour merges (RAC, vectorised over a partition's components). The next level's
  points are the clusters, searched again through the cells (``merge_spill`` nearest cells each: the
  pieces of an identity the first search split sit in different cells) and merged by exact average
  linkage of their members (a centroid merge: it joins an identity the k-NN search split). Levels stop
  when one merges nothing (or at ``max_levels``). With a complete graph (``k`` >= samples, one cell) it is sklearn's
  answer; the bench and tests measure by how much the default graph differs.

Euclidean spaces: average linkage on *squared* distances cut at threshold^2 (what sums give exactly;
scipy's ``average`` on ``sqeuclidean``) on the scalable path; the exact path is sklearn's euclidean
average linkage. Cosine spaces compare unit vectors on both.

A component larger than ``max_component`` points is not clustered in one task: its points are clustered
within their nearest k-means cell (pairs across cells of such a component are left to the next level's
centroid merge). Such components are counted in ``summary()`` (``split_components``).

Low-quality samples (``quality_column`` below ``quality_min``: tiny faces, low detector scores) never
link two groups: they are left out of the clustering, then each joins the group closest to it by average
linkage (searched through the same cells) where that passes the threshold, else it stays alone. Counted
in the summary (``low_quality``, ``low_quality_attached``).

The threshold: ``threshold`` when given; else fitted at ``fit_far`` from pairs of samples carrying
different identity labels (``identity_id``, else ``gt_column``) as consistency's ``fit_far`` does; else
the space's default (``threshold_source`` in the summary says which).

Group ids are deterministic: "g" + a stable hash of the group's smallest sample_id, so a rerun or a
reshuffled input gives the same ids. A sample without an embedding cannot be grouped and is dropped with
that reason. With ground-truth labels (``gt_column``), ``summary()`` reports purity, inverse purity,
pairwise and BCubed precision / recall / F (facekit.identities.cluster_metrics).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AliasChoices, Field, field_validator, model_validator

from facekit.identities.cluster_metrics import KeyTerms, key_terms, scores
from facekit.thresholds import Metric, defaults_for, fit_at_far, pair_scores_from_labels
from facekit.vector_index import (
    assign_cells,
    default_nlist,
    embedding_matrix,
    group_sums,
    normalise_rows,
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
    ordinals,
    stable_hash,
)
from stages.corpus.components import SHARD_SHIFT, both_ways, components, node_partition, split_by
from stages.corpus.kernels import EMBEDDING_COLUMNS, census_space, corpus_cells, embedding_census, unit_vectors
from stages.corpus.linkage import Clusters, knn_pairs, nearest, rac, singletons

NO_EMBEDDING = "no_embedding"  # the rule: a sample without a vector cannot be grouped

EXACT_LIMIT = 12_000  # sklearn/scipy average linkage: a process peaks at ~1.6 GiB at 12k samples, ~3.5 GiB at 20k
ONE_CELL_MAX = 20_000  # up to this many points the candidate search is one cell: every pair is scored
FIT_ROWS = 4_000  # labelled samples drawn (over all shards) to fit the threshold
_LOW = np.uint64(0xFFFFFFFF)


class GroupingParams(Params):
    method: Literal["auto", "exact", "scalable"] = Field(
        "auto", description=
        "exact: scikit-learn average linkage in one task; scalable: average linkage on a k-NN graph in "
        "distributed levels; auto: exact up to exact_limit samples ('agglomerative' means exact)")
    threshold: float | None = Field(
        None, description="pair score in the space's metric; null: fitted (fit_far) or the space's default")
    fit_far: float | None = Field(
        None, gt=0.0, lt=1.0, description=
        "with no threshold: fit it at this false-match rate from pairs of samples labelled as different identities")
    linkage: Literal["average", "complete", "single"] = Field(
        "average", description="linkage of the exact method (the scalable method is average linkage)")
    gt_column: str | None = Field(
        None, description="ground-truth labels the grouping is scored against, never used to group")
    exact_limit: int = Field(
        EXACT_LIMIT, ge=1, validation_alias=AliasChoices("exact_limit", "agglomerative_max"), description=
        "auto: exact average linkage up to this many samples (the full distance matrix in one task; "
        "method exact refuses more); agglomerative_max is the same key")
    k: int = Field(10, ge=1, description="scalable: nearest neighbours per point that are candidate pairs")
    spill: int = Field(
        2, ge=1, le=8, description="scalable: k-means cells each point joins in the neighbour search (see dedup)")
    merge_spill: int = Field(
        8, ge=1, le=64, description="scalable: cells each point joins at the levels after the first (the "
        "pieces of an identity the first search split sit in different cells; far fewer points by then)")
    cells: int | None = Field(
        None, ge=1, description="scalable: k-means cells of the neighbour search; null: sized from the row count")
    max_levels: int = Field(
        6, ge=1, le=32, description="scalable: levels of search and merge (clusters of a level are the next's points)")
    max_component: int = Field(
        200_000, ge=2, description=
        "scalable: largest component clustered in one task; a larger one is clustered within its k-means cells")
    quality_column: str | None = Field(
        None, description="a per-sample quality score (detector score, face size): a sample below quality_min "
        "never links two groups; it joins its nearest group after clustering")
    quality_min: float | None = Field(None, description="the lowest quality_column value that may link groups")
    id_prefix: str = Field("g", description="prefix of the group ids assigned as identity_id")
    partitions: int | None = Field(None, ge=1, description="shuffle partitions; null: from the row count")

    @field_validator("method", mode="before")
    @classmethod
    def _method_names(cls, value: Any) -> Any:
        if value == "agglomerative":
            return "exact"
        if value == "connected_components":
            raise ValueError("connected_components (single linkage) chains look-alike identities into one group; "
                             "use exact or scalable (average linkage at any size)")
        return value

    @model_validator(mode="after")
    def _quality_pair(self) -> GroupingParams:
        if (self.quality_column is None) != (self.quality_min is None):
            raise ValueError("quality_column and quality_min go together: name the column and its lowest value")
        return self

    @property
    def quality(self) -> tuple[str, float] | None:
        return (self.quality_column, self.quality_min) if self.quality_column and self.quality_min is not None \
            else None


def group_id(prefix: str, member_ids: list[str]) -> str:
    """``prefix`` + the stable hash of the smallest member id (computed for every sample of a run)."""
    first = min(member_ids)
    if first.isascii() and first.isprintable() and '"' not in first and "\\" not in first:
        # What json.dumps writes for such a string, without its per-call setup (3x faster)
        return prefix + hashlib.sha256(f'["{first}"]'.encode()).hexdigest()[:12]
    return prefix + stable_hash([first], 12)


def _shard_of(ids: np.ndarray) -> np.ndarray:
    return (ids >> SHARD_SHIFT).astype(np.int64)


def _vector_column(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).ravel()), x.shape[1])


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    d = table.schema.field(column).type.list_size
    return table.column(column).combine_chunks().flatten().to_numpy().reshape(-1, d)


def _clusters(table: pa.Table) -> Clusters:
    return Clusters(table.column("id").to_numpy(), table.column("n").to_numpy().copy(),
                    _matrix(table, "s").copy(), table.column("q").to_numpy().copy())


def _cluster_columns(c: Clusters) -> dict[str, Any]:
    return {"id": c.ids, "n": c.n, "s": _vector_column(c.s), "q": c.q}


def _cluster_table(c: Clusters) -> pa.Table:
    return pa.table(_cluster_columns(c))


def _concat(tables: list[pa.Table | None]) -> pa.Table | None:
    present = [t for t in tables if t is not None and t.num_rows]
    return pa.concat_tables(present) if present else None


class GroupingStage(GlobalStage):
    """Assigns identity ids to unlabelled faces by clustering their embeddings."""

    name: ClassVar[str] = "grouping"
    version: ClassVar[str] = "2"
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
        p = self.params
        self.needs = tuple(dict.fromkeys([*EMBEDDING_COLUMNS, *(c for c in (p.gt_column, p.quality_column) if c)]))

    def summary(self) -> dict[str, Any]:
        """Method, levels, threshold and its source, group counts, and the clustering scores against
        ``gt_column`` when given, for the run report and the benches."""
        return dict(getattr(self, "_summary", {}))

    def distributed(self) -> bool:
        return True

    # ------------------------------------------------------------ the stage

    def run_corpus(self, corpus: Corpus) -> None:
        p = self.params
        census = corpus.map(embedding_census, list(EMBEDDING_COLUMNS))
        n_valid = sum(c["valid"] for c in census)
        if n_valid == 0:
            self._summary = {"groups": 0}
            corpus.commit(self._commit, None, None)
            return
        space, metric = census_space(census)
        threshold, source = self._threshold(corpus, space, metric)
        corpus.partitions = p.partitions or corpus.plan_partitions(n_valid * p.spill)
        method = p.method if p.method != "auto" else ("exact" if n_valid <= p.exact_limit else "scalable")
        if method == "exact" and n_valid > p.exact_limit:
            raise ValueError(f"grouping method exact holds every pair of {n_valid} samples in one task, above "
                             f"exact_limit {p.exact_limit}: use method auto or scalable, or raise exact_limit")
        self._summary = {"method": method, "embedding_space": space, "threshold": threshold,
                         "threshold_source": source}
        if method == "exact":
            members, final, cells, spill = self._exact(corpus, metric, threshold)
        else:
            members, final, cells, spill = self._scalable(corpus, n_valid, metric, threshold)
        if p.quality:
            members = self._attach(corpus, members, final, cells, spill, metric, threshold)
        corpus.discard(final)
        corpus.shuffle("groups", _final_groups, [], p.id_prefix, side=members)
        counts = corpus.map(_group_counts, [], side="groups")
        corpus.discard(members)
        sizes = [s for c in counts for s in c]
        self._summary |= {"groups": len(sizes), "singletons": sum(1 for s in sizes if s == 1),
                          "largest_group": max(sizes, default=0)}
        if p.gt_column:
            self._summary |= self._scores(corpus)
        corpus.commit(self._commit, threshold, side="groups")

    def _threshold(self, corpus: Corpus, space: str, metric: Metric) -> tuple[float, str]:
        """The given threshold; else one fitted at ``fit_far`` from a bounded sample of labelled samples
        (pairs of different labels are the impostors); else the space's default."""
        p = self.params
        if p.threshold is not None:
            return float(p.threshold), "given"
        if p.fit_far is not None:
            shards = max(1, len(corpus.shards))
            for column in dict.fromkeys([IDENTITY_ID, *([p.gt_column] if p.gt_column else [])]):
                picked = corpus.map(_labelled_sample, list(dict.fromkeys([*EMBEDDING_COLUMNS, column])), column,
                                    -(-FIT_ROWS // shards), self.context.seed)
                x = [v for v, _ in picked if len(v)]
                if not x:
                    continue
                labels = np.concatenate([lab for _, lab in picked if len(lab)])
                if np.unique(labels).size < 2:
                    continue
                genuine, impostor = pair_scores_from_labels(np.concatenate(x), labels, metric,
                                                            seed=self.context.seed)
                if impostor.size:
                    return fit_at_far(genuine, impostor, metric, p.fit_far).threshold, "fitted"
        return defaults_for(space).grouping, "default"

    # ------------------------------------------------------------ exact

    def _exact(self, corpus: Corpus, metric: Metric, threshold: float) -> tuple[str, str, Any, int]:
        """Every vector into one partition, scikit-learn's linkage in one task; (node, sid, cluster) rows
        keyed by the cluster's shard index (the cluster: its smallest ordinal), the clusters as points
        (``final``) and the low-quality samples left out (``lowq``)."""
        corpus.shuffle("all", _all_vectors, list(self.needs), self.params.quality)
        parts = corpus.partitions
        corpus.partitions = 1
        try:
            corpus.reshuffle("members", "all", self._exact_members, metric, threshold)
        finally:
            corpus.partitions = parts
        corpus.discard("all")
        self._summary["levels"] = 1
        return "members", "final", corpus.put(np.zeros((1, 1), dtype=np.float32)), 1

    def _exact_members(self, table: pa.Table | None, part: int, metric: Metric,
                       threshold: float) -> tuple[dict[int, pa.Table], None]:
        if table is None or table.num_rows == 0:
            return {}, None
        table = table.sort_by("node")
        node = table.column("node").to_numpy()
        x = _matrix(table, "vector")
        low = table.column("low").to_numpy(zero_copy_only=False)
        good = np.flatnonzero(~low)
        cl = node.copy()
        if good.size > 1:
            label = self._agglomerative(x[good], metric, threshold)
            first = np.full(int(label.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(first, label, node[good])
            cl[good] = first[label]
        pieces: dict[Any, pa.Table] = split_by(_shard_of(cl), {"node": node, "sid": table.column("sid"), "cl": cl})
        if good.size:
            pts = singletons(node[good], x[good])
            reps, inverse = np.unique(cl[good], return_inverse=True)
            sums = Clusters(reps, np.bincount(inverse.ravel()).astype(np.int64),
                            group_sums(inverse.ravel(), pts.s, reps.size),
                            np.bincount(inverse.ravel(), weights=pts.q))
            pieces |= {("final", q): t for q, t in split_by(_shard_of(reps), _cluster_columns(sums)).items()}
        if low.any():
            lows = singletons(node[low], x[low])
            pieces |= {("lowq", q): t for q, t in split_by(_shard_of(lows.ids), _cluster_columns(lows)).items()}
        return pieces, None

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

    # ------------------------------------------------------------ scalable

    def _scalable(self, corpus: Corpus, n_valid: int, metric: Metric, threshold: float) -> tuple[str, str, Any, int]:
        """Levels of candidate search and RAC merges. Returns the shuffle of (node, sid, cluster) rows keyed
        by the cluster's shard index, the shuffle of the final clusters as points, the cells and the spill."""
        p = self.params
        if p.linkage != "average":
            raise ValueError(f"the scalable method is average linkage; linkage {p.linkage!r} needs method exact")
        parts = corpus.partitions
        nlist = p.cells or (1 if n_valid <= ONE_CELL_MAX else default_nlist(n_valid))
        cells = corpus_cells(corpus, n_valid, nlist, self.context.seed)
        cells_ref = corpus.put(cells)
        spill = 1 if nlist == 1 else p.spill
        merge_spill = 1 if nlist == 1 else max(p.spill, p.merge_spill)
        unit = metric.higher_is_same
        corpus.shuffle("pts0", _level0_points, list(self.needs), p.quality)
        final = "pts0"
        stats = {"cells": nlist, "candidate_pairs": 0, "rac_rounds": 0, "split_components": 0,
                 "largest_component": 0}
        members = "members0"
        level = 0
        while level < p.max_levels:
            level += 1
            pts, nxt = f"pts{level - 1}", f"pts{level}"  # level's points in, its clusters out
            corpus.shuffle(f"cells{level}", _cell_points, [], cells_ref, spill if level == 1 else merge_spill, unit,
                           parts, side=pts)
            found = corpus.reshuffle(f"knn{level}", f"cells{level}", _cell_knn, metric, threshold, p.k, parts,
                                     level)
            corpus.discard(f"cells{level}")
            edges = sum(found)
            stats["candidate_pairs"] += edges
            if edges == 0:
                final = pts
                break
            graph = components(corpus, f"links{level}")
            corpus.discard(f"links{level}")
            big: list[int] = []
            if graph.nodes > p.max_component:
                corpus.shuffle(f"sizes{level}", _root_counts, [], parts, side=graph.labels)
                large = [r for f in corpus.reduce(f"sizes{level}", _large_roots, p.max_component) for r in f]
                corpus.discard(f"sizes{level}")
                big = sorted(r for r, _ in large)
                stats["split_components"] += len(big)
                stats["largest_component"] = max([stats["largest_component"], *(s for _, s in large)])
            corpus.discard(nxt)
            corpus.shuffle(f"comp{level}", _component_rows, [], parts, level, corpus.put(np.array(big, np.int64)),
                           cells_ref, unit, side=(pts, f"edges{level}", graph.labels))
            for done_with in (f"edges{level}", graph.labels, pts):
                corpus.discard(done_with)
            done = corpus.reshuffle(f"rac{level}", f"comp{level}", _rac_partition, metric, threshold, level)
            corpus.discard(f"comp{level}")
            stats["rac_rounds"] += max([d[1] for d in done], default=0)
            stats["largest_component"] = max([stats["largest_component"], *(d[2] for d in done)])
            final = nxt
            if sum(d[0] for d in done) == 0:
                break
            corpus.shuffle(f"members{level}", _remap, [], side=(members, f"map{level}"))
            corpus.discard(members)
            corpus.discard(f"map{level}")
            members = f"members{level}"
        self._summary |= {"levels": level, "k": p.k, "spill": spill, "merge_spill": merge_spill, **stats}
        return members, final, cells_ref, spill

    def _attach(self, corpus: Corpus, members: str, final: str, cells: Any, spill: int, metric: Metric,
                threshold: float) -> str:
        """Each low-quality sample joins the group closest to it by average linkage (searched through the
        same cells), where that passes the threshold; it never linked two groups."""
        parts = corpus.partitions
        corpus.shuffle("attach-cells", _attach_cells, [], cells, spill, metric.higher_is_same, parts,
                       side=(final, "lowq"))
        corpus.discard("lowq")
        corpus.reshuffle("attach", "attach-cells", _attach_nearest, metric, threshold)
        corpus.discard("attach-cells")
        corpus.shuffle("members-attached", _remap, [], side=(members, "attach-map"))
        attached = sum(corpus.map(_distinct_old, [], side="attach-map"))
        corpus.discard("attach-map")
        corpus.discard(members)
        low = sum(corpus.map(_low_count, list(self.needs), self.params.quality))
        self._summary |= {"low_quality": low, "low_quality_attached": attached}
        return "members-attached"

    # ------------------------------------------------------------ scores

    def _scores(self, corpus: Corpus) -> dict[str, Any]:
        """The clustering scores as two partitioned group-bys of (group, label, count): keyed once by group,
        once by label, each partition summing its keys' terms (cluster_metrics)."""
        found: dict[str, KeyTerms] = {}
        for by in ("group", "label"):
            corpus.shuffle(f"pairs-{by}", self._label_records, list(self.needs), by, corpus.partitions,
                           side="groups")
            parts = corpus.reduce(f"pairs-{by}", _terms, by)
            corpus.discard(f"pairs-{by}")
            found[by] = sum(parts, KeyTerms())
        if found["group"].total == 0:
            return {}
        return scores(found["group"], found["label"])

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

    # ------------------------------------------------------------ commit

    def _group_ids(self, table: pa.Table, groups: pa.Table | None,
                   valid: np.ndarray) -> tuple[list[Any], list[Any]]:
        """Every grouped row's group id and size (None for a row without an embedding)."""
        n = table.num_rows
        gids: list[Any] = [None] * n
        sizes: list[Any] = [None] * n
        if groups is not None:
            rows = (groups.column("node").to_numpy() & np.int64(0xFFFFFFFF)).tolist()
            for r, g, k in zip(rows, groups.column("gid").to_pylist(), groups.column("size").to_pylist(),
                               strict=True):
                gids[r] = g
                sizes[r] = k
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


# ---------------------------------------------------------------- tasks (module level: shipped to workers)


def _labelled_sample(table: pa.Table, index: int, column: str, per_shard: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bounded sample of one shard's samples that have a vector and a label in ``column``."""
    rows, x = unit_vectors(table)
    labels = table.column(column).take(pa.array(rows)).to_pylist() if rows.size else []
    ok = np.array([lab is not None for lab in labels], dtype=bool)
    x, lab = x[ok], np.array([str(v) for v, k in zip(labels, ok, strict=True) if k], dtype=object)
    if len(x) > per_shard:
        pick = np.sort(np.random.default_rng([seed, index]).choice(len(x), per_shard, replace=False))
        x, lab = x[pick], lab[pick]
    return x, lab.astype(str)


def _low_quality(table: pa.Table, rows: np.ndarray, quality: tuple[str, float] | None) -> np.ndarray:
    """Rows (of ``rows``) below the quality floor; a missing score counts as low."""
    if quality is None:
        return np.zeros(rows.size, dtype=bool)
    col = table.column(quality[0]).take(pa.array(rows))
    q = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return ~(np.nan_to_num(q, nan=-np.inf) >= quality[1])


def _all_vectors(table: pa.Table, index: int, quality: tuple[str, float] | None) -> dict[int, pa.Table]:
    rows, x = unit_vectors(table)
    if rows.size == 0:
        return {}
    node = ordinals(index, table.num_rows)[rows]
    return {0: pa.table({"node": node, "sid": table.column(SAMPLE_ID).take(pa.array(rows)),
                         "vector": _vector_column(x), "low": _low_quality(table, rows, quality)})}


def _level0_points(table: pa.Table, index: int, quality: tuple[str, float] | None) -> dict[Any, pa.Table]:
    """Each sample a point of its own (``pts0``, keyed by its shard index; a low-quality one in ``lowq``
    instead) and a member of itself (``members0``: node, sample id, cluster)."""
    rows, x = unit_vectors(table)
    if rows.size == 0:
        return {}
    node = ordinals(index, table.num_rows)[rows]
    low = _low_quality(table, rows, quality)
    pieces: dict[Any, pa.Table] = {("members0", index): pa.table(
        {"node": node, "sid": table.column(SAMPLE_ID).take(pa.array(rows)), "cl": node})}
    if (~low).any():
        pieces[index] = _cluster_table(singletons(node[~low], x[~low]))
    if low.any():
        pieces[("lowq", index)] = _cluster_table(singletons(node[low], x[low]))
    return pieces


def _cell_points(table: pa.Table, index: int, pts: pa.Table | None, cells: np.ndarray, spill: int,
                 unit: bool, parts: int) -> dict[int, pa.Table]:
    """Each point of one shard-index partition once per each of its ``spill`` nearest cells (by its
    members' mean, normalised in cosine spaces), keyed by cell."""
    del table
    if pts is None or pts.num_rows == 0:
        return {}
    c = _clusters(pts)
    means = c.means()
    assigned = assign_cells(normalise_rows(means) if unit else means, cells, spill)
    cell = assigned.ravel()
    rep = np.repeat(np.arange(len(c)), assigned.shape[1])
    return split_by(cell % parts, _with_cell(c.take(rep), cell))


def _with_cell(c: Clusters, cell: np.ndarray) -> dict[str, Any]:
    return {"cell": cell, **_cluster_columns(c)}


def _cell_knn(table: pa.Table | None, part: int, metric: Metric, threshold: float, k: int, parts: int,
              level: int) -> tuple[dict[Any, pa.Table], int]:
    """Candidate pairs of one partition of cells: each point's k nearest in each of its cells that pass
    the threshold. Written twice: both ways keyed by node for the components (``links``), once keyed by
    the first point's shard index for the join with the points (``edges``)."""
    if table is None or table.num_rows < 2:
        return {}, 0
    cell = table.column("cell").to_numpy()
    ids = table.column("id").to_numpy()
    order = np.lexsort((ids, cell))
    cell = cell[order]
    c = _clusters(table.take(pa.array(order)))
    bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
    found_a, found_b = [], []
    for s, t in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if t - s >= 2:
            a, b, _ = knn_pairs(c.take(np.arange(s, t)), k, metric, threshold)
            found_a.append(c.ids[a + s])
            found_b.append(c.ids[b + s])
    if not found_a:
        return {}, 0
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pair = np.unique(np.stack([lo, hi], axis=1), axis=0)
    lo, hi = pair[:, 0], pair[:, 1]
    pieces: dict[Any, pa.Table] = {(f"links{level}", q): t for q, t in both_ways(lo, hi, parts).items()}
    pieces |= {(f"edges{level}", q): t for q, t in split_by(_shard_of(lo), {"a": lo, "b": hi}).items()}
    return pieces, int(lo.size)


def _attach_cells(table: pa.Table, index: int, sides: list[pa.Table | None], cells: np.ndarray, spill: int,
                  unit: bool, parts: int) -> dict[int, pa.Table]:
    """Final clusters and low-quality samples of one shard index, each in its ``spill`` nearest cells."""
    del table
    out = []
    for piece, low in zip(sides, (False, True), strict=True):
        if piece is None or piece.num_rows == 0:
            continue
        c = _clusters(piece)
        means = c.means()
        assigned = assign_cells(normalise_rows(means) if unit else means, cells, spill)
        rep = np.repeat(np.arange(len(c)), assigned.shape[1])
        out.append(pa.table({**_with_cell(c.take(rep), assigned.ravel()), "low": np.full(rep.size, low)}))
    if not out:
        return {}
    both = pa.concat_tables(out)
    return split_by(both.column("cell").to_numpy() % parts, {c: both.column(c) for c in both.column_names})


def _low_count(table: pa.Table, index: int, quality: tuple[str, float]) -> int:
    rows, _ = unit_vectors(table)
    return int(_low_quality(table, rows, quality).sum())


def _distinct_old(table: pa.Table, index: int, moves: pa.Table | None) -> int:
    return 0 if moves is None else int(np.unique(moves.column("old").to_numpy()).size)


def _attach_nearest(table: pa.Table | None, part: int, metric: Metric,
                    threshold: float) -> tuple[dict[Any, pa.Table], None]:
    """In every cell of one partition, each low-quality sample's closest cluster passing the threshold;
    (old, new, score) keyed by the sample's shard index (``_remap`` keeps the best over its cells)."""
    if table is None or table.num_rows == 0:
        return {}, None
    cell = table.column("cell").to_numpy()
    low = table.column("low").to_numpy(zero_copy_only=False)
    c = _clusters(table)
    order = np.argsort(cell, kind="stable")
    bounds = np.flatnonzero(np.r_[True, cell[order][1:] != cell[order][:-1], True])
    found_old, found_new, found_s = [], [], []
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        rows = order[s:e]
        q, t = rows[low[rows]], rows[~low[rows]]
        qi, ti, sc = nearest(c.take(q), c.take(t), metric, threshold)
        found_old.append(c.ids[q[qi]])
        found_new.append(c.ids[t[ti]])
        found_s.append(sc)
    if not found_old:
        return {}, None
    old, new, sc = np.concatenate(found_old), np.concatenate(found_new), np.concatenate(found_s)
    return {("attach-map", q): t for q, t in split_by(_shard_of(old), {"old": old, "new": new,
                                                                       "score": sc}).items()}, None


def _root_counts(table: pa.Table, index: int, labels: pa.Table | None, parts: int) -> dict[int, pa.Table]:
    """Nodes per component root among one shard index's labelled nodes, keyed by root."""
    del table
    if labels is None or labels.num_rows == 0:
        return {}
    root, count = np.unique(labels.column("root").to_numpy(), return_counts=True)
    return split_by(node_partition(root, parts), {"root": root, "n": count})


def _large_roots(table: pa.Table | None, part: int, limit: int) -> list[tuple[int, int]]:
    if table is None or table.num_rows == 0:
        return []
    sums = table.group_by("root", use_threads=False).aggregate([("n", "sum")])
    big = pc.greater(sums.column("n_sum"), limit)
    return list(zip(sums.column("root").filter(big).to_pylist(), sums.column("n_sum").filter(big).to_pylist(),
                    strict=True))


def _component_rows(table: pa.Table, index: int, sides: list[pa.Table | None], parts: int, level: int,
                    big: np.ndarray, cells: np.ndarray, unit: bool) -> dict[Any, pa.Table]:
    """The join of one shard index: its points with their component (a point without a candidate pair is
    a cluster of its own at this level: it goes on to the next level as it is) and their candidate
    partners, keyed by component. A point of a component above ``max_component`` is keyed by its
    component and its nearest cell."""
    del table
    pts, edges, labels = sides
    if pts is None or pts.num_rows == 0:
        return {}
    c = _clusters(pts)
    c = c.take(np.argsort(c.ids, kind="stable"))
    root = np.full(len(c), -1, dtype=np.int64)
    if labels is not None and labels.num_rows:
        root[np.searchsorted(c.ids, labels.column("node").to_numpy())] = labels.column("root").to_numpy()
    alone = root < 0
    pieces: dict[Any, pa.Table] = {}
    if alone.any():
        pieces[(f"pts{level}", index)] = _cluster_table(c.take(np.flatnonzero(alone)))
    linked = np.flatnonzero(~alone)
    if linked.size == 0:
        return pieces
    sub = np.full(linked.size, -1, dtype=np.int64)
    if big.size:
        giant = np.isin(root[linked], big)
        if giant.any():
            means = c.take(linked[giant]).means()
            sub[giant] = assign_cells(normalise_rows(means) if unit else means, cells, 1)[:, 0]
    lc = c.take(linked)
    partner_a = np.empty(0, dtype=np.int64)
    partner_b = np.empty(0, dtype=np.int64)
    if edges is not None and edges.num_rows:
        partner_a, partner_b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    order = np.argsort(partner_a, kind="stable")
    partner_a, partner_b = partner_a[order], partner_b[order]
    lo = np.searchsorted(partner_a, lc.ids, "left")
    hi = np.searchsorted(partner_a, lc.ids, "right")
    counts = hi - lo
    offsets = np.r_[0, np.cumsum(counts)]
    take = np.repeat(lo - offsets[:-1], counts) + np.arange(offsets[-1])  # every [lo, hi) run, in order
    nbr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(partner_b[take], pa.int64()))
    key = root[linked] ^ ((sub + 1) << np.int64(40))  # spreads a split component's cells over partitions
    cols = {"root": root[linked], "sub": sub, "id": lc.ids, "n": lc.n, "s": _vector_column(lc.s), "q": lc.q,
            "nbr": nbr}
    pieces |= split_by(node_partition(key, parts), cols)
    return pieces


def _rac_partition(table: pa.Table | None, part: int, metric: Metric, threshold: float,
                   level: int) -> tuple[dict[Any, pa.Table], tuple[int, int, int]]:
    """Average linkage by reciprocal-nearest-neighbour rounds over every component of one partition at
    once (pairs across components, or across the cells of a split component, are dropped first). Writes
    the merged clusters as the next level's points and each merged point's new cluster (``map``)."""
    if table is None or table.num_rows == 0:
        return {}, (0, 0, 0)
    table = table.sort_by("id")
    c = _clusters(table)
    m = len(c)
    root, sub = table.column("root").to_numpy(), table.column("sub").to_numpy()
    nbr = table.column("nbr").combine_chunks()
    a = np.repeat(np.arange(m), np.diff(nbr.offsets.to_numpy()))
    other = nbr.flatten().to_numpy()
    b = np.minimum(np.searchsorted(c.ids, other), m - 1)
    ok = (c.ids[b] == other) & (root[a] == root[b]) & (sub[a] == sub[b]) & (a != b)
    merged = rac(c, a[ok], b[ok], metric, threshold)
    reps = np.unique(merged.root)
    out = c.take(reps)
    pieces = {(f"pts{level}", q): t for q, t in split_by(_shard_of(out.ids), _cluster_columns(out)).items()}
    moved = np.flatnonzero(merged.root != np.arange(m))
    if moved.size:
        old, new = c.ids[moved], c.ids[merged.root[moved]]
        pieces |= {(f"map{level}", q): t for q, t in split_by(_shard_of(old), {"old": old, "new": new}).items()}
    _, comp_sizes = np.unique(np.stack([root, sub], axis=1), axis=0, return_counts=True)
    return pieces, (merged.merges, merged.rounds, int(comp_sizes.max()))


def _remap(table: pa.Table, index: int, sides: list[pa.Table | None]) -> dict[int, pa.Table]:
    """Members of the clusters of one shard index, each pointed at its cluster's new cluster, keyed by the
    new cluster's shard index."""
    del table
    members, moves = sides
    if members is None or members.num_rows == 0:
        return {}
    cl = members.column("cl").to_numpy()
    if moves is not None and moves.num_rows:
        old, new = moves.column("old").to_numpy(), moves.column("new").to_numpy()
        rank = -moves.column("score").to_numpy() if "score" in moves.column_names else np.zeros(old.size)
        order = np.lexsort((new, rank, old))  # several candidates of one point: the best, then the smallest
        old, new = old[order], new[order]
        first = np.r_[True, old[1:] != old[:-1]]
        old, new = old[first], new[first]
        pos = np.minimum(np.searchsorted(old, cl), old.size - 1)
        hit = old[pos] == cl
        cl = np.where(hit, new[pos], cl)
    return split_by(_shard_of(cl), {"node": members.column("node"), "sid": members.column("sid"), "cl": cl})


def _final_groups(table: pa.Table, index: int, members: pa.Table | None, prefix: str) -> dict[int, pa.Table]:
    """The groups whose cluster id falls in one shard index: each group's id hashes its smallest sample
    id; (node, group id, size) keyed by each member's shard index (a shard's commit reads only its own)."""
    del table
    if members is None or members.num_rows == 0:
        return {}
    cl = members.column("cl").to_numpy()
    _, group = np.unique(cl, return_inverse=True)
    group = group.ravel()
    firsts = pa.table({"g": group, "sid": members.column("sid")}).group_by("g", use_threads=False).aggregate(
        [("sid", "min")])
    first = np.empty(int(group.max()) + 1, dtype=object)
    first[firsts.column("g").to_numpy()] = firsts.column("sid_min").to_pylist()
    gid = np.array([group_id(prefix, [f]) for f in first.tolist()], dtype=object)
    size = np.bincount(group)
    node = members.column("node").to_numpy()
    return split_by(_shard_of(node), {"node": node, "gid": pa.array(gid[group].tolist(), pa.string()),
                                      "size": size[group].astype(np.int32), "own": cl == node})


def _group_counts(table: pa.Table, index: int, groups: pa.Table | None) -> list[int]:
    """Sizes of the groups whose smallest ordinal is in this shard (each group counted once)."""
    del table
    if groups is None or groups.num_rows == 0:
        return []
    own = groups.column("own").to_numpy(zero_copy_only=False)
    return groups.column("size").to_numpy()[own].tolist()


def _terms(table: pa.Table | None, part: int, by: str) -> KeyTerms:
    """One partition of (group, label, count) pieces: the cluster-metric terms of its whole keys."""
    if table is None or table.num_rows == 0:
        return KeyTerms()
    cells = table.group_by(["g", "l"], use_threads=False).aggregate([("n", "sum")])
    key = "g" if by == "group" else "l"
    keys = np.asarray(cells.column(key).to_pylist(), dtype=object).astype(str)
    return key_terms(keys, cells.column("n_sum").to_numpy())

