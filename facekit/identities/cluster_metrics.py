"""Clustering scores the face-clustering literature reports, from (group, label, count) triples.

Every score here is a sum over the cells of the group x label contingency table, divided by a total:

- purity: sum over groups of the group's largest cell / N; inverse purity: the same over labels.
- pairwise precision / recall (pairs of samples; Otto, Wang and Jain, TPAMI 2018): same-group same-label
  pairs / same-group pairs, and / same-label pairs. A cell of c samples holds c(c-1)/2 such pairs.
- BCubed precision / recall (Amigó et al., 2009): the mean over samples of the share of the sample's
  group that carries its label (its label's share held by its group): sum of c^2 / |group| over cells,
  divided by N.

So a partitioned computation needs two group-bys of the triples (keyed by group, keyed by label): each
partition sums its keys' terms (``GroupTerms``) and the partitions' sums add up (``scores``). Nothing of
the size of the corpus is ever in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class KeyTerms:
    """The sums one side (groups or labels) contributes, over the keys of one partition."""

    majority: int = 0  # sum over keys of the largest cell
    total: int = 0  # samples
    keys: int = 0  # distinct keys
    pairs_same_both: int = 0  # sum over cells of c(c-1)/2 (the same from either side)
    pairs_same_key: int = 0  # sum over keys of n(n-1)/2
    bcubed: float = 0.0  # sum over cells of c^2 / (size of the cell's key)

    def __add__(self, other: KeyTerms) -> KeyTerms:
        return KeyTerms(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def key_terms(keys: np.ndarray, counts: np.ndarray) -> KeyTerms:
    """The terms of the cells (one per row: its key on this side and its count) of whole keys: every
    cell of a key must be in the same call."""
    if counts.size == 0:
        return KeyTerms()
    c = counts.astype(np.int64)
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.ravel()
    size = np.bincount(inverse, weights=c).astype(np.int64)
    best = np.zeros(size.size, dtype=np.int64)
    np.maximum.at(best, inverse, c)
    return KeyTerms(
        majority=int(best.sum()),
        total=int(c.sum()),
        keys=int(size.size),
        pairs_same_both=int((c * (c - 1) // 2).sum()),
        pairs_same_key=int((size * (size - 1) // 2).sum()),
        bcubed=float((c.astype(np.float64) ** 2 / size[inverse]).sum()),
    )


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def scores(by_group: KeyTerms, by_label: KeyTerms) -> dict[str, float | int]:
    """Every score from the summed terms of the group side and the label side. A precision with no pair
    to judge (every group a singleton) is 1: no pair was put together wrongly."""
    n = max(1, by_group.total)
    pp = by_group.pairs_same_both / by_group.pairs_same_key if by_group.pairs_same_key else 1.0
    pr = by_label.pairs_same_both / by_label.pairs_same_key if by_label.pairs_same_key else 1.0
    bp, br = by_group.bcubed / n, by_label.bcubed / n
    return {
        "purity": by_group.majority / n,
        "inverse_purity": by_label.majority / n,
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "pairwise_f": _f(pp, pr),
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "bcubed_f": _f(bp, br),
        "gt_identities": by_label.keys,
    }


def cluster_scores(groups: np.ndarray | list[object], labels: np.ndarray | list[object]) -> dict[str, float | int]:
    """Every score of one in-memory assignment (tests, benches on a subset): the same sums, one partition."""
    g = np.asarray(groups).astype(str)
    lab = np.asarray(labels).astype(str)
    cells, counts = np.unique(np.stack([g, lab], axis=1), axis=0, return_counts=True) if g.size else (
        np.empty((0, 2), dtype=str), np.empty(0, dtype=np.int64))
    return scores(key_terms(cells[:, 0], counts), key_terms(cells[:, 1], counts))
