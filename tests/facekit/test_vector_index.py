"""Neighbour search (facekit.vector_index) and threshold fitting (facekit.thresholds)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial.distance import cdist

from facekit.thresholds import (
    Metric,
    defaults_for,
    distinct_label_pairs,
    fit_at_far,
    fit_from_impostors,
    pair_scores_from_labels,
)
from facekit.vector_index import embedding_matrix, knn, range_pairs, space_of
from stages.corpus.dedup import hamming_pairs


def brute_pairs(x: np.ndarray, metric: Metric, threshold: float) -> set[tuple[int, int]]:
    s = x @ x.T if metric is Metric.COSINE else cdist(x, x)
    i, j = np.nonzero(np.triu(metric.same(s, threshold), k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int, d: int, pairs: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[n - pairs :] = x[:pairs] + noise * rng.standard_normal((pairs, d)).astype(np.float32)
    return x


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.EUCLIDEAN])
def test_exact_range_pairs_equal_brute_force_including_the_threshold_itself(metric: Metric) -> None:
    x = planted(300, 24, 40, 0.05, seed=1)
    if metric is Metric.COSINE:
        x = unit(x)
    threshold = 0.95 if metric is Metric.COSINE else 1.5
    got = range_pairs(x, metric, threshold)
    assert got.exact and set(zip(got.i.tolist(), got.j.tolist(), strict=True)) == brute_pairs(
        x, metric, threshold
    )
    assert np.all(got.i < got.j)
    # a pair sitting exactly at the threshold is inside it
    k = int(np.argmax(got.score)) if metric is Metric.COSINE else int(np.argmin(got.score))
    at = float(got.score[k])
    again = range_pairs(x, metric, at)
    assert (int(got.i[k]), int(got.j[k])) in set(zip(again.i.tolist(), again.j.tolist(), strict=True))


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.EUCLIDEAN])
def test_partitioned_pairs_at_a_loose_threshold_with_every_cell_probed_equal_brute_force(metric: Metric) -> None:
    """A loose threshold (centroid collisions at 100k identities) makes the coarse bound pass most of
    each cell: the join must score those blocks itself and return only the pairs that pass -- it once
    collected every candidate first and took 22 GB."""
    x = unit(planted(1500, 128, 50, 0.3, seed=3))
    threshold = 0.12 if metric is Metric.COSINE else 1.3
    tracemalloc.start()
    try:
        got = range_pairs(x, metric, threshold, exact_max=0, nlist=12, nprobe=12, slack=float("inf"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    truth = brute_pairs(x, metric, threshold)
    assert not got.exact and 10_000 < len(truth) < 1500 * 1499 // 8
    assert set(zip(got.i.tolist(), got.j.tolist(), strict=True)) == truth
    # what passes, twice over (pairs are probed from both ends), and a few blocks; not every candidate
    assert peak < 64 * len(truth) + 24 * 2**20, peak


@pytest.mark.parametrize(
    ("metric", "d"), [(Metric.COSINE, 32), (Metric.COSINE, 128), (Metric.EUCLIDEAN, 128)]
)
def test_partitioned_pairs_find_planted_neighbours_with_exact_scores(metric: Metric, d: int) -> None:
    x = planted(6000, d, 150, 0.15, seed=2)
    if metric is Metric.COSINE:
        x = unit(x)
    threshold = 0.9 if metric is Metric.COSINE else 0.15 * np.sqrt(d) * 1.3
    got = range_pairs(x, metric, threshold, exact_max=0, nprobe=8)
    truth = brute_pairs(x, metric, threshold)
    found = set(zip(got.i.tolist(), got.j.tolist(), strict=True))
    assert not got.exact
    assert found <= truth  # candidates are re-scored exactly: never a false pair
    assert len(found & truth) >= 0.98 * len(truth) and len(truth) >= 140
    ref = Metric(metric).score(x[got.i], x[got.j])
    np.testing.assert_allclose(got.score, ref, rtol=1e-4, atol=1e-5)


def test_knn_exact_and_ivf_agree_when_every_cell_is_probed() -> None:
    rng = np.random.default_rng(3)
    db = unit(rng.standard_normal((3000, 16)))
    q = unit(rng.standard_normal((50, 16)))
    s_exact, i_exact = knn(db, q, 3, Metric.COSINE)
    s_ivf, i_ivf = knn(db, q, 3, Metric.COSINE, exact_max=100, nprobe=10_000)
    np.testing.assert_array_equal(i_exact, i_ivf)
    np.testing.assert_allclose(s_exact, s_ivf, rtol=1e-5)
    s_l2, i_l2 = knn(db, q, 1, Metric.EUCLIDEAN)
    np.testing.assert_allclose(s_l2[:, 0], np.linalg.norm(db[i_l2[:, 0]] - q, axis=1), rtol=1e-4)


def test_embedding_matrix_reads_fixed_and_variable_lists_with_nulls() -> None:
    rows = [[1.0, 2.0], None, [3.0, 4.0]]
    for typ in (pa.list_(pa.float32(), 2), pa.list_(pa.float64())):
        x, valid = embedding_matrix(pa.table({"embedding": pa.array(rows, typ)}))
        assert valid.tolist() == [True, False, True]
        np.testing.assert_array_equal(x, [[1, 2], [0, 0], [3, 4]])
    empty, none_valid = embedding_matrix(pa.table({"embedding": pa.array([None, None], pa.null())}))
    assert not none_valid.any() and empty.shape == (2, 0)


def test_space_of_refuses_mixed_embedding_spaces() -> None:
    table = pa.table(
        {
            "embedding_space": ["dlib-resnet-128", "arcface-r100-512"],
            "embedding_metric": ["euclidean", "cosine"],
        }
    )
    with pytest.raises(ValueError, match="one embedding space"):
        space_of(table, np.array([True, True]))
    assert space_of(table, np.array([True, False])) == ("dlib-resnet-128", Metric.EUCLIDEAN)


def test_multi_index_hamming_search_equals_the_flat_scan() -> None:
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (5000, 8), dtype=np.uint8)
    for k in range(300):  # near copies, 0-8 bits flipped
        c = codes[k].copy()
        for bit in rng.choice(64, int(rng.integers(0, 9)), replace=False):
            c[bit // 8] ^= np.uint8(1 << (bit % 8))
        codes[-1 - k] = c
    for distance in (0, 3, 6, 8):
        flat = set(zip(*(a.tolist() for a in hamming_pairs(codes, distance, exact_max=10**9)), strict=True))
        hashed = set(zip(*(a.tolist() for a in hamming_pairs(codes, distance, exact_max=0)), strict=True))
        assert flat == hashed and len(flat) > 0


@pytest.mark.parametrize("metric", [Metric.EUCLIDEAN, Metric.COSINE])
def test_fit_at_far_accepts_at_most_the_target_share_of_impostors(metric: Metric) -> None:
    rng = np.random.default_rng(5)
    sign = 1.0 if metric is Metric.EUCLIDEAN else -1.0
    genuine = sign * rng.normal(0.3, 0.05, 2000)
    impostor = sign * rng.normal(0.6, 0.05, 20000)
    for far in (1e-3, 1e-2, 0.1):
        fit = fit_at_far(genuine, impostor, metric, far)
        assert fit.far <= far
        assert fit.far >= far - 2 / impostor.size  # as loose as the target allows
        assert np.mean(metric.same(impostor, fit.threshold)) == pytest.approx(fit.far)
        assert fit.frr < 0.05
    strict = fit_at_far(genuine, impostor[:10], metric, 1e-3)  # too few impostors to resolve 1e-3
    assert strict.far == 0.0


def test_pair_scores_from_labels_split_genuine_and_impostor_pairs() -> None:
    x = np.array([[0, 0], [0, 0.1], [5, 5], [5, 5.1]], dtype=np.float32)
    genuine, impostor = pair_scores_from_labels(x, np.array(["a", "a", "b", "b"]), Metric.EUCLIDEAN)
    np.testing.assert_allclose(np.sort(genuine), [0.1, 0.1], rtol=1e-5)
    assert impostor.size > 0 and impostor.min() > 7


@pytest.mark.parametrize("metric", [Metric.EUCLIDEAN, Metric.COSINE])
def test_a_fit_is_stricter_than_the_published_point_where_distinct_people_sit_closer_and_never_looser(
        metric: Metric) -> None:
    rng = np.random.default_rng(2)
    floor = defaults_for("sface-128" if metric.higher_is_same else "dlib-resnet-128").verification
    assert floor is not None
    # renders: distinct people nearer each other than on photos -> the fit replaces the floor
    close = rng.normal(0.55, 0.05, 5000) if metric.higher_is_same else rng.normal(0.35, 0.05, 5000)
    fit = fit_from_impostors(close, metric, 1e-3, floor=floor)
    assert metric.closer(fit.threshold, floor) and fit.threshold == fit.unfloored
    assert fit.far <= 1e-3 and fit.floor == floor
    # photos of very different people: the quantile is looser than the published point, which stays
    far = rng.normal(0.0, 0.05, 5000) if metric.higher_is_same else rng.normal(1.0, 0.05, 5000)
    kept = fit_from_impostors(far, metric, 1e-3, floor=floor)
    assert kept.threshold == floor and kept.unfloored is not None and metric.closer(floor, kept.unfloored)
    assert kept.far == 0.0 and kept.as_dict()["floor"] == floor


def test_distinct_label_pairs_are_every_pair_of_two_people_or_a_bounded_seeded_draw() -> None:
    labels = np.array(["a", "a", "b", "c"])
    i, j = distinct_label_pairs(labels)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    i, j = distinct_label_pairs(labels, np.array(["a", "b"]))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (1, 1), (2, 0), (3, 0), (3, 1)]
    many = np.repeat(np.arange(300), 10)
    i, j = distinct_label_pairs(many, None, 1000, seed=4)
    assert i.size == 1000 and (many[i] != many[j]).all()
    again = distinct_label_pairs(many, None, 1000, seed=4)
    assert np.array_equal(i, again[0]) and np.array_equal(j, again[1])


def test_defaults_cover_dlib_and_every_arcface_variant() -> None:
    assert defaults_for("dlib-resnet-128").metric is Metric.EUCLIDEAN
    assert defaults_for("arcface-r100-512").metric is Metric.COSINE
    with pytest.raises(KeyError, match="no default thresholds"):
        defaults_for("clip-vit-b32")
