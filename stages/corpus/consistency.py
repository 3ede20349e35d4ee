"""Identity consistency: is each image the identity it is labelled as?

Each image is scored against a robust centroid of its identity: by default the mean of the
identity's *other* images (leave-one-out, so a bad image does not pull its own reference towards
itself), or their coordinate-wise median; with ``passes: 2`` the centroids are rebuilt from the images
the first pass kept, so planted images stop contaminating their identity's reference. Each image's
nearest *other* identity centroid is recorded too.

Generated data (``mode: generated``): the label is true by construction, so an image beyond the
threshold is a generator failure when it shows someone else -- nearer another identity's centroid --
or nobody -- as far from its identity as a typical stranger is (the median impostor score). An image
beyond the threshold that is still nearest its own identity, and nearer than a stranger, keeps its
identity under strong nuisance (glasses, pose, light) and is kept (``keep_nearest``; off = drop
everything beyond the threshold). Measured on procedural renders with dlib (20 identities x 8, 20
images planted from other identities, fitted at FAR 1e-2): the plain threshold kept 89% of clean
images, the nearest rule 99%, both dropping every planted image; the clean images beyond the
threshold all wore the renderer's glasses.

Ingested labelled data (``mode: label_noise``): real photos of one person vary more, so distance alone
is not enough; an image is label noise when it is beyond the threshold AND nearer another identity's
centroid than its own.

The threshold is in the embedding space's own metric: a documented per-space default
(facekit.thresholds), an explicit value, or fitted at a target false-accept rate (``fit_far``) from the
run's own comparisons -- genuine: each image vs its own leave-one-out centroid; impostor: each image
vs other identities' centroids -- the statistic the decision uses.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.thresholds import FittedThreshold, Metric, defaults_for, fit_at_far
from facekit.vector_index import (
    EXACT_MAX,
    build_index,
    deserialize_index,
    group_sums,
    knn,
    labelled_embeddings,
    normalise_rows,
    one_space,
    serialize_index,
)
from stages.base import IDENTITY_ID, SAMPLE_ID, Batch, Corpus, GlobalStage, Params, Resources, Rows, rows_ok
from stages.corpus.components import key_partition, split_by
from stages.corpus.identities import (
    aligned,
    centroid_table,
    codes_in,
    matrix,
    names,
    names_at,
    plan_identity_partitions,
    runs,
    shard_labelled,
    space_census,
    vectors,
)

EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")

LOO_MEDIAN_MAX = 64  # above this many images one image barely moves a median; use the plain median


class ConsistencyParams(Params):
    mode: Literal["generated", "label_noise"] = Field(
        "generated", description=
        "generated: distance to the identity's centroid decides; label_noise: ingested labels, where an image is "
        "dropped when it is nearer another identity")
    keep_nearest: bool = Field(
        True, description="generated: keep an image beyond the threshold that is still nearest its own identity")
    centroid: Literal["leave_one_out", "median"] = Field(
        "leave_one_out", description=
        "leave_one_out: each image scored against its identity's centroid without itself; median: a per-coordinate "
        "median (single process)")
    threshold: float | None = Field(
        None, description="score limit in the space's metric; null: fitted (fit_far) or the space's default")
    fit_far: float | None = Field(
        None, gt=0.0, lt=1.0, description=
        "fit the threshold at this false-accept rate from the run's own labelled pairs (e.g. 0.001)")
    fit_max_impostors: int = Field(1_000_000, ge=1000, description="impostor pairs sampled to fit the threshold")
    # Pass 2 rebuilds every centroid from the images pass 1 kept, so a planted image no longer pulls its
    # identity's reference towards itself; 1 = a single leave-one-out pass.
    passes: int = Field(
        2, ge=1, le=5, description=
        "pass 2 rebuilds every centroid from the images pass 1 kept; 1: a single leave-one-out pass")
    min_samples: int = Field(
        3, ge=2, description="identities with fewer images have no reliable centroid and are kept unjudged")
    exact_max: int = Field(
        EXACT_MAX, ge=0, description=
        "up to this many centroids the nearest-identity search is exact, above it approximate (IVF)")
    partitions: int | None = Field(
        None, ge=1, description="identity partitions of the distributed form; null: sized from the run")


def centroids(x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, inlier: np.ndarray) -> np.ndarray:
    """Mean vector of each label's inlier rows (renormalised for cosine spaces)."""
    sums = group_sums(codes[inlier], x[inlier], k)
    means = sums / np.maximum(np.bincount(codes[inlier], minlength=k), 1)[:, None]
    return (normalise_rows(means) if metric.higher_is_same else means).astype(np.float32)


def own_centroid_scores(
    x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, method: str, inlier: np.ndarray
) -> np.ndarray:
    """Score of each row against its identity's centroid of inliers, never including the row itself."""
    scores = np.full(len(x), np.nan, dtype=np.float32)
    if method == "leave_one_out":
        sums = group_sums(codes[inlier], x[inlier], k)
        return loo_scores(x, codes, sums, np.bincount(codes[inlier], minlength=k), metric, inlier)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(k + 1))
    for c in range(k):
        rows = order[starts[c] : starts[c + 1]]
        good = rows[inlier[rows]]
        ref = np.full((rows.size, x.shape[1]), np.nan, dtype=np.float64)
        whole = np.median(x[good], axis=0) if good.size else None
        for r, row in enumerate(rows):
            others = good[good != row]
            if others.size == 0:
                continue
            if good.size > LOO_MEDIAN_MAX and whole is not None:
                ref[r] = whole
            else:
                ref[r] = np.median(x[others], axis=0)
        ok = ~np.isnan(ref[:, 0])
        if metric.higher_is_same:
            ref[ok] = normalise_rows(ref[ok])
        scores[rows[ok]] = metric.score(x[rows[ok]], ref[ok].astype(np.float32))
    return scores


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


class ConsistencyStage(GlobalStage):
    """Drops images that are not the identity they carry; scores and the threshold used are stored."""

    name: ClassVar[str] = "consistency"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = ConsistencyParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    needs: tuple[str, ...] = ("embedding", "embedding_space", "embedding_metric")
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("centroid_score", pa.float32()),  # vs own robust centroid, in score_metric units
        pa.field("nearest_other_identity", pa.string()),
        pa.field("nearest_other_score", pa.float32()),
        pa.field("threshold", pa.float32()),
        pa.field("threshold_source", pa.string()),
        pa.field("stranger_score", pa.float32()),  # median impostor score: "as far as a stranger"
        pa.field("score_metric", pa.string()),  # euclidean: lower = same; cosine: higher = same
    )

    params: ConsistencyParams
    _summary: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Threshold used, how it was chosen, and counts, for the run report."""
        return dict(getattr(self, "_summary", {}))

    def run_global(self, table: pa.Table) -> Batch:
        p = self.params
        n = table.num_rows
        out = rows_ok(table.column(SAMPLE_ID).to_pylist())
        out["detail"] = [None] * n
        for f in self.columns:
            out[f.name] = [None] * n
        labels = table.column(IDENTITY_ID).to_pylist()
        le = labelled_embeddings(table, labels)
        if le is None:
            self._summary = {"judged": 0}
            return out
        x, rows, names, codes, space, metric = le.x, le.rows, le.names, le.codes, le.space, le.metric
        k = len(names)
        xj = x[rows]
        counts = np.bincount(codes, minlength=k)
        inlier = np.ones(rows.size, dtype=bool)
        for _ in range(p.passes):
            cents = centroids(xj, codes, k, metric, inlier)
            own = own_centroid_scores(xj, codes, k, metric, p.centroid, inlier)
            own[counts[codes] < p.min_samples] = np.nan
            impostor = impostor_scores(xj, codes, cents, metric, p.fit_max_impostors, self.context.seed)
            threshold, source, fitted = self._threshold(space, metric, own, impostor)
            has_score = ~np.isnan(own)
            same = np.ones(rows.size, dtype=bool)
            same[has_score] = metric.same(own[has_score], threshold)
            inlier = self._next_inliers(same, codes, k)

        other_id: list[str | None] = [None] * rows.size
        other_score = np.full(rows.size, np.nan, dtype=np.float32)
        if k > 1:
            scores, ids = knn(cents, xj, 2, metric, exact_max=p.exact_max, seed=self.context.seed)
            pick = np.where(ids[:, 0] == codes, 1, 0)
            best = ids[np.arange(rows.size), pick]
            other_score = scores[np.arange(rows.size), pick]
            other_id = [str(names[b]) if b >= 0 else None for b in best]
        stranger = float(np.median(impostor)) if impostor.size else None

        far = has_score & ~same
        nearer_other = metric.closer(np.nan_to_num(other_score, nan=metric.worst()), own)
        as_far_as_stranger = np.zeros(rows.size, dtype=bool)
        if stranger is not None:
            as_far_as_stranger[has_score] = ~metric.same(own[has_score], stranger)
        if p.mode == "label_noise":
            drop = far & nearer_other
        elif p.keep_nearest and stranger is not None:
            drop = far & (nearer_other | as_far_as_stranger)
        else:
            drop = far

        for r, i in enumerate(rows):
            out["centroid_score"][i] = None if np.isnan(own[r]) else float(own[r])
            out["nearest_other_identity"][i] = other_id[r]
            out["nearest_other_score"][i] = None if np.isnan(other_score[r]) else float(other_score[r])
            out["threshold"][i] = threshold
            out["threshold_source"][i] = source
            out["stranger_score"][i] = stranger
            out["score_metric"][i] = metric.value
            if drop[r]:
                out["keep"][i] = False
                out["reason"][i] = INCONSISTENT
                out["detail"][i] = self._detail(own[r], threshold, other_id[r], other_score[r], nearer_other[r])
        self._summary = {
            "mode": p.mode,
            "embedding_space": space,
            "metric": metric.value,
            "threshold": threshold,
            "threshold_source": source,
            "stranger_score": stranger,
            "fit": fitted.as_dict() if fitted else None,
            "identities": k,
            "passes": p.passes,
            "judged": int(has_score.sum()),
            "unjudged": int(n - has_score.sum()),
            "dropped": int(drop.sum()),
        }
        return out

    # ------------------------------------------------------------ distributed form

    def distributed(self) -> bool:
        """Leave-one-out centroids are sums and counts (map + reduce); medians need every image of an
        identity in one place, so ``centroid: median`` runs the single-process form."""
        return self.params.centroid == "leave_one_out"

    def run_corpus(self, corpus: Corpus) -> None:
        """Per-identity sums and counts as identity-partitioned map + reduce, one round per pass, each shard
        getting back the tables of its own identities; scoring, the threshold's bounded sample of genuine /
        impostor comparisons and the decisions per shard, in parallel. The driver sees counts and
        thresholds only: no table that grows with the identities."""
        p = self.params
        census = corpus.map(space_census, EMBEDDING_COLUMNS)
        if not any(c["labelled"] for c in census):
            self._summary = {"judged": 0}
            corpus.commit(_commit_unjudged, list(self.columns))
            return
        space, metric = one_space(set().union(*(c["spaces"] for c in census)),
                                  set().union(*(c["metrics"] for c in census)))
        d = max(c["dim"] for c in census)
        parts = plan_identity_partitions(corpus, census, p.partitions, 2 * 8 * d + 64)
        base = {"metric": metric, "min_samples": p.min_samples, "parts": parts}
        thresholds: list[float] = []
        sides: list[str] = []
        k = n_rows = judged = 0
        threshold, source, fitted, impostor = 0.0, "", None, np.empty(0, dtype=np.float32)
        for t in range(p.passes):
            corpus.shuffle(f"ids{t}", self._identity_records, EMBEDDING_COLUMNS, base, thresholds, t, side=tuple(sides))
            stats = corpus.reshuffle(f"side{t}", f"ids{t}", _identity_totals, t, metric, p.min_samples)
            corpus.discard(f"ids{t}")
            if t:
                corpus.discard(f"cent{t - 1}")
            sides.append(f"side{t}")
            if t == 0:
                k, n_rows, judged = (sum(s[i] for s in stats) for i in range(3))
            if t < p.passes - 1 and (p.threshold is not None or p.fit_far is None):
                # Nothing to fit: the sample of comparisons is only needed for the last pass's stranger score.
                threshold, source, fitted = self._threshold(space, metric, impostor, impostor)
                thresholds.append(threshold)
                continue
            scale = {"k": k, "n_rows": n_rows}
            scored = corpus.map(self._score_sample, EMBEDDING_COLUMNS, base, thresholds, scale,
                                corpus.gathered(f"cent{t}", "identity", centroid_table), t, side=tuple(sides))
            genuine = np.concatenate([g for g, _ in scored])
            impostor = np.concatenate([i for _, i in scored])
            threshold, source, fitted = self._threshold(space, metric, genuine, impostor)
            thresholds.append(threshold)
        index = None
        if k > 1:
            _, index = corpus.call(_centroid_index, corpus.gathered(f"cent{p.passes - 1}", "identity"), metric,
                                   p.exact_max, self.context.seed, kept=True, convert=_load_index)
        stranger = float(np.median(impostor)) if impostor.size else None
        final = {"thresholds": thresholds, "source": source, "stranger": stranger}
        results = corpus.commit(self._commit, base, final, index, side=tuple(sides))
        dropped = sum(r.dropped for r in results) + corpus.dropped_before()
        self._summary = {
            "mode": p.mode, "embedding_space": space, "metric": metric.value, "threshold": threshold,
            "threshold_source": source, "stranger_score": stranger, "fit": fitted.as_dict() if fitted else None,
            "identities": k, "passes": p.passes, "judged": judged,
            "unjudged": int(sum(c["n"] for c in census) - judged), "dropped": dropped,
        }

    def _replay(self, xj: np.ndarray, labels: np.ndarray, sides: list[pa.Table | None], base: dict[str, Any],
                thresholds: list[float]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """This shard's inliers before the last state, and the last state's scores and same-identity mask
        (None when it has no threshold yet): every pass is recomputed from the shard's pieces of the
        per-identity tables (``sides[t]``: pass t's sums and counts, and whether pass t-1 left an identity
        enough inliers)."""
        metric = base["metric"]
        own_names, codes = np.unique(labels, return_inverse=True)
        codes = codes.ravel()
        inlier = np.ones(len(xj), dtype=bool)
        own = same = None
        at = [aligned(own_names, piece, f"consistency pass {t}") for t, piece in enumerate(sides)]
        pieces = [piece for piece in sides if piece is not None]  # ``aligned`` refused a missing one
        total = pieces[0].column("total").to_numpy()[at[0]] if pieces else np.zeros(0, dtype=np.int64)
        for t, piece in enumerate(pieces):
            sums, counts = matrix(piece.column("sum"))[at[t]], piece.column("count").to_numpy()[at[t]]
            own = loo_scores(xj, codes, sums, counts, metric, inlier)
            own[total[codes] < base["min_samples"]] = np.nan
            if t >= len(thresholds):
                return inlier, own, None
            has = ~np.isnan(own)
            same = np.ones(len(xj), dtype=bool)
            same[has] = metric.same(own[has], thresholds[t])
            if t + 1 < len(pieces):
                after = pieces[t + 1]
                enough = after.column("prev_enough").to_numpy(zero_copy_only=False)[at[t + 1]]
                inlier = same | ~enough[codes]
        return inlier, own, same

    def _identity_records(self, table: pa.Table, index: int, sides: list[pa.Table | None], base: dict[str, Any],
                          thresholds: list[float], t: int) -> dict[Any, pa.Table]:
        """One record per identity of this shard, keyed by the identity's partition: the sum and count of
        its rows, and (after pass 1) of the rows the last pass found the same identity."""
        xj, _, labels = shard_labelled(table, base["metric"])
        if not labels.size:
            return {}
        own_names, codes = np.unique(labels, return_inverse=True)
        codes, m = codes.ravel(), own_names.size
        cols: dict[str, Any] = {"identity": own_names, "shard": np.full(m, index, dtype=np.int64),
                                "sum": vectors(group_sums(codes, xj, m)), "count": np.bincount(codes, minlength=m)}
        if t:
            _, _, same = self._replay(xj, labels, sides, base, thresholds)
            assert same is not None
            cols["same_sum"] = vectors(group_sums(codes[same], xj[same], m))
            cols["same_count"] = np.bincount(codes[same], minlength=m)
        return dict(split_by(key_partition(own_names, base["parts"]), cols))

    def _score_sample(self, table: pa.Table, index: int, sides: list[pa.Table | None], base: dict[str, Any],
                      thresholds: list[float], scale: dict[str, int], cent_table: tuple[np.ndarray, np.ndarray],
                      t: int) -> tuple[np.ndarray, np.ndarray]:
        """Genuine scores and impostor comparisons of this shard; every one while the run has at most
        ``fit_max_impostors`` of each, else this shard's share of a seeded sample."""
        p, metric = self.params, base["metric"]
        xj, _, labels = shard_labelled(table, metric)
        if not labels.size:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)
        _, own, _ = self._replay(xj, labels, sides, base, thresholds)
        assert own is not None
        identities, cents = cent_table
        codes = codes_in(labels, identities)
        n_all, k, n = scale["n_rows"], scale["k"], len(xj)
        limit = p.fit_max_impostors
        seed = int(np.random.SeedSequence([self.context.seed, index, t]).generate_state(1)[0])
        if n_all * (k - 1) <= limit:
            imp = impostor_scores(xj, codes, cents, metric, n * (k - 1), seed)
        else:
            imp = impostor_scores(xj, codes, cents, metric, max(1, round(limit * n / n_all)), seed)
        genuine = own[~np.isnan(own)]
        if n_all > limit and genuine.size:
            pick = np.random.default_rng(seed).choice(genuine.size, min(genuine.size, max(1, round(limit * n / n_all))),
                                                      replace=False)
            genuine = genuine[np.sort(pick)]
        return genuine, imp

    def _decide(self, table: pa.Table, sides: list[pa.Table | None], base: dict[str, Any], final: dict[str, Any],
                index: dict[str, Any] | None) -> dict[str, Any]:
        p, metric = self.params, base["metric"]
        xj, rows, labels = shard_labelled(table, metric)
        thresholds = final["thresholds"]
        own = np.empty(0, dtype=np.float32)
        same = np.empty(0, dtype=bool)
        if labels.size:
            _, replayed, last = self._replay(xj, labels, sides, base, thresholds)
            assert replayed is not None and last is not None
            own, same = replayed, last
        threshold, stranger = thresholds[-1], final["stranger"]
        other_score = np.full(rows.size, np.nan, dtype=np.float32)
        best = np.full(rows.size, -1, dtype=np.int64)
        other_ids: list[str | None] = [None] * rows.size
        if index is not None and rows.size:
            codes = codes_in(labels, index["names"])
            scores, ids = index["index"].search(np.ascontiguousarray(xj), 2)
            scores = scores if metric.higher_is_same else np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)
            pick = np.where(ids[:, 0] == codes, 1, 0)
            best = ids[np.arange(rows.size), pick]
            other_score = scores[np.arange(rows.size), pick]
            other_ids = names_at(index["names"], best).to_pylist()
        has = ~np.isnan(own)
        far = has & ~same
        nearer = metric.closer(np.nan_to_num(other_score, nan=metric.worst()), own)
        as_far = np.zeros(rows.size, dtype=bool)
        if stranger is not None:
            as_far[has] = ~metric.same(own[has], stranger)
        if p.mode == "label_noise":
            drop = far & nearer
        elif p.keep_nearest and stranger is not None:
            drop = far & (nearer | as_far)
        else:
            drop = far
        return {"rows": rows, "own": own, "other": other_score, "nearer": nearer, "drop": drop,
                "has": has, "threshold": threshold, "other_ids": other_ids}

    def _commit(self, table: pa.Table, index: int, sides: list[pa.Table | None], base: dict[str, Any],
                final: dict[str, Any], centroid_index: dict[str, Any] | None) -> Batch:
        d = self._decide(table, sides, base, final, centroid_index)
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        metric = base["metric"]
        for r, i in enumerate(d["rows"].tolist()):
            own, other, other_id = float(d["own"][r]), float(d["other"][r]), d["other_ids"][r]
            out.set(i, centroid_score=None if np.isnan(own) else own, nearest_other_identity=other_id,
                    nearest_other_score=None if np.isnan(other) else other, threshold=d["threshold"],
                    threshold_source=final["source"], stranger_score=final["stranger"], score_metric=metric.value)
            if d["drop"][r]:
                out.drop(i, INCONSISTENT, self._detail(own, d["threshold"], other_id, other, bool(d["nearer"][r])))
        return out.batch()

    @staticmethod
    def _next_inliers(same: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
        """Rows the next pass builds centroids from; an identity left with < 2 inliers keeps all rows."""
        enough = np.bincount(codes[same], minlength=k) >= 2
        return same | ~enough[codes]

    def _threshold(
        self, space: str, metric: Metric, own: np.ndarray, impostor: np.ndarray
    ) -> tuple[float, str, FittedThreshold | None]:
        p = self.params
        if p.threshold is not None:
            return float(p.threshold), "param", None
        if p.fit_far is not None and impostor.size:
            fitted = fit_at_far(own[~np.isnan(own)], impostor, metric, p.fit_far)
            return fitted.threshold, f"fit_far={p.fit_far:g}", fitted
        return defaults_for(space).same_identity, f"default:{space}", None

    @staticmethod
    def _detail(own: float, threshold: float, other_id: str | None, other: float, nearer: bool) -> str:
        text = f"centroid score {own:.3f}, threshold {threshold:.3f}"
        if nearer and other_id is not None:
            return f"{text}; nearer {other_id} ({other:.3f})"
        return text


INCONSISTENT = "inconsistent_identity"  # the rule: beyond the threshold (and nearer another / a stranger)


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, metric: Metric, block: int = 8192) -> np.ndarray:
    """Float32 centroids, computed in blocks of rows: the whole table's float64 temporaries were two more
    copies of the identity table on the driver (every step is per row, so blocks change no bit)."""
    out = np.empty(sums.shape, dtype=np.float32)
    for s in range(0, len(sums), block):
        means = sums[s : s + block] / np.maximum(counts[s : s + block], 1)[:, None]
        out[s : s + block] = normalise_rows(means) if metric.higher_is_same else means
    return out


def _identity_totals(table: pa.Table | None, part: int, t: int, metric: Metric,
                     min_samples: int) -> tuple[dict[Any, pa.Table], tuple[int, int, int]]:
    """One identity partition of pass ``t``: each identity's records added in shard order; its pass-t sums
    and counts (its rows, or from pass 1 on the rows the last pass kept when at least 2, else all rows)
    sent back to every shard that holds it, and its centroid to the gathered centroid table. Returns
    (identities, labelled rows, rows of identities with ``min_samples``)."""
    if table is None or table.num_rows == 0:
        return {}, (0, 0, 0)
    table, starts, inv = runs(table)
    ids = names(table.column("identity"))[starts]
    sums = np.add.reduceat(matrix(table.column("sum")), starts, axis=0)
    total = np.add.reduceat(table.column("count").to_numpy(), starts)
    counts = total
    extra: dict[str, Any] = {}
    if t:
        same = np.add.reduceat(matrix(table.column("same_sum")), starts, axis=0)
        same_counts = np.add.reduceat(table.column("same_count").to_numpy(), starts)
        enough = same_counts >= 2
        sums = np.where(enough[:, None], same, sums)
        counts = np.where(enough, same_counts, total)
        extra["prev_enough"] = enough[inv]
    pieces: dict[Any, pa.Table] = dict(split_by(table.column("shard").to_numpy(), {
        "identity": ids[inv], "total": total[inv], "sum": vectors(sums[inv]), "count": counts[inv], **extra}))
    cents = centroids_from_sums(sums, counts, metric)
    pieces[(f"cent{t}", 0)] = pa.table({"identity": ids, "centroid": vectors(cents)})
    return pieces, (ids.size, int(total.sum()), int(total[total >= min_samples].sum()))


def _load_index(value: dict[str, Any]) -> dict[str, Any]:
    return {"names": value["names"], "index": deserialize_index(value["index"])}


def _centroid_index(cents_table: pa.Table | None, metric: Metric, exact_max: int,
                    seed: int) -> tuple[None, dict[str, Any]]:
    """The nearest-other-identity index over the final centroids, built once in a task; it stays in the
    object store for the commit tasks."""
    identities, cents = centroid_table(cents_table)
    return None, {"names": identities, "index": serialize_index(build_index(cents, metric, exact_max=exact_max,
                                                                           seed=seed))}


def _commit_unjudged(table: pa.Table, index: int, columns: list[str]) -> Batch:
    return Rows(table.column(SAMPLE_ID).to_pylist(), columns).batch()
