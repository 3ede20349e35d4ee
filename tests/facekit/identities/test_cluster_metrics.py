"""Clustering scores against values worked out by hand, and their partitioned form against the whole."""

from __future__ import annotations

import numpy as np
import pytest

from facekit.identities.cluster_metrics import KeyTerms, cluster_scores, key_terms, scores


def test_every_score_of_a_small_assignment_matches_the_hand_computed_value() -> None:
    # group A holds x, x, y; group B holds y. Worked out sample by sample:
    # BCubed precision (2/3 + 2/3 + 1/3 + 1) / 4, recall (1 + 1 + 1/2 + 1/2) / 4;
    # pairs: 3 in groups, 2 in labels, 1 in both.
    got = cluster_scores(["A", "A", "A", "B"], ["x", "x", "y", "y"])
    assert got["purity"] == pytest.approx(3 / 4)
    assert got["inverse_purity"] == pytest.approx(3 / 4)
    assert got["pairwise_precision"] == pytest.approx(1 / 3)
    assert got["pairwise_recall"] == pytest.approx(1 / 2)
    assert got["pairwise_f"] == pytest.approx(0.4)
    assert got["bcubed_precision"] == pytest.approx(2 / 3)
    assert got["bcubed_recall"] == pytest.approx(3 / 4)
    assert got["bcubed_f"] == pytest.approx(12 / 17)
    assert got["gt_identities"] == 2


def test_singletons_are_precise_and_one_group_is_complete() -> None:
    labels = ["x", "x", "y", "z"]
    alone = cluster_scores(["a", "b", "c", "d"], labels)
    assert alone["bcubed_precision"] == alone["pairwise_precision"] == alone["purity"] == 1.0
    assert alone["bcubed_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1 + 1) / 4)
    assert alone["pairwise_recall"] == 0.0
    one = cluster_scores(["g"] * 4, labels)
    assert one["bcubed_recall"] == one["pairwise_recall"] == one["inverse_purity"] == 1.0
    assert one["bcubed_precision"] == pytest.approx((4 + 1 + 1) / 4 / 4)


def test_terms_summed_over_partitions_of_whole_keys_give_the_one_process_scores() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 500).astype(str)
    labels = rng.integers(0, 25, 500).astype(str)
    cells, counts = np.unique(np.stack([groups, labels], axis=1), axis=0, return_counts=True)
    sides = []
    for side in (0, 1):
        part = np.array([hash(k) % 3 for k in cells[:, side]])
        total = KeyTerms()
        for p in range(3):
            total = total + key_terms(cells[part == p, side], counts[part == p])
        sides.append(total)
    assert scores(*sides) == pytest.approx(cluster_scores(groups, labels))
