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
from facekit.vector_index import build_index, deserialize_index, group_sums, serialize_index
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
from stages.corpus.kernels import (
    EMBEDDING_COLUMNS,
    centroids_from_sums,
    impostor_scores,
    loo_scores,
    median_scores,
    nearest_other,
    next_inliers,
)


class ConsistencyParams(IdentityParams):
    mode: Literal["generated", "label_noise"] = Field(
        "generated", description=
        "generated: distance to the identity's centroid decides; label_noise: ingested labels, where an image is "
        "dropped when it is nearer another identity")
    keep_nearest: bool = Field(
        True, description="generated: keep an image beyond the threshold that is still nearest its own identity")
    centroid: Literal["leave_one_out", "median"] = Field(
        "leave_one_out", description=
        "leave_one_out: each image scored against its identity's centroid without itself; median: against the "
        "per-coordinate median of its identity's other images (every image of an identity moves to one task)")
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


class ConsistencyStage(IdentityStage):
    """Drops images that are not the identity they carry; scores and the threshold used are stored."""

    name: ClassVar[str] = "consistency"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = ConsistencyParams
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

    def run_corpus(self, corpus: Corpus) -> None:
        """Per-identity sums and counts as identity-partitioned map + reduce, one round per pass, each shard
        getting back the tables of its own identities; scoring, the threshold's bounded sample of genuine /
        impostor comparisons and the decisions per shard, in parallel. The driver sees counts and
        thresholds only: no table that grows with the identities. ``centroid: median`` also moves every
        labelled image to its identity's partition, whose task scores each image against the median of
        its identity's other images, one round per pass."""
        p = self.params
        found = self.identity_space(corpus, p.partitions, 2, {"judged": 0})
        if found is None:
            return
        space, metric = found.space, found.metric
        base = {"metric": metric, "min_samples": p.min_samples, "parts": found.parts, "median": p.centroid == "median"}
        if base["median"]:
            corpus.shuffle("images", _image_records, EMBEDDING_COLUMNS, base)
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
            if base["median"]:
                corpus.reshuffle(f"median{t}", "images", _median_pass, t, thresholds, base)
                sides.append(f"median{t}")
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
            "unjudged": int(found.rows - judged), "dropped": dropped,
        }

    def _replay(self, xj: np.ndarray, labels: np.ndarray, sides: list[pa.Table | None], base: dict[str, Any],
                thresholds: list[float]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """This shard's inliers before the last state, and the last state's scores and same-identity mask
        (None when it has no threshold yet): every pass is recomputed from the shard's pieces of the
        per-identity tables (pass t's sums and counts, and whether pass t-1 left an identity enough
        inliers; under ``centroid: median`` followed by the scores its identity partitions computed)."""
        metric = base["metric"]
        own_names, codes = np.unique(labels, return_inverse=True)
        codes = codes.ravel()
        step = 2 if base["median"] else 1
        passes = [sides[t : t + step] for t in range(0, len(sides), step)]
        at = [aligned(own_names, piece, f"consistency pass {t}") for t, (piece, *_) in enumerate(passes)]
        tables = [piece for piece, *_ in passes if piece is not None]  # ``aligned`` refused a missing one
        total = tables[0].column("total").to_numpy()[at[0]]
        inlier = np.ones(len(xj), dtype=bool)
        own = same = None
        for t, piece in enumerate(tables):
            if base["median"]:
                own = _scores_back(passes[t][1], len(xj))
            else:
                sums, counts = matrix(piece.column("sum"))[at[t]], piece.column("count").to_numpy()[at[t]]
                own = loo_scores(xj, codes, sums, counts, metric, inlier)
            own[total[codes] < base["min_samples"]] = np.nan
            if t >= len(thresholds):
                return inlier, own, None
            has = ~np.isnan(own)
            same = np.ones(len(xj), dtype=bool)
            same[has] = metric.same(own[has], thresholds[t])
            if t + 1 < len(tables):
                enough = tables[t + 1].column("prev_enough").to_numpy(zero_copy_only=False)[at[t + 1]]
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
            best, other_score = nearest_other(scores, ids, codes)
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


def _image_records(table: pa.Table, index: int, base: dict[str, Any]) -> dict[Any, pa.Table]:
    """``centroid: median``: every labelled image of this shard (its vector and its place among the
    shard's labelled rows), keyed by its identity's partition."""
    xj, _, labels = shard_labelled(table, base["metric"])
    if not labels.size:
        return {}
    return dict(split_by(key_partition(labels, base["parts"]), {
        "identity": labels, "shard": np.full(labels.size, index, dtype=np.int64),
        "pos": np.arange(labels.size, dtype=np.int64), "vector": vectors(xj)}))


def _median_pass(table: pa.Table | None, part: int, t: int, thresholds: list[float],
                 base: dict[str, Any]) -> tuple[dict[Any, pa.Table], None]:
    """One identity partition under ``centroid: median``: passes 0..t replayed on every image of its
    identities (pass s keeps as inliers what pass s-1 found the same identity at ``thresholds[s-1]``);
    pass t's score of each image goes back to its shard."""
    if table is None or table.num_rows == 0:
        return {}, None
    metric = base["metric"]
    own_names, codes = np.unique(names(table.column("identity")), return_inverse=True)
    codes, k = codes.ravel(), own_names.size
    x = matrix(table.column("vector"), np.float32)
    few = np.bincount(codes, minlength=k)[codes] < base["min_samples"]
    inlier = np.ones(len(x), dtype=bool)
    for s in range(t + 1):
        own = median_scores(x, codes, k, metric, inlier)
        own[few] = np.nan
        if s < t:
            has = ~np.isnan(own)
            same = np.ones(len(x), dtype=bool)
            same[has] = metric.same(own[has], thresholds[s])
            inlier = next_inliers(same, codes, k)
    return dict(split_by(table.column("shard").to_numpy(), {"pos": table.column("pos"), "own": own})), None


def _scores_back(piece: pa.Table | None, n: int) -> np.ndarray:
    """The scores a shard's identity partitions sent back, in the order of its labelled rows."""
    pos = np.empty(0, dtype=np.int64) if piece is None else piece.column("pos").to_numpy()
    if pos.size != n or np.unique(pos).size != n:
        raise RuntimeError(f"consistency: {pos.size} median scores came back for this shard's {n} labelled images")
    own = np.empty(n, dtype=np.float32)
    own[pos] = piece.column("own").to_numpy()  # type: ignore[union-attr]
    return own
