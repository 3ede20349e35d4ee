"""Identity separation: two identities whose centroids are too close are one person (a collision).

Generated data (``policy: drop_later``): identities are visited in sorted id order and an identity is
dropped -- every one of its samples, reason "identity collision with <id>" -- when it collides with an
identity kept before it. Greedy in a fixed order is what identity samplers do (Vec2Face keeps a vector
only if it is far from every kept one), and it never drops both sides of a pair, or a third identity
whose only partner was itself dropped.

Ingested data (``policy: merge``): colliding identities are the same person under two labels; each
connected group of collisions is relabelled to its smallest identity id (the stage returns
``identity_id``), nothing is dropped.

Threshold: explicit, the per-space default, or ``fit_quantile``: two centroids collide when they are
as close as the two halves of one identity's own images are (that quantile of the run's split-half
centroid scores). Centroids of two full identities of one person are closer still than split halves,
so a real collision sits well inside; distinct identities sit at the inter-identity distance.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from facekit.thresholds import Metric, defaults_for
from facekit.vector_index import group_sums, knn, normalise_rows, range_pairs
from stages.base import SAMPLE_ID, Batch, Corpus, Params, Rows
from stages.corpus.components import key_partition, split_by
from stages.corpus.identities import (
    IdentityParams,
    IdentityStage,
    aligned,
    centroid_table,
    codes_in,
    matrix,
    names,
    names_at,
    runs,
    shard_labelled,
    vectors,
)
from stages.corpus.kernels import EMBEDDING_COLUMNS, centroids_from_sums, nearest_other

COLLISION = "identity_collision"  # the rule: this identity's centroid is within the threshold of a kept one
SPLIT_HALF_MIN = 4  # images an identity needs for its two halves' centroids to say anything


class SeparationParams(IdentityParams):
    policy: Literal["drop_later", "merge"] = Field(
        "drop_later", description=
        "drop_later: of two colliding identities the later (by id) is dropped; merge: relabelled as one")
    threshold: float | None = Field(
        None, description="centroid vs centroid score in the space's metric; null: fitted or the space's default")
    fit_quantile: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="fit the threshold at this quantile of split-half centroid scores (e.g. 0.99)")


class SeparationStage(IdentityStage):
    """Finds identity collisions; drops the later identity or merges labels, recording the partner."""

    name: ClassVar[str] = "separation"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = SeparationParams
    # identity_id is a common manifest column: the commit sets it (relabelled under merge) without
    # declaring it.
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("collision_with", pa.string()),  # the kept / merged-into identity
        pa.field("collision_score", pa.float32()),  # centroid score to that identity
        pa.field("nearest_identity_id", pa.string()),
        pa.field("nearest_identity_score", pa.float32()),
        pa.field("threshold", pa.float32()),
        pa.field("threshold_source", pa.string()),
        pa.field("score_metric", pa.string()),
    )

    params: SeparationParams

    def run_corpus(self, corpus: Corpus) -> None:
        """Identity centroids and split halves by an identity-partitioned map + reduce; the collision search
        runs in one task on that table of identities (k rows, not samples), whose decisions go back to the
        shards holding each identity. The driver sees counts and the threshold only."""
        p = self.params
        found = self.identity_space(corpus, p.partitions, 4, {"identities": 0})
        if found is None:
            return
        space, metric = found.space, found.metric
        base = {"metric": metric, "parts": found.parts}
        if p.fit_quantile is not None and p.threshold is None:
            # Split halves by run order: each shard needs how many images of its identities come before it.
            corpus.shuffle("members", _member_records, EMBEDDING_COLUMNS, base)
            corpus.reshuffle("offsets", "members", _offsets)
            corpus.discard("members")
            corpus.shuffle("halves", _half_records, EMBEDDING_COLUMNS, base, side="offsets")
            corpus.discard("offsets")
        else:  # no threshold to fit: one sum per identity (all in the "even" half)
            corpus.shuffle("halves", _whole_records, EMBEDDING_COLUMNS, base)
        k = sum(corpus.reshuffle("cents", "halves", _half_totals, metric))
        found, decisions = corpus.call(self._collisions, corpus.gathered("cents", "identity"), space, metric,
                                       kept=True)
        corpus.discard("cents")
        corpus.reshuffle("back", "halves", _decisions_back, decisions)
        corpus.discard("halves")
        corpus.commit(self._commit, base, found, side="back")
        self._summary = {
            "policy": p.policy, "embedding_space": space, "threshold": found["threshold"],
            "threshold_source": found["source"], "identities": k, "colliding_pairs": found["pairs"],
            "dropped_identities" if p.policy == "drop_later" else "merged_identities": found["hits"],
        }

    def _collisions(self, cents_table: pa.Table | None, space: str,
                    metric: Metric) -> tuple[dict[str, Any], pa.Table]:
        """The threshold, the colliding pairs and each identity's partner and nearest identity, from the
        gathered centroid table; the per-identity answer stays in the object store."""
        p = self.params
        identities, cents = centroid_table(cents_table)
        k = len(identities)
        halves = np.empty(0) if cents_table is None else cents_table.column("half_score").to_numpy()
        threshold, source = self._threshold(space, metric, halves[~np.isnan(halves)])
        pairs = range_pairs(cents, metric, threshold, exact_max=p.exact_max, seed=self.context.seed)
        if p.policy == "drop_later":
            partner = self._drop_later(k, pairs.i, pairs.j, pairs.score, metric)
        else:
            partner = self._merge(k, pairs.i, pairs.j)
        partner_score = np.full(k, np.nan, dtype=np.float32)
        hit = partner >= 0
        partner_score[hit] = metric.score(cents[hit], cents[partner[hit]])
        near_id = np.full(k, -1, dtype=np.int64)
        near_score = np.full(k, np.nan, dtype=np.float32)
        if k > 1:
            scores, ids = knn(cents, cents, 2, metric, exact_max=p.exact_max, seed=self.context.seed)
            near_id, near_score = nearest_other(scores, ids, np.arange(k))
        table = pa.table({"identity": identities, "partner": names_at(identities, partner),
                          "partner_score": partner_score, "near": names_at(identities, near_id),
                          "near_score": near_score})
        found = {"threshold": threshold, "source": source, "pairs": len(pairs), "hits": int(hit.sum())}
        return found, table

    def _threshold(self, space: str, metric: Metric, halves: np.ndarray) -> tuple[float, str]:
        p = self.params
        if p.threshold is not None:
            return float(p.threshold), "param"
        if p.fit_quantile is not None and halves.size:
            q = p.fit_quantile if not metric.higher_is_same else 1.0 - p.fit_quantile
            return float(np.quantile(halves, q)), f"fit_quantile={p.fit_quantile:g} of {halves.size} split halves"
        return defaults_for(space).collision, f"default:{space}"

    def _commit(self, table: pa.Table, index: int, back: pa.Table | None, base: dict[str, Any],
                found: dict[str, Any]) -> Batch:
        p, metric, threshold = self.params, base["metric"], found["threshold"]
        _, rows, labels = shard_labelled(table, metric)
        own_names, codes = np.unique(labels, return_inverse=True)
        codes = codes.ravel()
        at = aligned(own_names, back, "separation")
        get = (lambda c: []) if back is None else (lambda c: back.column(c).take(pa.array(at)).to_pylist())
        partner, partner_score, near, near_score = (get(c) for c in ("partner", "partner_score", "near",
                                                                         "near_score"))
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        for r, i in enumerate(rows.tolist()):
            c = int(codes[r])
            ns = near_score[c]
            out.set(i, nearest_identity_id=near[c], nearest_identity_score=None if ns is None or np.isnan(ns) else ns,
                    threshold=threshold, threshold_source=found["source"], score_metric=metric.value)
            other = partner[c]
            if other is None:
                continue
            score = float(partner_score[c])
            out.set(i, collision_with=other, collision_score=score)
            if p.policy == "drop_later":
                out.drop(i, COLLISION, f"with {other} ({score:.3f}, threshold {threshold:.3f})")
            else:
                out.set(i, identity_id=other)
        return out.batch()

    @staticmethod
    def _drop_later(k: int, i: np.ndarray, j: np.ndarray, score: np.ndarray, metric: Metric) -> np.ndarray:
        """Visit identities in order; drop one that collides with an earlier kept one (its closest)."""
        earlier: list[list[tuple[float, int]]] = [[] for _ in range(k)]
        sign = -1.0 if metric.higher_is_same else 1.0  # sort closest first
        for a, b, s in zip(i.tolist(), j.tolist(), score.tolist(), strict=True):
            earlier[b].append((sign * s, a))  # pairs come as i < j: j is the later identity
        partner = np.full(k, -1, dtype=np.int64)
        for c in range(k):
            for _, a in sorted(earlier[c]):
                if partner[a] < 0:  # a was kept
                    partner[c] = a
                    break
        return partner

    @staticmethod
    def _merge(k: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Each connected group of collisions maps onto its smallest identity."""
        graph = coo_matrix((np.ones(i.size), (i, j)), shape=(k, k))
        _, comp = connected_components(graph, directed=False)
        root = np.full(comp.max() + 1, k, dtype=np.int64)
        np.minimum.at(root, comp, np.arange(k))
        partner = root[comp]
        partner[partner == np.arange(k)] = -1
        return partner

def _member_records(table: pa.Table, index: int, base: dict[str, Any]) -> dict[Any, pa.Table]:
    """(identity, shard, images) of each identity of this shard, keyed by the identity's partition."""
    _, _, labels = shard_labelled(table, base["metric"])
    own_names, counts = np.unique(labels, return_counts=True)
    return dict(split_by(key_partition(own_names, base["parts"]), {
        "identity": own_names, "shard": np.full(own_names.size, index, dtype=np.int64), "count": counts}))


def _offsets(table: pa.Table | None, part: int) -> tuple[dict[Any, pa.Table], None]:
    """Each (identity, shard): how many images of the identity earlier shards hold -- where its images'
    run-order numbering starts in that shard (the even / odd halves follow it)."""
    if table is None or table.num_rows == 0:
        return {}, None
    table, starts, inv = runs(table)
    counts = table.column("count").to_numpy()
    before = np.cumsum(counts) - counts
    offset = before - before[starts][inv]
    return dict(split_by(table.column("shard").to_numpy(), {"identity": table.column("identity"), "offset": offset})), \
        None


def _whole_records(table: pa.Table, index: int, base: dict[str, Any]) -> dict[Any, pa.Table]:
    """``_half_records`` when no threshold is fitted: every image counts as even (no offsets needed)."""
    return _half_records(table, index, None, base, split=False)


def _half_records(table: pa.Table, index: int, offsets: pa.Table | None, base: dict[str, Any],
                  split: bool = True) -> dict[Any, pa.Table]:
    """Sums and counts of each identity's even and odd images (by its image number in run order), keyed by
    the identity's partition."""
    xj, _, labels = shard_labelled(table, base["metric"])
    if not labels.size:
        return {}
    own_names, inv = np.unique(labels, return_inverse=True)
    inv, m = inv.ravel(), own_names.size
    if not split:
        code = inv
    else:
        start = offsets.column("offset").to_numpy()[aligned(own_names, offsets, "separation offsets")] \
            if offsets is not None else np.zeros(0, dtype=np.int64)
        order = np.argsort(inv, kind="stable")
        first = np.searchsorted(inv[order], np.arange(m))
        rank = np.empty(inv.size, dtype=np.int64)
        rank[order] = np.arange(inv.size) - first[inv[order]]
        code = (start[inv] + rank) % 2 * m + inv
    part = group_sums(code, xj, 2 * m).reshape(2, m, xj.shape[1])
    cnt = np.bincount(code, minlength=2 * m).reshape(2, m)
    return dict(split_by(key_partition(own_names, base["parts"]), {
        "identity": own_names, "shard": np.full(m, index, dtype=np.int64), "even": vectors(part[0]),
        "odd": vectors(part[1]), "even_count": cnt[0], "odd_count": cnt[1]}))


def _half_totals(table: pa.Table | None, part: int, metric: Metric) -> tuple[dict[Any, pa.Table], int]:
    """One identity partition: halves added in shard order, the identity's centroid and its split-half
    score (identities of at least ``SPLIT_HALF_MIN`` images), into the gathered centroid table."""
    if table is None or table.num_rows == 0:
        return {}, 0
    table, starts, _ = runs(table)
    ids = names(table.column("identity"))[starts]
    even = np.add.reduceat(matrix(table.column("even")), starts, axis=0)
    odd = np.add.reduceat(matrix(table.column("odd")), starts, axis=0)
    ce = np.add.reduceat(table.column("even_count").to_numpy(), starts)
    co = np.add.reduceat(table.column("odd_count").to_numpy(), starts)
    cents = centroids_from_sums(np.stack([even, odd]).sum(axis=0), ce + co, metric)
    half = np.full(ids.size, np.nan, dtype=np.float64)
    ok = (ce + co >= SPLIT_HALF_MIN) & (ce > 0) & (co > 0)
    if ok.any():
        a, b = even[ok] / ce[ok, None], odd[ok] / co[ok, None]
        if metric.higher_is_same:
            a, b = normalise_rows(a), normalise_rows(b)
        half[ok] = metric.score(a.astype(np.float32), b.astype(np.float32)).astype(np.float64)
    return {0: pa.table({"identity": ids, "centroid": vectors(cents), "half_score": half})}, int(ids.size)


def _decisions_back(table: pa.Table | None, part: int, decisions: pa.Table) -> tuple[dict[Any, pa.Table], None]:
    """Each identity's decision to every shard that holds it."""
    if table is None or table.num_rows == 0:
        return {}, None
    pos = codes_in(table.column("identity"), decisions.column("identity").combine_chunks())
    if (pos < 0).any():
        raise RuntimeError(f"separation: partition {part} holds identities the centroid table does not")
    rows = decisions.take(pa.array(pos))
    return dict(split_by(table.column("shard").to_numpy(), {c: rows.column(c) for c in rows.column_names})), None
