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
from facekit.vector_index import EXACT_MAX, knn, labelled_embeddings, normalise_rows
from stages.base import IDENTITY_ID, SAMPLE_ID, Batch, GlobalStage, Params, Resources, rows_ok

LOO_MEDIAN_MAX = 64  # above this many images one image barely moves a median; use the plain median


class ConsistencyParams(Params):
    mode: Literal["generated", "label_noise"] = "generated"
    keep_nearest: bool = True  # generated: keep an image beyond the threshold still nearest its identity
    centroid: Literal["leave_one_out", "median"] = "leave_one_out"
    threshold: float | None = None  # in the space's metric; None: fitted (fit_far) or the space default
    fit_far: float | None = Field(None, gt=0.0, lt=1.0)  # e.g. 1e-3
    fit_max_impostors: int = Field(1_000_000, ge=1000)
    # Pass 2 rebuilds every centroid from the images pass 1 kept, so a planted image no longer pulls its
    # identity's reference towards itself; 1 = a single leave-one-out pass.
    passes: int = Field(2, ge=1, le=5)
    min_samples: int = Field(3, ge=2)  # fewer images than this: no reliable centroid, kept unjudged
    exact_max: int = Field(EXACT_MAX, ge=0)


def centroids(x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, inlier: np.ndarray) -> np.ndarray:
    """Mean vector of each label's inlier rows (renormalised for cosine spaces)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, codes[inlier], x[inlier])
    means = sums / np.maximum(np.bincount(codes[inlier], minlength=k), 1)[:, None]
    return (normalise_rows(means) if metric.higher_is_same else means).astype(np.float32)


def own_centroid_scores(
    x: np.ndarray, codes: np.ndarray, k: int, metric: Metric, method: str, inlier: np.ndarray
) -> np.ndarray:
    """Score of each row against its identity's centroid of inliers, never including the row itself."""
    scores = np.full(len(x), np.nan, dtype=np.float32)
    if method == "leave_one_out":
        sums = np.zeros((k, x.shape[1]), dtype=np.float64)
        np.add.at(sums, codes[inlier], x[inlier])
        m = np.bincount(codes[inlier], minlength=k)[codes] - inlier  # inliers other than the row
        ok = m > 0
        ref = (sums[codes[ok]] - x[ok] * inlier[ok, None]) / m[ok, None]
        if metric.higher_is_same:
            ref = normalise_rows(ref)
        scores[ok] = metric.score(x[ok], ref.astype(np.float32))
        return scores
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
    needs: ClassVar[tuple[str, ...]] = ("embedding", "embedding_space", "embedding_metric")
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
                out["reason"][i] = self._reason(
                    own[r], threshold, other_id[r], other_score[r], nearer_other[r]
                )
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
    def _reason(own: float, threshold: float, other_id: str | None, other: float, nearer: bool) -> str:
        text = f"far from identity centroid ({own:.3f}, threshold {threshold:.3f})"
        if nearer and other_id is not None:
            return f"{text}, nearer {other_id} ({other:.3f})"
        return text
