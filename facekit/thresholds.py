"""Identity thresholds per embedding space, and fitting them from a run's own labelled comparisons.

A threshold only means something inside one embedding space: dlib's ResNet gives euclidean
distances (lower = same person), ArcFace gives cosine similarities of L2-normalised vectors
(higher = same person). Every comparison in the global stages goes through ``Metric`` so the
direction of a test is never re-derived by hand.

Defaults are for photos and are documented with their source in ``DEFAULTS``. Rendered or
generated faces compress distances (measured with dlib: photos intra 0.41 / inter 0.76;
crude renders intra 0.16 / inter 0.39), so a run whose identities are labels by construction should
rather fit its threshold at a target false-accept rate from its own genuine / impostor comparisons
and record it.

Fitting, one way for every stage: draw pairs known to be different people (``distinct_label_pairs``:
labels by construction of a synthetic run, an ingested run's identity labels, a labelled gallery), score
them in the space, and call ``fit_from_impostors`` at the declared rate, with the space's published
point as ``floor`` where a stage must never be looser than it (``fit_at_far`` is the bare quantile).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import numpy as np


class Metric(enum.StrEnum):
    """How two embeddings are compared in a space."""

    EUCLIDEAN = "euclidean"  # distance, lower = same identity
    COSINE = "cosine"  # similarity of unit vectors, higher = same identity

    @property
    def higher_is_same(self) -> bool:
        return self is Metric.COSINE

    def same(self, score: np.ndarray | float, threshold: float) -> np.ndarray:
        """True where ``score`` says "same" at ``threshold`` (inclusive)."""
        s = np.asarray(score, dtype=np.float64)
        return s >= threshold if self.higher_is_same else s <= threshold

    def closer(self, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """True where score ``a`` is strictly closer (more alike) than ``b``."""
        a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return a_ > b_ if self.higher_is_same else a_ < b_

    def worst(self) -> float:
        """A score farther than any real one (used as a fill value)."""
        return -math.inf if self.higher_is_same else math.inf

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise score between two (n, d) arrays."""
        a_, b_ = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if self.higher_is_same:
            return np.einsum("ij,ij->i", a_, b_)
        return np.linalg.norm(a_ - b_, axis=1)


@dataclass(frozen=True)
class SpaceThresholds:
    """Defaults of one embedding space. Each value is in the space's own metric."""

    metric: Metric
    same_identity: float  # consistency: a sample vs its identity centroid
    collision: float  # separation: identity centroid vs identity centroid
    near_duplicate: float  # dedup: sample vs sample, "the same picture"
    grouping: float  # grouping: linkage threshold between two samples
    source: str
    verification: float | None = None  # leakage: one image vs one image, "the same person" (pair verification)


DLIB_SOURCE = (
    "Photos: dlib's dnn_face_recognition_ex and face_recognition call pairs closer than 0.6 the same person "
    "(99.38% on LFW). A sample-to-centroid distance drops the centroid's own noise (about 1/sqrt(2) of a "
    "pair distance for the same person): same_identity = 0.5. Centroids of one person sit near 0 and of "
    "distinct photo persons at sqrt(0.76^2 - 0.41^2) ~ 0.64 (photo pairs: intra 0.41, inter 0.76): collision = 0.35. "
    "grouping = 0.5 follows dlib's face_clustering.py (chinese whispers at 0.5). Procedural renders "
    "(measured, 20-24 identities x 8): pairs of one identity 0.10-0.52, of two 0.28-0.78; centroids of "
    "distinct identities from 0.29, of a re-generated identity 0.06-0.07; so on renders fit instead "
    "(consistency fit_far, separation fit_quantile) and group at ~0.3. near_duplicate = 0.06: re-encodes "
    "and downscales of one render at 0.02-0.35 (median 0.06), distinct renders of one identity from "
    "0.098; the embedding catches the closest copies, pHash the rest."
)
ARCFACE_SOURCE = (
    "insightface ArcFace (cosine of L2-normalised 512-d vectors): verification thresholds at FAR 1e-4 on "
    "IJB-C are about 0.3-0.4, and Vec2Face samples identities below 0.3-0.4 similarity to each other. "
    "Centroids average out per-image noise: same_identity = 0.35 for a sample vs its "
    "centroid, collision = 0.5 between two centroids. Re-encodes of one image stay above 0.95 "
    "(near_duplicate); grouping links pairs above 0.5. Heuristic, not measured here: fit from data."
)

SFACE_SOURCE = (
    "OpenCV Zoo SFace (cosine of L2-normalised 128-d vectors): OpenCV's FaceRecognizerSF calls a pair the same "
    "person at cosine >= 0.363 (its published LFW operating point): verification = 0.363 (leakage). grouping = "
    "0.6 (cosine distance 0.4, average linkage): on photos of distinct persons with look-alikes, purity 0.991 / "
    "inverse purity 0.93. Procedural renders (measured, 24 identities x 6, YuNet crops): pairs of one "
    "identity mean 0.86 (q99 0.96, max 0.966), of two 0.46, threshold at FAR 1e-3 0.77; average linkage at 0.7: "
    "purity 1.0 / inverse 0.986 (dlib at its FAR-1e-3 fit 0.34: 1.0 / 0.938); so on renders fit (consistency "
    "fit_far) and group at ~0.7. near_duplicate = 0.97: JPEG-40/70 re-encodes and 0.5x/0.75x downscales of one "
    "render at 0.93-0.99 (median 0.974), distinct renders of one identity up to 0.966; pHash catches the rest. "
    "same_identity 0.45 (sample vs centroid) and collision 0.55 (centroid vs centroid) are heuristic: fit them."
)

DEFAULTS: dict[str, SpaceThresholds] = {
    "dlib-resnet-128": SpaceThresholds(Metric.EUCLIDEAN, 0.5, 0.35, 0.06, 0.5, DLIB_SOURCE, verification=0.6),
    "arcface": SpaceThresholds(Metric.COSINE, 0.35, 0.5, 0.95, 0.5, ARCFACE_SOURCE, verification=0.35),
    "sface-128": SpaceThresholds(Metric.COSINE, 0.45, 0.55, 0.97, 0.6, SFACE_SOURCE, verification=0.363),
}


def defaults_for(space: str) -> SpaceThresholds:
    """Defaults of ``space``; ArcFace variants (``arcface-r100-512``...) share the ``arcface`` entry."""
    if space in DEFAULTS:
        return DEFAULTS[space]
    for prefix, value in DEFAULTS.items():
        if space.startswith(prefix):
            return value
    known = ", ".join(sorted(DEFAULTS))
    raise KeyError(f"no default thresholds for embedding space {space!r} (known: {known}); set a threshold")


@dataclass(frozen=True)
class FittedThreshold:
    """A threshold fitted at a target false-accept rate, with what it achieves on the data it came from."""

    threshold: float
    target_far: float
    far: float  # impostor comparisons accepted at the threshold
    frr: float  # genuine comparisons rejected at the threshold
    n_genuine: int
    n_impostor: int
    floor: float | None = None  # the value the fit may not be looser than (None: no floor)
    unfloored: float | None = None  # the impostor quantile itself, where the floor replaced it

    def as_dict(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {
            "threshold": self.threshold,
            "target_far": self.target_far,
            "far": self.far,
            "frr": self.frr,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
        }
        if self.floor is not None:
            out |= {"floor": self.floor, "unfloored": self.unfloored}
        return out


def fit_at_far(genuine: np.ndarray, impostor: np.ndarray, metric: Metric, far: float) -> FittedThreshold:
    """The loosest threshold that accepts at most ``far`` of the impostor comparisons.

    For distances: the largest t with #(impostor <= t) <= far * n; for similarities the mirror image.
    With too few impostors to resolve ``far`` (n * far < 1) it falls back to the strictest impostor,
    i.e. a threshold that accepts none of them.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    imp = np.sort(np.asarray(impostor, dtype=np.float64))
    gen = np.asarray(genuine, dtype=np.float64)
    if imp.size == 0:
        raise ValueError("cannot fit a threshold without impostor comparisons")
    allowed = math.floor(far * imp.size)  # impostors that may be accepted
    if metric.higher_is_same:
        # accept s >= t; the (allowed)-th largest impostor must stay below t
        ranked = imp[::-1]
        t = float(np.nextafter(ranked[allowed], math.inf)) if allowed < imp.size else float(ranked[-1])
    else:
        t = float(np.nextafter(imp[allowed], -math.inf)) if allowed < imp.size else float(imp[-1])
    return _measured(t, far, gen, imp, metric)


def _measured(t: float, far: float, gen: np.ndarray, imp: np.ndarray, metric: Metric) -> FittedThreshold:
    accepted_imp = float(np.mean(metric.same(imp, t)))
    rejected_gen = float(np.mean(~metric.same(gen, t))) if gen.size else float("nan")
    return FittedThreshold(t, far, accepted_imp, rejected_gen, int(gen.size), int(imp.size))


def fit_from_impostors(impostor: np.ndarray, metric: Metric, far: float, *, genuine: np.ndarray | None = None,
                       floor: float | None = None) -> FittedThreshold:
    """The threshold at which ``far`` of the impostor comparisons (pairs known to be different people)
    would be called the same, never looser than ``floor``.

    The floor is a space's published same-person point (``SpaceThresholds.verification``): where distinct
    people sit closer than in the photos it was measured on (renders: distinct SFace identities at cosine
    0.4-0.8 against the LFW point 0.363), the fit is stricter and replaces it; where they sit farther
    apart, the published point stays, so a fit never calls a pair the same that the embedder's own
    operating point calls different. Stricter means higher for a similarity, lower for a distance.
    ``genuine`` (same-person comparisons, optional) only measures the miss rate at the result.
    """
    gen = np.asarray(genuine if genuine is not None else np.empty(0), dtype=np.float64)
    fitted = fit_at_far(gen, impostor, metric, far)
    if floor is None:
        return fitted
    if bool(metric.closer(fitted.threshold, floor)) or fitted.threshold == floor:
        return replace(fitted, floor=float(floor), unfloored=fitted.threshold)
    floored = _measured(float(floor), far, gen, np.asarray(impostor, dtype=np.float64), metric)
    return replace(floored, floor=float(floor), unfloored=fitted.threshold)


def distinct_label_pairs(labels_a: np.ndarray, labels_b: np.ndarray | None = None, max_pairs: int = 200_000,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` whose labels differ: rows of ``labels_a`` against rows of ``labels_b``, or,
    with ``labels_b`` None, unordered pairs within ``labels_a`` (each once, ``i < j``).

    Every such pair when there are at most ``max_pairs``, else ``max_pairs`` of them drawn at random
    (with replacement), deterministic for a given seed: a fitted threshold is reproducible from its
    inputs, and its cost is bounded whatever the size of the run.
    """
    a = np.asarray(labels_a)
    b = a if labels_b is None else np.asarray(labels_b)
    same_set = labels_b is None
    na, nb = a.size, b.size
    total = na * (na - 1) // 2 if same_set else na * nb
    empty = np.empty(0, dtype=np.int64)
    if total == 0:
        return empty, empty
    if total <= 4 * max_pairs:  # enumerate, then subsample
        if same_set:
            i, j = np.triu_indices(na, k=1)
        else:
            i, j = (m.ravel() for m in np.meshgrid(np.arange(na), np.arange(nb), indexing="ij"))
        keep = a[i] != b[j]
        i, j = i[keep].astype(np.int64), j[keep].astype(np.int64)
        if i.size > max_pairs:
            pick = np.sort(np.random.default_rng(seed).choice(i.size, max_pairs, replace=False))
            i, j = i[pick], j[pick]
        return i, j
    rng = np.random.default_rng(seed)
    got_i: list[np.ndarray] = []
    got_j: list[np.ndarray] = []
    have = 0
    for _ in range(8):  # rejection rounds; labels that are nearly all one value give fewer pairs
        i = rng.integers(0, na, 2 * max_pairs)
        j = rng.integers(0, nb, 2 * max_pairs)
        keep = a[i] != b[j]
        got_i.append(i[keep])
        got_j.append(j[keep])
        have += int(keep.sum())
        if have >= max_pairs:
            break
    return np.concatenate(got_i)[:max_pairs], np.concatenate(got_j)[:max_pairs]


def pair_scores_from_labels(
    vectors: np.ndarray,
    labels: np.ndarray,
    metric: Metric,
    max_pairs: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor sample-pair scores from labelled vectors, sampled to at most ``max_pairs`` each.

    Deterministic for a given seed, so a fitted threshold is reproducible from the manifest's inputs.
    """
    x = np.asarray(vectors, dtype=np.float32)
    lab = np.asarray(labels)
    n = len(x)
    if n < 2:
        return np.empty(0), np.empty(0)
    rng = np.random.default_rng(seed)
    order = np.argsort(lab, kind="stable")
    _, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
    gi, gj = [], []
    for s, c in zip(starts, counts, strict=True):
        if c > 1:
            idx = order[s : s + c]
            a, b = np.triu_indices(c, k=1)
            gi.append(idx[a])
            gj.append(idx[b])
    g_i = np.concatenate(gi) if gi else np.empty(0, dtype=np.int64)
    g_j = np.concatenate(gj) if gj else np.empty(0, dtype=np.int64)
    if g_i.size > max_pairs:
        pick = rng.choice(g_i.size, max_pairs, replace=False)
        g_i, g_j = g_i[pick], g_j[pick]
    i_i, i_j = distinct_label_pairs(lab, None, max_pairs, seed)
    return metric.score(x[g_i], x[g_j]), metric.score(x[i_i], x[i_j])
