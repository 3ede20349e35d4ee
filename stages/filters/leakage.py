"""leakage: drop samples that look like a person of a reference gallery (an evaluation set, real
training identities), so a synthetic dataset does not contain the people it is evaluated on.

Scales like the other corpus-wide steps without one process holding the run: the gallery is embedded
and indexed ONCE per run, in ``prepare`` (the runner calls it in the driver before any shard runs; the
work itself runs as one Ray task), and cached under the run directory keyed by the gallery's content
hash and the detector/embedder used (manifests.layout.gallery_cache_path), so a resumed or re-run run
reuses it. Samples are then scored per shard in parallel: each worker loads the cached FAISS index in
``setup()`` and asks it for every sample's nearest gallery item. Memory per worker is the gallery's
index, never the run.

The gallery is embedded with the run's own detector and embedder (the params of the ``detect_stage``
and ``embed_stage`` of the frozen run config), so gallery and samples share one embedding space; a
Parquet gallery of embeddings must be in that space. Every row stores the nearest gallery identity,
item, score (in the space's metric) and the gallery's hash; a sample at or past the threshold is
dropped with rule ``leakage_above_max`` (cosine; ``leakage_below_min`` for a distance space) and a
detail naming the gallery item. The threshold defaults to the space's pair-verification threshold
(facekit.thresholds: SFace 0.363, dlib 0.6): a sample is leaked when it would verify as the gallery
person. ``finish`` writes ``report/<stage>.summary.json``: the gallery, the threshold and the score
distribution (fixed-bin histogram and quantiles, read from the score column of the manifests only).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.thresholds import Metric, defaults_for
from facekit.userconfig import load_yaml
from manifests.layout import (
    GALLERY_INDEX,
    GALLERY_TABLE,
    MANIFESTS_DIR,
    RUN_FILE,
    gallery_cache_path,
    gallery_pointer_path,
    stage_summary_path,
)
from manifests.sql import has_glob
from stages.base import (
    SAMPLE_ID,
    Batch,
    FilterStage,
    Params,
    Resources,
    Rows,
    StageContext,
    stable_hash,
)

SCORE = "leakage_score"
HIST_BINS = 40


class LeakageParams(Params):
    gallery: str = Field(description="reference gallery: a folder or tar glob of photos, an insightface .bin, "
                                     "or a Parquet file of embeddings with identity labels (path or fsspec URL)")
    gallery_kind: Literal["auto", "photos", "bin", "embeddings"] = Field(
        "auto", description="auto: .bin -> bin, .parquet -> embeddings, otherwise photos")
    threshold: float | None = Field(None, description="score at which a sample is leaked, in the space's metric; "
                                                      "None: the space's verification threshold")
    detect_stage: str = Field("detect", description="the run stage whose detector embeds gallery photos")
    embed_stage: str = Field("embed", description="the run stage whose embedder embeds the gallery")
    gallery_sha256: str | None = Field(None, description="refuse the run unless the gallery has this hash")
    max_file_bytes: int = Field(64 << 20, ge=1, description="gallery files larger than this are skipped")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of the gallery")


def _stage_params(config: dict[str, Any], stage_id: str) -> dict[str, Any] | None:
    for entry in config.get("stages", []):
        sid = entry.get("id") or str(entry.get("stage", "")).rsplit(":", 1)[-1].lower()
        if sid == stage_id:
            return dict(entry.get("params") or {})
    return None


def _build_and_cache(run_dir: str, storage_options: dict[str, Any], params: dict[str, Any], kind: str,
                     sha256: str, key: str, detect: dict[str, Any] | None, embed: dict[str, Any]) -> dict[str, Any]:
    """Embed the gallery with the run's backends, index it, write both to the cache; returns the facts."""
    import faiss
    import pyarrow.parquet as pq

    from facekit.backends.base import build_backend
    from facekit.gallery import build_gallery
    from facekit.vector_index import build_index
    from manifests.storage import RunStorage

    p = LeakageParams.model_validate(params)
    embedder = build_backend(embed["backend"], "embedder", embed["options"])
    detector = None
    if kind != "embeddings":
        if detect is None:
            raise ValueError(f"leakage: gallery {p.gallery} needs a detector, but the run has no stage "
                             f"{p.detect_stage!r}; set detect_stage")
        detector = build_backend(detect["backend"], "detector", detect["options"])
    g = build_gallery(p.gallery, kind, sha256, detector, embedder, p.storage_options, p.max_file_bytes)  # type: ignore[arg-type]
    if len(g.vectors) == 0:
        raise ValueError(f"leakage: gallery {p.gallery} gave no embeddings (skipped: {g.skipped})")
    store = RunStorage(run_dir, storage_options)
    table = pa.table({"item": g.items, "identity": g.identities,
                      "embedding": pa.array(list(g.vectors), type=pa.list_(pa.float32(), g.vectors.shape[1]))})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_atomic(buf.getvalue(), *gallery_cache_path(key, GALLERY_TABLE))
    index = build_index(g.vectors, Metric(g.metric))
    store.write_atomic(faiss.serialize_index(index).tobytes(), *gallery_cache_path(key, GALLERY_INDEX))
    return {"items": len(g.items), "identities": len(set(g.identities)), "skipped": g.skipped,
            "space": g.space, "metric": g.metric, "dim": int(g.vectors.shape[1])}


class LeakageStage(FilterStage):
    """Drops samples that look like a person of a reference gallery (an evaluation set) the run must not contain."""

    name: ClassVar[str] = "leakage"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = LeakageParams
    resources: ClassVar[Resources] = Resources(cpus=0.25, memory_gb=0.5)
    batch_size: ClassVar[int] = 256
    reads: ClassVar[tuple[str, ...]] = ("embedding", "embedding_space", "embedding_metric")
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("leakage_identity", pa.string()),  # nearest gallery identity
        pa.field("leakage_item", pa.string()),  # the gallery item (file, pair-set image, row) it is nearest to
        pa.field(SCORE, pa.float32()),  # its score in the space's metric (cosine: similarity)
        pa.field("leakage_gallery_sha256", pa.string()),
    )
    params: LeakageParams

    def __init__(self, params: Params, context: StageContext) -> None:
        super().__init__(params, context)
        self._pointer: dict[str, Any] | None = None

    def _store(self) -> Any:
        from manifests.storage import RunStorage

        return RunStorage(self.context.run_dir, self.context.storage_options)

    def _kind(self) -> str:
        from facekit.gallery import guess_kind

        return guess_kind(self.params.gallery) if self.params.gallery_kind == "auto" else self.params.gallery_kind

    # ------------------------------------------------------------------ once per run, in the driver

    def prepare(self, store: Any) -> None:
        """Embed and index the gallery unless the cache already holds it; record which one this run uses."""
        from facekit.backends.base import backend_class
        from facekit.gallery import gallery_sha256
        from stages.mappers.detect import DetectParams
        from stages.mappers.embed import EmbedParams

        p = self.params
        config = (load_yaml(store.read_bytes(RUN_FILE), RUN_FILE) or {}).get("config", {})
        raw_embed = _stage_params(config, p.embed_stage)
        if raw_embed is None:
            raise ValueError(f"leakage: the run has no stage {p.embed_stage!r} to embed the gallery with; "
                             "set params.embed_stage")
        embed = EmbedParams.model_validate(raw_embed)
        raw_detect = _stage_params(config, p.detect_stage)
        detect = DetectParams.model_validate(raw_detect) if raw_detect is not None else None
        kind = self._kind()
        sha = gallery_sha256(p.gallery, kind, p.storage_options, p.max_file_bytes)  # type: ignore[arg-type]
        if p.gallery_sha256 and p.gallery_sha256 != sha:
            raise ValueError(f"leakage: gallery {p.gallery} has sha256 {sha}, params.gallery_sha256 says "
                             f"{p.gallery_sha256}")
        backends = {"embed": {"backend": embed.backend, "options": dict(embed.options)},
                    "detect": ({"backend": detect.backend, "options": dict(detect.options)}
                               if detect is not None and kind != "embeddings" else None)}
        key = stable_hash([sha, kind, backends, self.version], 24)
        pointer_path = gallery_pointer_path(self.context.stage_id)
        old = json.loads(store.read_bytes(*pointer_path)) if store.exists(*pointer_path) else {}
        scored = store.list_files(MANIFESTS_DIR, self.context.stage_id, suffix=".parquet")
        if old and old.get("gallery_sha256") != sha and scored:
            # The stage's fingerprint covers its params, not the gallery's bytes: refuse to mix shards
            # scored against two galleries. Pinning the hash changes the params, so the runner re-runs us.
            raise ValueError(
                f"leakage: gallery {p.gallery} changed since {len(scored)} shard(s) of stage "
                f"{self.context.stage_id!r} were scored (sha256 {old.get('gallery_sha256')} -> {sha}); set "
                f"stages.{self.context.stage_id}.params.gallery_sha256={sha} and run with --force, or use --new")
        if old.get("key") == key and store.exists(*gallery_cache_path(key, GALLERY_INDEX)):
            facts = old["gallery"]
        else:
            args = (store.url, self.context.storage_options, p.model_dump(mode="json"), kind, sha, key,
                    backends["detect"], backends["embed"])
            facts = _run_once(args)
        space = facts["space"]
        cls = backend_class(embed.backend, "embedder")
        threshold = p.threshold if p.threshold is not None else defaults_for(space).verification
        if threshold is None:
            raise ValueError(f"leakage: no default threshold for space {space!r}; set params.threshold")
        pointer = {"key": key, "gallery_sha256": sha, "gallery": facts, "kind": kind, "path": p.gallery,
                   "threshold": float(threshold), "space": space, "metric": facts["metric"],
                   "embedder": f"{cls.__module__}:{cls.__name__}"}
        store.write_atomic(json.dumps(pointer, indent=2, sort_keys=True).encode(), *pointer_path)
        self._pointer = pointer

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        """The gallery must exist (nothing is read or embedded here)."""
        from facekit.gallery import guess_kind, tar_files

        p = params
        assert isinstance(p, LeakageParams)
        try:
            import fsspec

            fs, target = fsspec.core.url_to_fs(p.gallery, **p.storage_options)
            kind = guess_kind(p.gallery) if p.gallery_kind == "auto" else p.gallery_kind
            globbed = kind == "photos" and has_glob(posixpath.basename(target))
            found = bool(tar_files(p.gallery, p.storage_options)) if globbed else fs.exists(target)
        except Exception as exc:  # an unreachable store is a finding, never a crash
            return [f"leakage: cannot reach gallery {p.gallery} ({type(exc).__name__}: {exc})"]
        return [] if found else [f"leakage: gallery {p.gallery} does not exist (params.gallery)"]

    def pointer(self) -> dict[str, Any] | None:
        if self._pointer is None:
            store = self._store()
            path = gallery_pointer_path(self.context.stage_id)
            if store.exists(*path):
                self._pointer = json.loads(store.read_bytes(*path))
        return self._pointer

    def thresholds(self) -> dict[str, dict[str, float]]:
        ptr = self.pointer()
        if ptr is None:
            return {}
        bound = "max" if Metric(ptr["metric"]).higher_is_same else "min"
        return {SCORE: {bound: float(ptr["threshold"])}}

    # ------------------------------------------------------------------ per worker, per shard

    def setup(self) -> None:
        import faiss
        import pyarrow.parquet as pq

        ptr = self.pointer()
        if ptr is None:
            raise RuntimeError("leakage: no gallery prepared for this run (the runner calls prepare() first)")
        store = self._store()
        raw = store.read_bytes(*gallery_cache_path(ptr["key"], GALLERY_INDEX))
        self.index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
        table = pq.read_table(io.BytesIO(store.read_bytes(*gallery_cache_path(ptr["key"], GALLERY_TABLE))),
                              columns=["item", "identity"])
        self.items = table.column("item").to_pylist()
        self.identities = table.column("identity").to_pylist()
        self.metric = Metric(ptr["metric"])
        self.threshold = float(ptr["threshold"])
        self.space = ptr["space"]
        self.sha = ptr["gallery_sha256"]

    def process(self, batch: Batch) -> Batch:
        n = len(batch[SAMPLE_ID])
        rows = Rows(batch[SAMPLE_ID], (f.name for f in self.columns))
        vectors = batch.get("embedding") or [None] * n
        spaces = batch.get("embedding_space") or [None] * n
        todo = []
        for i in range(n):
            if vectors[i] is None:
                rows.fail(i, "no_embedding", "leakage needs embed upstream")
            elif spaces[i] != self.space:
                rows.fail(i, "embedding_space_mismatch", f"sample in {spaces[i]!r}, gallery in {self.space!r}")
            else:
                todo.append(i)
        if todo:
            q = np.asarray([vectors[i] for i in todo], dtype=np.float32)
            if self.metric.higher_is_same:
                q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
            raw, ids = self.index.search(np.ascontiguousarray(q), 1)
            scores = raw[:, 0] if self.metric.higher_is_same else np.sqrt(np.maximum(raw[:, 0], 0.0))
            for i, score, j in zip(todo, scores.tolist(), ids[:, 0].tolist(), strict=True):
                if j < 0:
                    continue
                rows.set(i, leakage_identity=self.identities[j], leakage_item=self.items[j],
                         leakage_score=float(score), leakage_gallery_sha256=self.sha)
                if self.metric.same(score, self.threshold):
                    rule, op = (("leakage_above_max", ">=") if self.metric.higher_is_same
                                else ("leakage_below_min", "<="))
                    rows.drop(i, rule, f"{score:.3f} {op} {self.threshold:.3f} to gallery item "
                                       f"{self.items[j]} (identity {self.identities[j]})")
        return rows.batch()

    # ------------------------------------------------------------------ once per run, after the shards

    def finish(self, store: Any) -> None:
        """The score distribution over the run, from the score column of this stage's manifests."""
        import pyarrow.parquet as pq

        ptr = self.pointer()
        if ptr is None:
            return
        metric = Metric(ptr["metric"])
        lo, hi = (-1.0, 1.0) if metric.higher_is_same else (0.0, 2.0)
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        counts = np.zeros(HIST_BINS, dtype=np.int64)
        n = flagged = 0
        for name in store.list_files(MANIFESTS_DIR, self.context.stage_id, suffix=".parquet"):
            with store.fs.open(store.path(MANIFESTS_DIR, self.context.stage_id, name), "rb") as fh:
                col = pq.read_table(fh, columns=[SCORE]).column(SCORE).to_numpy(zero_copy_only=False)
            s = np.asarray(col, dtype=np.float64)
            s = s[np.isfinite(s)]
            counts += np.histogram(np.clip(s, lo, hi), bins=edges)[0]
            n += s.size
            flagged += int(metric.same(s, ptr["threshold"]).sum())
        cdf = np.cumsum(counts) / max(n, 1)
        quantiles = {f"q{int(q * 100)}": float(edges[min(int(np.searchsorted(cdf, q)) + 1, HIST_BINS)])
                     for q in (0.5, 0.9, 0.99)} if n else {}
        self._write_summary(store, {"samples": n, "flagged": flagged, "histogram": {
            "edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
            "quantiles_upper_bin_edge": quantiles})

    def _write_summary(self, store: Any, distribution: dict[str, Any]) -> None:
        ptr = self.pointer() or {}
        doc = {"gallery": {k: ptr.get(k) for k in ("path", "kind", "gallery_sha256", "key")} | ptr.get("gallery", {}),
               "threshold": ptr.get("threshold"), "metric": ptr.get("metric"), "space": ptr.get("space"),
               "score_column": SCORE, "distribution": distribution}
        text = json.dumps(doc, indent=2, sort_keys=True).encode()
        store.write_atomic(text, *stage_summary_path(self.context.stage_id))


def _run_once(args: tuple[Any, ...]) -> dict[str, Any]:
    """Build the gallery in one Ray task when Ray is up (models load in a worker, not the driver)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a core dependency
        return _build_and_cache(*args)
    if not ray.is_initialized():
        return _build_and_cache(*args)
    task = ray.remote(num_cpus=1, max_retries=2)(_build_and_cache)
    facts: dict[str, Any] = ray.get(task.remote(*args))
    return facts
