"""The Gaussian identity sampler's look-alike pairs: how many, at what cosine, and nothing else moved."""

from __future__ import annotations

import numpy as np

from facekit.identities.gaussian import add_siblings, sample_gaussian_identities


def test_siblings_make_disjoint_look_alike_pairs_at_exactly_the_chosen_cosine() -> None:
    base = sample_gaussian_identities(20, 64, 0.35, seed=3)
    out = add_siblings(base, fraction=0.5, cosine=0.8, seed=3)
    g = out.vectors @ out.vectors.T
    np.fill_diagonal(g, -1.0)
    close = np.argwhere(np.triu(g) > 0.5)
    assert len(close) == 5  # floor(0.5 * 20 / 2) pairs
    assert np.allclose(g[close[:, 0], close[:, 1]], 0.8, atol=1e-5)
    assert len(np.unique(close)) == 10  # disjoint: no identity is in two pairs
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    moved = np.flatnonzero(np.any(out.vectors != base.vectors, axis=1))
    assert set(moved.tolist()) == set(close[:, 1].tolist())  # the later identity of each pair, only
    assert np.allclose(out.max_cosine_to_kept[moved], 0.8)
    again = add_siblings(base, fraction=0.5, cosine=0.8, seed=3)
    assert np.array_equal(again.vectors, out.vectors)


def test_a_fraction_too_small_for_one_pair_leaves_the_identities_as_sampled() -> None:
    base = sample_gaussian_identities(3, 16, 0.5, seed=0)
    assert add_siblings(base, fraction=0.5, cosine=0.9, seed=0) is base
