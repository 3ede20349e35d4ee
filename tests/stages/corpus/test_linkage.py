"""Average linkage from cluster sums and RAC rounds, against scikit-learn and scipy on every pair."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.cluster import AgglomerativeClustering

from facekit.thresholds import Metric
from stages.corpus.linkage import knn_pairs, rac, singletons


def _canonical(labels: np.ndarray) -> list[int]:
    """Cluster labels renamed by first appearance, so two clusterings compare as partitions."""
    first: dict[int, int] = {}
    return [first.setdefault(int(v), len(first)) for v in labels]


def _blobs(seed: int, n: int = 240, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, d))
    return centres[rng.integers(0, 16, n)] + 0.7 * rng.standard_normal((n, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rac_over_every_pair_gives_sklearns_cosine_average_linkage(seed: int) -> None:
    x = _blobs(seed)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    threshold = 0.5
    c = singletons(np.arange(len(x)), x)
    a, b, _ = knn_pairs(c, len(x), Metric.COSINE, threshold)
    got = rac(c, a, b, Metric.COSINE, threshold)
    want = AgglomerativeClustering(n_clusters=None, distance_threshold=float(np.nextafter(1 - threshold, 2)),
                                   metric="cosine", linkage="average").fit_predict(x)
    assert got.merges > 0 and len(set(want.tolist())) > 4
    assert _canonical(got.root) == _canonical(want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rac_in_a_euclidean_space_is_scipys_average_linkage_on_squared_distances(seed: int) -> None:
    x = _blobs(seed)
    threshold = 4.0
    c = singletons(np.arange(len(x)), x.astype(np.float32))
    a, b, _ = knn_pairs(c, len(x), Metric.EUCLIDEAN, threshold)
    got = rac(c, a, b, Metric.EUCLIDEAN, threshold)
    want = fcluster(linkage(x.astype(np.float32).astype(np.float64), method="average", metric="sqeuclidean"),
                    threshold**2, criterion="distance")
    assert got.merges > 0 and len(set(want.tolist())) > 4
    assert _canonical(got.root) == _canonical(want)


def test_merged_statistics_are_the_sums_of_their_members() -> None:
    x = _blobs(3, n=60)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = singletons(np.arange(60) * 7, x)
    a, b, _ = knn_pairs(c, 5, Metric.COSINE, 0.3)
    got = rac(c, a, b, Metric.COSINE, 0.3)
    for r in np.unique(got.root):
        members = np.flatnonzero(got.root == r)
        assert c.n[r] == members.size and r == members.min()
        assert np.allclose(c.s[r], x[members].sum(axis=0))
