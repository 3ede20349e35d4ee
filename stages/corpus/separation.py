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
from facekit.vector_index import EXACT_MAX, group_sums, knn, labelled_embeddings, normalise_rows, one_space, range_pairs
from stages.base import IDENTITY_ID, SAMPLE_ID, Batch, Corpus, GlobalStage, Params, Resources, Rows, rows_ok
from stages.corpus.consistency import EMBEDDING_COLUMNS, _census, _dim, _shard_vectors, centroids, centroids_from_sums

COLLISION = "identity_collision"  # the rule: this identity's centroid is within the threshold of a kept one


class SeparationParams(Params):
    policy: Literal["drop_later", "merge"] = "drop_later"
    threshold: float | None = None  # centroid vs centroid, in the space's metric
    fit_quantile: float | None = Field(None, gt=0.0, lt=1.0)  # e.g. 0.99 of split-half centroid scores
    exact_max: int = Field(EXACT_MAX, ge=0)


def split_half_scores(
    x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, min_size: int = 4
) -> np.ndarray:
    """Score between the centroids of the two halves (alternate rows) of each identity's images."""
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(k + 1))
    out = []
    for c in range(k):
        rows = order[starts[c] : starts[c + 1]]
        if rows.size < min_size:
            continue
        a, b = x[rows[0::2]].mean(axis=0), x[rows[1::2]].mean(axis=0)
        halves = np.stack([a, b])
        if metric.higher_is_same:
            halves = normalise_rows(halves)
        out.append(float(metric.score(halves[:1], halves[1:])[0]))
    return np.asarray(out, dtype=np.float64)


class SeparationStage(GlobalStage):
    """Finds identity collisions; drops the later identity or merges labels, recording the partner."""

    name: ClassVar[str] = "separation"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = SeparationParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    needs: tuple[str, ...] = ("embedding", "embedding_space", "embedding_metric")
    # identity_id is a common manifest column: run_global returns it (relabelled under merge) but does
    # not declare it.
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
    _summary: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return dict(getattr(self, "_summary", {}))

    def run_global(self, table: pa.Table) -> Batch:
        p = self.params
        n = table.num_rows
        labels = table.column(IDENTITY_ID).to_pylist()
        out = rows_ok(table.column(SAMPLE_ID).to_pylist())
        out["detail"] = [None] * n
        for f in self.columns:
            out[f.name] = [None] * n
        out[IDENTITY_ID] = list(labels)
        le = labelled_embeddings(table, labels)
        if le is None:
            self._summary = {"identities": 0}
            return out
        x, rows, names, codes, space, metric = le.x, le.rows, le.names, le.codes, le.space, le.metric
        k = len(names)  # names are sorted: code order is the deterministic identity order
        cents = centroids(x[rows], codes, k, metric, np.ones(rows.size, dtype=bool))
        threshold, source = self._threshold(space, metric, x[rows], codes, k)

        pairs = range_pairs(cents, metric, threshold, exact_max=p.exact_max, seed=self.context.seed)
        # identity code -> the code of the identity it collides into (-1: none)
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
            pick = np.where(ids[:, 0] == np.arange(k), 1, 0)
            near_id = ids[np.arange(k), pick]
            near_score = scores[np.arange(k), pick]

        for r, i in enumerate(rows):
            c = codes[r]
            out["nearest_identity_id"][i] = str(names[near_id[c]]) if near_id[c] >= 0 else None
            out["nearest_identity_score"][i] = None if np.isnan(near_score[c]) else float(near_score[c])
            out["threshold"][i] = threshold
            out["threshold_source"][i] = source
            out["score_metric"][i] = metric.value
            if partner[c] < 0:
                continue
            other = str(names[partner[c]])
            out["collision_with"][i] = other
            out["collision_score"][i] = float(partner_score[c])
            if p.policy == "drop_later":
                out["keep"][i] = False
                out["reason"][i] = COLLISION
                out["detail"][i] = f"with {other} ({partner_score[c]:.3f}, threshold {threshold:.3f})"
            else:
                out[IDENTITY_ID][i] = other
        self._summary = {
            "policy": p.policy,
            "embedding_space": space,
            "threshold": threshold,
            "threshold_source": source,
            "identities": k,
            "colliding_pairs": len(pairs),
            "dropped_identities" if p.policy == "drop_later" else "merged_identities": int(hit.sum()),
        }
        return out

    # ------------------------------------------------------------ distributed form

    def distributed(self) -> bool:
        return True

    def run_corpus(self, corpus: Corpus) -> None:
        """Identity centroids by map + reduce; the collision search runs on that table of identities
        (k rows, not samples); decisions are joined back per shard by identity."""
        p = self.params
        census = corpus.map(_census, EMBEDDING_COLUMNS, False)  # the half sums come from their own map
        names = np.unique(np.concatenate([c["names"] for c in census])) if census else np.empty(0, str)
        if names.size == 0:
            self._summary = {"identities": 0}
            corpus.commit(_commit_plain, [f.name for f in self.columns])
            return
        space, metric = one_space(set().union(*(c["spaces"] for c in census)),
                                  set().union(*(c["metrics"] for c in census)))
        k, d = names.size, _dim(census)
        base = corpus.put({"names": names, "metric": metric})
        offsets: list[np.ndarray] = []  # per shard: images of each of its identities in earlier shards
        seen = np.zeros(k, dtype=np.int64)
        for c in census:
            codes = np.searchsorted(names, c["names"])
            offsets.append(seen[codes].copy())
            seen[codes] += c["counts"]
        sums = np.zeros((2, k, d), dtype=np.float64)  # even / odd images of each identity, in run order
        counts = np.zeros((2, k), dtype=np.int64)
        for codes, part, cnt in corpus.map(_half_sums, EMBEDDING_COLUMNS, base, corpus.put(offsets)):
            sums[:, codes] += part
            counts[:, codes] += cnt
        cents = centroids_from_sums(sums.sum(axis=0), counts.sum(axis=0), metric)
        threshold, source = self._threshold_from_halves(space, metric, sums, counts)
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
            pick = np.where(ids[:, 0] == np.arange(k), 1, 0)
            near_id = ids[np.arange(k), pick]
            near_score = scores[np.arange(k), pick]
        table = corpus.put({"partner": partner, "partner_score": partner_score, "near_id": near_id,
                            "near_score": near_score, "threshold": threshold, "source": source})
        corpus.commit(self._commit, base, table)
        self._summary = {
            "policy": p.policy, "embedding_space": space, "threshold": threshold, "threshold_source": source,
            "identities": k, "colliding_pairs": len(pairs),
            "dropped_identities" if p.policy == "drop_later" else "merged_identities": int(hit.sum()),
        }

    def _threshold_from_halves(self, space: str, metric: Metric, sums: np.ndarray,
                               counts: np.ndarray) -> tuple[float, str]:
        p = self.params
        if p.threshold is not None:
            return float(p.threshold), "param"
        if p.fit_quantile is not None:
            ok = counts.sum(axis=0) >= 4  # split_half_scores' min_size
            halves = np.stack([sums[0][ok] / counts[0][ok, None], sums[1][ok] / counts[1][ok, None]])
            if metric.higher_is_same:
                halves = np.stack([normalise_rows(halves[0]), normalise_rows(halves[1])])
            scores = metric.score(halves[0].astype(np.float32), halves[1].astype(np.float32)).astype(np.float64)
            if scores.size:
                q = p.fit_quantile if not metric.higher_is_same else 1.0 - p.fit_quantile
                return float(np.quantile(scores, q)), f"fit_quantile={p.fit_quantile:g} of {scores.size} split halves"
        return defaults_for(space).collision, f"default:{space}"

    def _commit(self, table: pa.Table, index: int, base: dict[str, Any], t: dict[str, Any]) -> Batch:
        p = self.params
        _, rows, codes = _shard_vectors(table, base)
        names, metric = base["names"], base["metric"]
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        for r, i in enumerate(rows.tolist()):
            c = int(codes[r])
            near, ns = int(t["near_id"][c]), float(t["near_score"][c])
            out.set(i, nearest_identity_id=str(names[near]) if near >= 0 else None,
                    nearest_identity_score=None if np.isnan(ns) else ns, threshold=t["threshold"],
                    threshold_source=t["source"], score_metric=metric.value)
            if t["partner"][c] < 0:
                continue
            other, score = str(names[t["partner"][c]]), float(t["partner_score"][c])
            out.set(i, collision_with=other, collision_score=score)
            if p.policy == "drop_later":
                out.drop(i, COLLISION, f"with {other} ({score:.3f}, threshold {t['threshold']:.3f})")
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

    def _threshold(
        self, space: str, metric: Metric, x: np.ndarray, codes: np.ndarray, k: int
    ) -> tuple[float, str]:
        p = self.params
        if p.threshold is not None:
            return float(p.threshold), "param"
        if p.fit_quantile is not None:
            halves = split_half_scores(x, codes, k, metric)
            if halves.size:
                q = p.fit_quantile if not metric.higher_is_same else 1.0 - p.fit_quantile
                return float(
                    np.quantile(halves, q)
                ), f"fit_quantile={p.fit_quantile:g} of {halves.size} split halves"
        return defaults_for(space).collision, f"default:{space}"


def _half_sums(table: pa.Table, index: int, base: dict[str, Any],
               offsets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums and counts of each identity's even and odd images (by its image number in run order)."""
    xj, _, codes = _shard_vectors(table, base)
    uc, inv = np.unique(codes, return_inverse=True)
    inv = inv.ravel()
    # The census's sorted names of this shard are exactly these codes' names, in the same order.
    start = np.asarray(offsets[index], dtype=np.int64)
    if start.size != uc.size:
        raise RuntimeError(f"shard {index}: {uc.size} identities, the census counted {start.size}")
    order = np.argsort(inv, kind="stable")
    first = np.searchsorted(inv[order], np.arange(uc.size))
    rank = np.empty(inv.size, dtype=np.int64)
    rank[order] = np.arange(inv.size) - first[inv[order]]
    parity = (start[inv] + rank) % 2
    code = parity * uc.size + inv
    part = group_sums(code, xj, 2 * uc.size).reshape(2, uc.size, xj.shape[1])
    cnt = np.bincount(code, minlength=2 * uc.size).reshape(2, uc.size)
    return uc, part, cnt


def _commit_plain(table: pa.Table, index: int, columns: list[str]) -> Batch:
    return Rows(table.column(SAMPLE_ID).to_pylist(), columns).batch()
