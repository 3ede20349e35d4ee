"""A small export in the pipeline's export format, straight from the procedural face renderer.

For tests, benchmarks and smoke runs of the training jobs without running the whole pipeline: same
tar layout (``manifests.shards.write_tar``), same members (``<key>.png``, ``.cls``, ``.json``, and
``.degraded.png`` from the degradation stage when asked), same ``export.json``. Identities are split
by identity (train and val never share one), labels are dense per split, and shards mix identities.
Faces are rendered at 1.5x the crop side and centre-cropped: the renderer centres the face, so the
crop frames it roughly as the ArcFace 112x112 template does (forehead to chin, hair partly cut).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from manifests.shards import write_tar
from pipeline.training.export_index import EXPORT_MANIFEST, ExportIndex, load_export
from stages.base import IMAGE, SAMPLE_ID, StageContext, sample_seed, stable_hash
from stages.degrade import DEGRADED, DegradeParams, DegradeStage
from stages.face_renderer import render_sample
from stages.identities import perturb, sample_gaussian_identities
from stages.imaging import encode_png


@dataclass(frozen=True)
class ProceduralExportSpec:
    train_identities: int = 32
    val_identities: int = 16
    images_per_identity: int = 8
    image_size: int = 112
    shard_size: int = 128
    seed: int = 0
    sigmas: tuple[float, ...] = (0.3, 0.5, 0.7)  # Vec2Face per-image perturbation schedule
    max_yaw: float = 20.0
    degrade: DegradeParams | None = None


def render_crop(identity: np.ndarray, sample_id: str, sigma: float, spec: ProceduralExportSpec) -> np.ndarray:
    seed = sample_seed(spec.seed, sample_id, "render")
    perturbed = perturb(identity, sigma, sample_seed(spec.seed, sample_id, "perturb"))
    full = spec.image_size * 3 // 2
    rgb, _ = render_sample(
        identity, perturbed, seed, size=full, perturbation_sigma=sigma, max_yaw=spec.max_yaw
    )
    top = (full - spec.image_size) // 2
    return np.ascontiguousarray(rgb[top : top + spec.image_size, top : top + spec.image_size])


def write_procedural_export(
    run_dir: str | Path, spec: ProceduralExportSpec = ProceduralExportSpec()
) -> ExportIndex:
    """Render, split, shard and write ``<run_dir>/export``; returns its index."""
    root = Path(run_dir)
    fingerprint = stable_hash(
        {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in asdict(spec).items()}, 24
    )
    n_ids = spec.train_identities + spec.val_identities
    vectors = sample_gaussian_identities(n_ids, 512, 0.35, spec.seed).vectors
    degrader = None
    if spec.degrade is not None:
        degrader = DegradeStage(
            spec.degrade, StageContext(run_dir=str(root), stage_id="degrade", seed=spec.seed)
        )
    splits: dict[str, dict] = {}
    for split, first, count in (
        ("train", 0, spec.train_identities),
        ("val", spec.train_identities, spec.val_identities),
    ):
        samples = []
        for label in range(count):
            ident = first + label
            identity_id = f"id-{fingerprint[:8]}-{ident:05d}"
            for variant in range(spec.images_per_identity):
                sample_id = stable_hash([fingerprint, ident, variant], 24)
                sigma = spec.sigmas[variant % len(spec.sigmas)]
                png = encode_png(render_crop(vectors[ident], sample_id, sigma, spec))
                meta = {
                    "sample_id": sample_id,
                    "identity_id": identity_id,
                    "label": label,
                    "split": split,
                    "variant": variant,
                    "perturbation_sigma": sigma,
                }
                samples.append({"__key__": sample_id, "png": png, "cls": str(label), "json": meta})
        order = np.random.default_rng([spec.seed, len(split)]).permutation(len(samples))
        samples = [samples[i] for i in order]
        if degrader is not None:
            out = degrader.process(
                {SAMPLE_ID: [s["__key__"] for s in samples], IMAGE: [s["png"] for s in samples]}
            )
            for s, degraded in zip(samples, out[DEGRADED], strict=True):
                s["degraded.png"] = degraded
        shards = []
        for n, start in enumerate(range(0, len(samples), spec.shard_size)):
            rel = f"export/{split}/shard-{n:06d}.tar"
            data, _ = write_tar(samples[start : start + spec.shard_size])
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            shards.append(rel)
        splits[split] = {"samples": len(samples), "identities": count, "shards": shards}
    manifest = {
        "fingerprint": fingerprint,
        "generator": "procedural",
        "image_size": spec.image_size,
        "splits": splits,
    }
    (root / "export" / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return load_export(str(root))
