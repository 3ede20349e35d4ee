"""Identity sampling from real data: a Gaussian fitted in the PCA space of real identity centroids.

Isotropic Gaussian vectors (facekit.identities.gaussian) cover the whole sphere, but a generator trained on
real faces (Arc2Face on ArcFace vectors) has only seen the part of the sphere real identities occupy.
Vec2Face's second sampler fits that part: PCA of real identity centroids, a Gaussian with the
measured variance along each component, samples mapped back and L2-normalised. The cosine-separation
rule runs on top, between kept identities and, by default, also against every reference identity,
so the run does not re-create a real person of the reference set.

Reference files are read without unpickling: .npy/.npz through ``np.load(allow_pickle=False)``,
safetensors, or Parquet with an embedding column. With identity labels, per-image embeddings are
averaged into one centroid per identity; without, each row is one identity. The file's sha256 goes
into the identities table so a run names the exact data its identities came from.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from facekit.identities.gaussian import SampledIdentities, sample_separated

EMBEDDING_KEYS = ("embedding", "embeddings", "centroids", "vectors")
LABEL_KEYS = ("identity_id", "identity", "label", "labels")


@dataclass(frozen=True)
class ReferenceEmbeddings:
    centroids: np.ndarray  # (identities, dim) float32, unit norm
    sha256: str
    rows: int  # embeddings read (images when the file is per image)


def _pick(names: list[str], wanted: tuple[str, ...], what: str, path: str, required: bool) -> str | None:
    for key in wanted:
        if key in names:
            return key
    if required and len(names) == 1:
        return names[0]
    if required:
        raise ValueError(
            f"reference {path}: no {what} (looked for {', '.join(wanted)}; found {', '.join(names)})"
        )
    return None


def _parse(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, labels or None) from the file's bytes, by extension; never unpickles."""
    lower = path.lower()
    if lower.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False), None
    if lower.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    elif lower.endswith(".safetensors"):
        from safetensors.numpy import load

        arrays = load(data)
    elif lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        col = _pick(table.column_names, EMBEDDING_KEYS, "embedding column", path, required=True)
        assert col is not None
        emb = np.asarray(table.column(col).to_pylist(), dtype=np.float32)
        lab = _pick(table.column_names, LABEL_KEYS, "label column", path, required=False)
        return emb, (np.asarray(table.column(lab).to_pylist()) if lab else None)
    else:
        raise ValueError(f"reference {path}: unsupported file type; use .npy, .npz, .safetensors or .parquet")
    key = _pick(list(arrays), EMBEDDING_KEYS, "embedding array", path, required=True)
    assert key is not None
    lab = _pick(list(arrays), LABEL_KEYS, "labels", path, required=False)
    return arrays[key], (arrays[lab] if lab else None)


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise ValueError(f"{what}: embeddings must be finite and non-zero")
    return x / norms


def centroids_from(embeddings: np.ndarray, labels: np.ndarray | None, path: str = "reference") -> np.ndarray:
    """One unit vector per identity: the normalised mean of its normalised embeddings."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 2 or not np.issubdtype(emb.dtype, np.number):
        raise ValueError(
            f"{path}: expected a numeric (rows, dim) array with at least 2 rows, got {emb.shape} {emb.dtype}"
        )
    emb = _unit(emb.astype(np.float64), path)
    if labels is None:
        return emb.astype(np.float32)
    labels = np.asarray(labels)
    if labels.shape != (emb.shape[0],):
        raise ValueError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {emb.shape[0]} embeddings"
        )
    _, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((int(inverse.max()) + 1, emb.shape[1]))
    np.add.at(sums, inverse, emb)
    if len(sums) < 2:
        raise ValueError(f"{path}: the labels name only one identity")
    return _unit(sums, path).astype(np.float32)


def load_reference(path: str, storage_options: dict[str, Any] | None = None) -> ReferenceEmbeddings:
    """Read a reference embedding file (local path or fsspec URL) into identity centroids + its sha256."""
    import fsspec

    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        data = fh.read()
    embeddings, labels = _parse(data, path)
    centroids = centroids_from(embeddings, labels, path)
    return ReferenceEmbeddings(
        centroids, hashlib.sha256(data).hexdigest(), int(np.asarray(embeddings).shape[0])
    )


@dataclass(frozen=True)
class PcaGaussian:
    """x = mean + sum_i z_i * std_i * component_i, z ~ N(0, I): the centroids' covariance in its top
    components. Samples are L2-normalised afterwards, which shrinks a component that dominates the norm
    a little (negligible at 512-d, where none does)."""

    mean: np.ndarray  # (dim,)
    components: np.ndarray  # (k, dim), orthonormal rows, largest variance first
    stds: np.ndarray  # (k,)

    @classmethod
    def fit(cls, centroids: np.ndarray, n_components: int | None = None) -> PcaGaussian:
        x = np.asarray(centroids, dtype=np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2 / max(len(x) - 1, 1)
        k = int(np.count_nonzero(var > var[0] * 1e-12)) if var[0] > 0 else 0
        if n_components is not None:
            k = min(k, n_components)
        if k == 0:
            raise ValueError("reference identities are all the same vector: nothing to fit")
        vt = vt[:k]
        # A component's sign is arbitrary (LAPACK may flip it between machines); fix it so that the
        # largest loading is positive and the same seed gives the same identities everywhere.
        signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
        return cls(mean, vt * signs[:, None], np.sqrt(var[:k]))

    def sample(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        """(n, dim) unit vectors; ``scale`` > 1 widens the Gaussian (more diverse, less typical faces)."""
        z = rng.standard_normal((n, len(self.stds))) * (self.stds * scale)
        x = self.mean + z @ self.components
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def max_cosine_to(candidates: np.ndarray, reference: np.ndarray, block: int = 8192) -> np.ndarray:
    """Each candidate's largest cosine to any reference row, in blocks so memory stays bounded."""
    best = np.full(len(candidates), -np.inf, dtype=np.float32)
    for start in range(0, len(reference), block):
        np.maximum(best, (candidates @ reference[start : start + block].T).max(axis=1), out=best)
    return best


def sample_from_reference(
    reference: ReferenceEmbeddings,
    count: int,
    max_cosine: float,
    seed: int,
    max_candidates: int = 1_000_000,
    reference_max_cosine: float | None = None,
    n_components: int | None = None,
    scale: float = 1.0,
    chunk: int = 4096,
) -> SampledIdentities:
    """``count`` identities from the fitted Gaussian, each with cosine < ``max_cosine`` to every kept one
    and, unless ``reference_max_cosine`` is None, < ``reference_max_cosine`` to every reference identity."""
    model = PcaGaussian.fit(reference.centroids, n_components)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9CA]))

    def draw(n: int) -> np.ndarray:
        cand = model.sample(rng, n, scale)
        if reference_max_cosine is not None:
            cand = cand[max_cosine_to(cand, reference.centroids) < reference_max_cosine]
        return cand

    against = "" if reference_max_cosine is None else f" and {reference_max_cosine} to the reference"
    return sample_separated(draw, count, max_cosine, max_candidates, chunk, against)


def sample_pca_identities(
    reference: str | None,
    count: int,
    max_cosine: float,
    seed: int,
    max_candidates: int = 1_000_000,
    dim: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    exclude_reference: bool = True,
    reference_max_cosine: float | None = None,
    n_components: int | None = None,
    scale: float = 1.0,
) -> tuple[SampledIdentities, str]:
    """The runner's entry point: (identities, the reference file's sha256).

    ``exclude_reference`` applies the separation rule against the reference identities too, at
    ``reference_max_cosine`` (default: ``max_cosine``).
    """
    if not reference:
        raise ValueError("identities.reference: the pca sampler needs a reference embedding file")
    ref = load_reference(reference, storage_options)
    if dim is not None and ref.centroids.shape[1] != dim:
        raise ValueError(
            f"identities.dim is {dim} but {reference} holds {ref.centroids.shape[1]}-d embeddings"
        )
    threshold = (
        (reference_max_cosine if reference_max_cosine is not None else max_cosine)
        if exclude_reference
        else None
    )
    sampled = sample_from_reference(
        ref, count, max_cosine, seed, max_candidates, threshold, n_components, scale
    )
    return sampled, ref.sha256
