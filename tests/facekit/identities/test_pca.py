"""The PCA-space Gaussian identity sampler on synthetic clustered "real" embeddings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from facekit.identities.pca import PcaGaussian, centroids_from, load_reference, sample_pca_identities

DIM = 32


def anisotropic_centroids(n: int = 400, dim: int = DIM, decay: float = 0.9, seed: int = 0) -> np.ndarray:
    """Unit identity centroids, nearly orthogonal to each other like ArcFace ones (mean pair cosine ~0.05),
    with variance decaying along a random basis and a small common offset."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    stds = decay ** np.arange(dim)
    mean = basis[:, -1] * 0.5  # the offset sits along the least-varying direction
    x = mean + (rng.standard_normal((n, dim)) * stds) @ basis.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def per_image(
    centroids: np.ndarray, images: int = 5, noise: float = 0.05, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered per-image embeddings: each identity's images scattered around its centroid."""
    rng = np.random.default_rng(seed)
    emb = np.repeat(centroids, images, axis=0) + noise * rng.standard_normal(
        (len(centroids) * images, centroids.shape[1])
    )
    labels = np.repeat(np.arange(len(centroids)), images)
    return emb.astype(np.float32), labels


def top_pcs(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt[:k], (s[:k] ** 2) / (len(x) - 1)


def test_samples_follow_the_reference_covariance_along_its_top_components(tmp_path: Path) -> None:
    ref = anisotropic_centroids(decay=0.75)
    np.save(tmp_path / "ref.npy", ref)
    sampled, _ = sample_pca_identities(
        str(tmp_path / "ref.npy"), 400, 0.999, seed=3, dim=DIM, exclude_reference=False
    )
    comps, ref_var = top_pcs(ref, 3)
    got_var = ((sampled.vectors - sampled.vectors.mean(axis=0)) @ comps.T).var(axis=0, ddof=1)
    # About the reference's variance along its top three components. Sampling error at n=400 is ~7 %, and
    # L2-normalising the samples shrinks a dominant direction a little (~15 % here, where one component holds
    # 40 % of the variance; much less at 512-d, where no component dominates the norm).
    ratio = got_var / ref_var
    assert ((ratio > 0.7) & (ratio < 1.15)).all(), ratio
    # And the samples' own first component is the reference's first component.
    own, _ = top_pcs(sampled.vectors, 1)
    assert abs(float(own[0] @ comps[0])) > 0.95
    # The spread is far from isotropic: the top component holds much more variance than the 10th.
    assert got_var[0] > 10 * ((sampled.vectors @ top_pcs(ref, 10)[0][9]).var())


def test_every_kept_identity_is_separated_from_every_other_and_from_the_reference(tmp_path: Path) -> None:
    # About half of the raw samples come within cosine 0.6 of some reference identity here.
    ref = anisotropic_centroids(n=100, decay=0.93)
    np.save(tmp_path / "ref.npy", ref)
    sampled, _ = sample_pca_identities(str(tmp_path / "ref.npy"), 30, 0.6, seed=0, dim=DIM)
    v = sampled.vectors
    assert v.shape == (30, DIM)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cos = v @ v.T
    np.fill_diagonal(cos, -1.0)
    assert cos.max() < 0.6
    assert (v @ ref.T).max() < 0.6
    assert sampled.max_cosine_to_kept.max() < 0.6


def test_reference_exclusion_can_be_turned_off_and_then_samples_come_close_to_real_identities(
    tmp_path: Path,
) -> None:
    ref = anisotropic_centroids(n=100, decay=0.93)
    np.save(tmp_path / "ref.npy", ref)
    free, _ = sample_pca_identities(str(tmp_path / "ref.npy"), 30, 0.6, seed=0, exclude_reference=False)
    assert (free.vectors @ ref.T).max() >= 0.6


def test_same_seed_gives_the_same_identities_and_another_seed_different_ones(tmp_path: Path) -> None:
    np.save(tmp_path / "ref.npy", anisotropic_centroids())
    path = str(tmp_path / "ref.npy")
    a, sha_a = sample_pca_identities(path, 20, 0.8, seed=7)
    b, sha_b = sample_pca_identities(path, 20, 0.8, seed=7)
    c, _ = sample_pca_identities(path, 20, 0.8, seed=8)
    assert np.array_equal(a.vectors, b.vectors) and sha_a == sha_b
    assert not np.array_equal(a.vectors, c.vectors)


def test_the_returned_hash_is_the_sha256_of_the_reference_file(tmp_path: Path) -> None:
    path = tmp_path / "ref.npy"
    np.save(path, anisotropic_centroids())
    _, sha = sample_pca_identities(str(path), 5, 0.9, seed=0)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_npy_safetensors_and_parquet_with_labels_give_the_same_centroids(tmp_path: Path) -> None:
    emb, labels = per_image(anisotropic_centroids(n=50))
    np.save(tmp_path / "rows.npy", centroids_from(emb, labels))
    save_file({"embeddings": emb, "labels": labels.astype(np.int64)}, str(tmp_path / "ref.safetensors"))
    table = pa.table({"identity_id": [f"p{i}" for i in labels], "embedding": list(emb)})
    pq.write_table(table, tmp_path / "ref.parquet")
    from_npy = load_reference(str(tmp_path / "rows.npy"))
    from_st = load_reference(str(tmp_path / "ref.safetensors"))
    from_pq = load_reference(str(tmp_path / "ref.parquet"))
    assert from_st.centroids.shape == (50, DIM) and from_st.rows == 250
    # Parquet labels sort as strings (p0, p1, p10, ...), so compare as sets of rows.
    order = np.lexsort(from_pq.centroids.T)
    np.testing.assert_allclose(
        from_pq.centroids[order], from_st.centroids[np.lexsort(from_st.centroids.T)], atol=1e-6
    )
    np.testing.assert_allclose(from_npy.centroids, from_st.centroids, atol=1e-6)


def test_an_object_array_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_reference(str(path))


def test_a_reference_of_another_dimension_fails_naming_both(tmp_path: Path) -> None:
    np.save(tmp_path / "ref.npy", anisotropic_centroids(dim=16))
    with pytest.raises(ValueError, match=r"identities.dim is 512 .* 16-d"):
        sample_pca_identities(str(tmp_path / "ref.npy"), 5, 0.5, seed=0, dim=512)


def test_an_impossible_separation_stops_with_a_fix_in_the_message(tmp_path: Path) -> None:
    np.save(tmp_path / "ref.npy", anisotropic_centroids(n=100, dim=4))
    with pytest.raises(RuntimeError, match=r"raise identities\.max_cosine"):
        sample_pca_identities(str(tmp_path / "ref.npy"), 50, 0.0, seed=0, max_candidates=2000)


def test_component_signs_are_canonical_so_a_flipped_svd_gives_the_same_model() -> None:
    ref = anisotropic_centroids()
    model = PcaGaussian.fit(ref)
    loadings = model.components[np.arange(len(model.stds)), np.abs(model.components).argmax(axis=1)]
    assert (loadings > 0).all()
    assert np.allclose(model.components @ model.components.T, np.eye(len(model.stds)), atol=1e-8)
