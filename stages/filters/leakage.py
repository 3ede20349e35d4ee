"""leakage: drop samples that look like a person of a reference gallery (an evaluation set, real
training identities), so a synthetic dataset does not contain the people it is evaluated on.

The gallery is embedded with the run's own detector and embedder (the params of the ``detect_stage``
and ``embed_stage`` of the frozen run config), so gallery and samples share one embedding space; a
Parquet gallery of embeddings must be in that space. It is embedded and indexed ONCE per run, in
``prepare`` (the runner calls it in the driver before any shard runs; the work itself runs as one Ray
task), and cached under the run directory keyed by the gallery's content hash and the backends used
(manifests.layout.gallery_cache_path), so a resumed or re-run run reuses it.

What is judged. A labelled row (``unit: identity``, the default) is judged by its identity: the
centroid of all the identity's images against the nearest gallery item, and every image of a leaked
identity goes (``leakage_identity_above_max``; ``_below_min`` in a distance space). One image of a
synthetic identity varies too much to decide alone (quickstart renders, SFace: images of one identity
down to cosine 0.61, of two distinct identities up to 0.79), while the centroid averages pose, light
and the per-image perturbation away (leaked identities 0.93-0.96 to their gallery render, innocent ones
at most 0.74), and an identity that resembles an evaluation person is leaked as a whole, not image by
image. An unlabelled row, or any row with ``unit: sample``, is judged by its own nearest gallery item
(``leakage_above_max`` / ``_below_min``).

Thresholds that fit the domain. A space's published same-person point (facekit.thresholds: SFace 0.363
on LFW) flags nearly every render (distinct renders sit at SFace cosine 0.4-0.8), so by default
(``fit_far``) the threshold is fitted at that false-match rate from comparisons known to be between
different people: for identities, each sampled identity centroid against sampled images of the run's
other identities (synthetic identities are labels by construction; an ingested run's identity_id comes
from its source); for single images, pairs of images of distinct identities of the run, or, when the
run has no labels, pairs of gallery items of distinct gallery identities. The fit only ever makes the
gate stricter than the published point (facekit.thresholds.fit_from_impostors), so fitting never flags
a pair the embedder itself calls two people. ``threshold`` sets both values; ``fit_far: null`` uses the
published point. The rate is per comparison: a sample is compared with every gallery item, so at most
about ``rate x gallery items`` of the innocent samples (or identities) are flagged (in the summary).

Why a global stage. The fit needs the run's embeddings, which exist only once embed has run over
every shard, while ``prepare`` runs before any shard; a streaming filter's workers see one shard. As
a global stage it starts after its upstream has committed everything, and composes bounded steps
(stages.base.Corpus): a map returns a seeded sample of at most ``fit_max_samples`` images; identity
sums go through a shuffle by identity, each partition scores its centroids against the gallery and
sends the scores back to the shards that hold each identity, and returns a seeded sample of identity
sums; the driver fits on those samples (at most ``fit_max_pairs`` impostor pairs); each shard then
commits. Decisions are a pure function of the committed upstream and the seed, so a resumed run
recomputes the same thresholds and commits only the missing shards. The thresholds and how they were
made go to ``cache/gallery/<stage>.fit.json`` before any shard commits, and every row stores the
threshold it was decided with and its source.

Every row stores the nearest gallery identity and item of the comparison that decided it, its score
(in the space's metric), what was compared (``leakage_basis``), the image's own nearest score and the
gallery's hash. ``finish`` writes ``report/<stage>.summary.json``: the gallery, the thresholds with
their rate and impostor-pair counts, and the score distribution (fixed-bin histogram and quantiles,
read from the score column of the manifests only).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.thresholds import Metric, defaults_for, distinct_label_pairs, fit_from_impostors, pair_scores_from_labels
from facekit.userconfig import load_yaml
from facekit.vector_index import deserialize_index, embedding_matrix, group_sums, normalise_rows
from manifests.layout import (
    GALLERY_INDEX,
    GALLERY_TABLE,
    MANIFESTS_DIR,
    RUN_FILE,
    gallery_cache_path,
    gallery_fit_path,
    gallery_pointer_path,
    stage_summary_path,
)
from manifests.sql import has_glob
from stages.base import (
    IDENTITY_ID,
    SAMPLE_ID,
    Batch,
    Corpus,
    GlobalStage,
    Params,
    Resources,
    Rows,
    StageContext,
    stable_hash,
)
from stages.corpus.components import key_partition, split_by
from stages.corpus.consistency import centroids_from_sums
from stages.corpus.identities import matrix, names, plan_identity_partitions, runs, vectors

SCORE = "leakage_score"
HIST_BINS = 40
EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")
BASIS_IDENTITY, BASIS_SAMPLE = "identity", "sample"


class LeakageParams(Params):
    gallery: str = Field(description="reference gallery: a folder or tar glob of photos, an insightface .bin, "
                                     "or a Parquet file of embeddings with identity labels (path or fsspec URL)")
    gallery_kind: Literal["auto", "photos", "bin", "embeddings"] = Field(
        "auto", description="auto: .bin -> bin, .parquet -> embeddings, otherwise photos")
    unit: Literal["identity", "sample"] = Field(
        "identity", description="identity: a labelled sample is judged by its identity's centroid and a leaked "
                                "identity goes whole; sample: every sample by its own score (unlabelled "
                                "samples always are)")
    threshold: float | None = Field(None, description="score at which a sample is leaked, in the space's metric; "
                                                      "None: fitted (fit_far) or the space's verification point")
    fit_far: float | None = Field(
        1e-3, gt=0.0, lt=1.0, description=
        "fit the threshold at this false-match rate per comparison from pairs of distinct identities of the run "
        "(of the gallery when the run has no labels), never looser than the space's verification point; "
        "null: the verification point")
    fit_max_samples: int = Field(4096, ge=16, description="images (and identities) sampled, by seed, to fit from")
    fit_max_pairs: int = Field(200_000, ge=100, description="impostor pairs scored to fit a threshold")
    detect_stage: str = Field("detect", description="the run stage whose detector embeds gallery photos")
    embed_stage: str = Field("embed", description="the run stage whose embedder embeds the gallery")
    gallery_sha256: str | None = Field(None, description="refuse the run unless the gallery has this hash")
    max_file_bytes: int = Field(64 << 20, ge=1, description="gallery files larger than this are skipped")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of the gallery")
    partitions: int | None = Field(None, ge=1, description="identity partitions; null: sized from the run")


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


class LeakageStage(GlobalStage):
    """Drops samples that look like a person of a reference gallery (an evaluation set) the run must not contain."""

    name: ClassVar[str] = "leakage"
    version: ClassVar[str] = "2"
    params_model: ClassVar[type[Params]] = LeakageParams
    resources: ClassVar[Resources] = Resources(cpus=1.0, memory_gb=1.0)
    needs: tuple[str, ...] = EMBEDDING_COLUMNS
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("leakage_identity", pa.string()),  # gallery identity of the deciding comparison
        pa.field("leakage_item", pa.string()),  # its gallery item (file, pair-set image, row)
        pa.field(SCORE, pa.float32()),  # the deciding score in the space's metric (cosine: similarity)
        pa.field("leakage_basis", pa.string()),  # identity: the sample's identity centroid; sample: the sample
        pa.field("leakage_sample_nearest", pa.float32()),  # the sample's own nearest-gallery score
        pa.field("leakage_gallery_sha256", pa.string()),
        pa.field("threshold", pa.float32()),  # the threshold the row was decided with
        pa.field("threshold_source", pa.string()),
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
        if p.threshold is None and _published(space) is None:
            raise ValueError(f"leakage: no verification threshold known for space {space!r}, so no floor to fit "
                             "above; set params.threshold")
        cls = backend_class(embed.backend, "embedder")
        pointer = {"key": key, "gallery_sha256": sha, "gallery": facts, "kind": kind, "path": p.gallery,
                   "space": space, "metric": facts["metric"], "embedder": f"{cls.__module__}:{cls.__name__}"}
        store.write_atomic(json.dumps(pointer, indent=2, sort_keys=True).encode(), *pointer_path)
        self._pointer = pointer
        if not scored:  # thresholds of an earlier config describe no shard of this one
            store.remove(*gallery_fit_path(self.context.stage_id))

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

    def fit(self) -> dict[str, Any] | None:
        """The thresholds this run decided with (``cache/gallery/<stage>.fit.json``), once the stage ran."""
        store = self._store()
        path = gallery_fit_path(self.context.stage_id)
        return json.loads(store.read_bytes(*path)) if store.exists(*path) else None

    # ------------------------------------------------------------------ the run, as distributed steps

    def distributed(self) -> bool:
        return True

    def run_corpus(self, corpus: Corpus) -> None:
        p = self.params
        ptr = self.pointer()
        if ptr is None:
            raise RuntimeError("leakage: no gallery prepared for this run (the runner calls prepare() first)")
        metric = Metric(ptr["metric"])
        base = {"space": ptr["space"], "metric": metric, "seed": self.context.seed, "parts": 1}
        quota = max(1, math.ceil(p.fit_max_samples / max(len(corpus.shards), 1)))
        census = corpus.map(_census, EMBEDDING_COLUMNS, base, quota)
        x, labels = _sample_of(census, metric)
        _, gallery = corpus.call(_gallery_arrays, ptr["key"], self.context.run_dir, self.context.storage_options,
                                 kept=True, convert=_open_gallery)
        by_identity = p.unit == BASIS_IDENTITY and any(c["labelled"] for c in census)
        sampled: list[dict[str, Any]] = []
        if by_identity:
            d = max(c["dim"] for c in census)
            base["parts"] = plan_identity_partitions(corpus, census, p.partitions, 4 * 8 * d + 64)
            corpus.shuffle("members", _identity_sums, EMBEDDING_COLUMNS, base)
            id_quota = max(1, math.ceil(p.fit_max_samples / corpus.partitions))
            sampled = corpus.reshuffle("back", "members", _identity_scores, base, gallery, id_quota)
            corpus.discard("members")
        fits = {BASIS_SAMPLE: self._fit_samples(ptr, x, labels)}
        if by_identity:
            fits[BASIS_IDENTITY] = self._fit_identities(ptr, x, labels, sampled)
        items = int(ptr["gallery"]["items"])
        for f in fits.values():
            if f.get("fit"):
                f["innocent_flag_rate_bound"] = min(1.0, float(f["fit"]["far"]) * items)
        doc = {"fit_far": p.fit_far, "seed": self.context.seed, "gallery_items": items, "thresholds": fits}
        self._store().write_atomic(json.dumps(doc, indent=2, sort_keys=True).encode(),
                                   *gallery_fit_path(self.context.stage_id))
        limits = {k: (float(v["threshold"]), str(v["source"])) for k, v in fits.items()}
        if by_identity:
            corpus.commit(_commit, base, limits, gallery, ptr["gallery_sha256"], side="back")
        else:
            corpus.commit(_commit_samples, base, limits, gallery, ptr["gallery_sha256"])

    def _fixed(self, space: str) -> dict[str, Any] | None:
        """The threshold when nothing is fitted: the param, or the published point with ``fit_far: null``."""
        p = self.params
        if p.threshold is not None:
            return {"threshold": float(p.threshold), "source": "param", "fit": None}
        if p.fit_far is None:
            return {"threshold": _published(space), "source": f"default:{space}", "fit": None}
        return None

    def _fitted(self, space: str, metric: Metric, impostor: np.ndarray, genuine: np.ndarray,
                what: str) -> dict[str, Any]:
        far = self.params.fit_far
        assert far is not None
        if impostor.size == 0:
            return {"threshold": _published(space), "source": f"default:{space} (no {what} to fit from)", "fit": None}
        fit = fit_from_impostors(impostor, metric, far, genuine=genuine, floor=_published(space))
        floored = "; the verification point is stricter" if fit.threshold == fit.floor else ""
        return {"threshold": fit.threshold, "source": f"fit_far={far:g} on {fit.n_impostor} {what}{floored}",
                "fit": fit.as_dict()}

    def _fit_samples(self, ptr: dict[str, Any], x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Images against images: pairs of the run's distinct identities, else of the gallery's."""
        p, space, metric = self.params, ptr["space"], Metric(ptr["metric"])
        fixed = self._fixed(space)
        if fixed is not None:
            return fixed
        lab = labels != ""
        if np.unique(labels[lab]).size >= 2:
            gen, imp = pair_scores_from_labels(x[lab], labels[lab], metric, p.fit_max_pairs, self.context.seed)
            return self._fitted(space, metric, imp, gen, "image pairs of distinct identities of the run")
        gx, gl = _gallery_sample(self._store(), ptr["key"], p.fit_max_samples, self.context.seed, metric)
        gen, imp = pair_scores_from_labels(gx, gl, metric, p.fit_max_pairs, self.context.seed)
        return self._fitted(space, metric, imp, gen, "gallery item pairs of distinct gallery identities")

    def _fit_identities(self, ptr: dict[str, Any], x: np.ndarray, labels: np.ndarray,
                        sampled: list[dict[str, Any]]) -> dict[str, Any]:
        """Identity centroids against images of other identities of the run (the statistic the decision
        uses: a centroid against one gallery image); genuine: each sampled image against its identity's
        centroid without itself."""
        p, space, metric = self.params, ptr["space"], Metric(ptr["metric"])
        fixed = self._fixed(space)
        if fixed is not None:
            return fixed
        sampled = [s for s in sampled if len(s["identities"])]  # a partition may hold no identity
        ids = np.concatenate([s["identities"] for s in sampled]) if sampled else np.empty(0, dtype=object)
        if ids.size > p.fit_max_samples:
            pick = np.sort(np.random.default_rng(self.context.seed).choice(ids.size, p.fit_max_samples, replace=False))
        else:
            pick = np.arange(ids.size)
        ids = ids[pick].astype(str)
        if ids.size == 0:
            return self._fitted(space, metric, np.empty(0), np.empty(0), "identity centroids")
        sums = np.concatenate([s["sums"] for s in sampled])[pick]
        counts = np.concatenate([s["counts"] for s in sampled])[pick]
        cents = centroids_from_sums(sums, counts, metric)
        lab = labels != ""
        xl, ll = x[lab], labels[lab]
        i, j = distinct_label_pairs(ids, ll, p.fit_max_pairs, self.context.seed)
        impostor = metric.score(cents[i], xl[j])
        at = {name: k for k, name in enumerate(ids.tolist())}
        rows = np.asarray([at.get(name, -1) for name in ll.tolist()], dtype=np.int64)
        own = (rows >= 0) & (counts[np.maximum(rows, 0)] >= 2)
        genuine = np.empty(0)
        if own.any():
            r = rows[own]
            loo = (sums[r] - xl[own]) / (counts[r] - 1)[:, None]
            loo = centroids_from_sums(loo, np.ones(r.size), metric)
            genuine = metric.score(loo, xl[own])
        return self._fitted(space, metric, impostor, genuine, "identity centroid x image pairs of distinct identities")

    # ------------------------------------------------------------------ once per run, after the shards

    def finish(self, store: Any) -> None:
        """The thresholds and the score distribution over the run, from the score column of the manifests."""
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
                t = pq.read_table(fh, columns=[SCORE, "reason"])
            s = np.asarray(t.column(SCORE).to_numpy(zero_copy_only=False), dtype=np.float64)
            s = s[np.isfinite(s)]
            counts += np.histogram(np.clip(s, lo, hi), bins=edges)[0]
            n += s.size
            flagged += sum(1 for r in t.column("reason").to_pylist() if r in RULES)
        cdf = np.cumsum(counts) / max(n, 1)
        quantiles = {f"q{int(q * 100)}": float(edges[min(int(np.searchsorted(cdf, q)) + 1, HIST_BINS)])
                     for q in (0.5, 0.9, 0.99)} if n else {}
        fit = self.fit() or {}
        thresholds = fit.get("thresholds", {})
        main = thresholds.get(BASIS_IDENTITY) or thresholds.get(BASIS_SAMPLE) or {}
        doc = {"gallery": {k: ptr.get(k) for k in ("path", "kind", "gallery_sha256", "key")} | ptr.get("gallery", {}),
               "threshold": main.get("threshold"), "threshold_source": main.get("source"), "unit": self.params.unit,
               "thresholds": thresholds, "fit_far": fit.get("fit_far"), "metric": ptr.get("metric"),
               "space": ptr.get("space"), "score_column": SCORE,
               "distribution": {"samples": n, "flagged": flagged,
                                "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
                                "quantiles_upper_bin_edge": quantiles}}
        store.write_atomic(json.dumps(doc, indent=2, sort_keys=True).encode(),
                           *stage_summary_path(self.context.stage_id))


RULES = {"leakage_above_max", "leakage_below_min", "leakage_identity_above_max", "leakage_identity_below_min"}


def _published(space: str) -> float | None:
    """The space's published same-person point (the floor of every fit), None for a space without one."""
    try:
        return defaults_for(space).verification
    except KeyError:
        return None


def _in_space(table: pa.Table, space: str, metric: Metric) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, unit length in cosine spaces; rows with a vector in the gallery's space; labels, "" where none)."""
    x, valid = embedding_matrix(table)
    spaces = np.asarray(table.column("embedding_space").to_pylist(), dtype=object)
    ok = valid & (spaces == space)
    if metric.higher_is_same and ok.any():
        x = normalise_rows(x)
    labels = np.asarray([v or "" for v in table.column(IDENTITY_ID).to_pylist()], dtype=object).astype(str)
    return x.astype(np.float32, copy=False), ok, labels


def _census(table: pa.Table, index: int, base: dict[str, Any], quota: int) -> dict[str, Any]:
    """One shard's counts and a seeded sample of at most ``quota`` of its images (vectors and labels)."""
    x, ok, labels = _in_space(table, base["space"], base["metric"])
    rows = np.flatnonzero(ok)
    pick = np.sort(np.random.default_rng([base["seed"], index]).permutation(rows.size)[:quota])
    labelled = ok & (labels != "")
    return {"dim": int(x.shape[1]), "labelled": int(labelled.sum()),
            "identities": int(np.unique(labels[labelled]).size),
            "x": np.ascontiguousarray(x[rows[pick]]), "labels": labels[rows[pick]]}


def _sample_of(census: list[dict[str, Any]], metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    with_rows = [c for c in census if len(c["labels"])]
    if not with_rows:
        return np.zeros((0, 0), dtype=np.float32), np.empty(0, dtype=str)
    return np.concatenate([c["x"] for c in with_rows]), np.concatenate([c["labels"] for c in with_rows])


def _identity_sums(table: pa.Table, index: int, base: dict[str, Any]) -> dict[Any, pa.Table]:
    """Sum and count of each identity's images in this shard, keyed by the identity's partition."""
    x, ok, labels = _in_space(table, base["space"], base["metric"])
    rows = np.flatnonzero(ok & (labels != ""))
    if rows.size == 0:
        return {}
    own, inv = np.unique(labels[rows], return_inverse=True)
    sums = group_sums(inv.ravel(), x[rows], own.size)
    return dict(split_by(key_partition(own, base["parts"]), {
        "identity": own, "shard": np.full(own.size, index, dtype=np.int64), "sum": vectors(sums),
        "count": np.bincount(inv.ravel(), minlength=own.size)}))


def _identity_scores(table: pa.Table | None, part: int, base: dict[str, Any], gallery: dict[str, Any],
                     quota: int) -> tuple[dict[Any, pa.Table], dict[str, Any]]:
    """One identity partition: each identity's centroid against the gallery, sent back to every shard that
    holds it; and a seeded sample of at most ``quota`` identities' sums and counts (the fit's)."""
    empty = {"identities": np.empty(0, dtype=object), "sums": np.zeros((0, 0)), "counts": np.empty(0)}
    if table is None or table.num_rows == 0:
        return {}, empty
    table, starts, inv = runs(table)
    ids = names(table.column("identity"))[starts]
    sums = np.add.reduceat(matrix(table.column("sum")), starts, axis=0)
    counts = np.add.reduceat(table.column("count").to_numpy(), starts)
    scores, nearest = _nearest(gallery, centroids_from_sums(sums, counts, base["metric"]), base["metric"])
    back = split_by(table.column("shard").to_numpy(), {
        "identity": table.column("identity"), "score": scores[inv], "nearest": nearest[inv]})
    pick = np.sort(np.random.default_rng([base["seed"], part]).permutation(ids.size)[:quota])
    return dict(back), {"identities": ids[pick], "sums": sums[pick], "counts": counts[pick]}


def _gallery_arrays(key: str, run_dir: str, storage_options: dict[str, Any]) -> tuple[None, dict[str, Any]]:
    """The cached gallery's index (bytes) and names, read once and left in the object store for the tasks."""
    import pyarrow.parquet as pq

    from manifests.storage import RunStorage

    store = RunStorage(run_dir, storage_options)
    raw = np.frombuffer(store.read_bytes(*gallery_cache_path(key, GALLERY_INDEX)), dtype=np.uint8)
    table = pq.read_table(io.BytesIO(store.read_bytes(*gallery_cache_path(key, GALLERY_TABLE))),
                          columns=["item", "identity"])
    return None, {"index": raw, "items": table.column("item").to_pylist(),
                  "identities": table.column("identity").to_pylist()}


def _open_gallery(value: dict[str, Any]) -> dict[str, Any]:
    return {**value, "index": deserialize_index(value["index"])}


def _gallery_sample(store: Any, key: str, limit: int, seed: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` gallery vectors (seeded) with their identities: the fit when the run has no labels."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(*gallery_cache_path(key, GALLERY_TABLE))),
                          columns=["embedding", "identity"])
    if table.num_rows > limit:
        table = table.take(pa.array(np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:limit])))
    x, _ = embedding_matrix(table)
    if metric.higher_is_same and len(x):
        x = normalise_rows(x)
    return x.astype(np.float32), np.asarray(table.column("identity").to_pylist(), dtype=object).astype(str)


def _nearest(gallery: dict[str, Any], q: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Score of and row of the nearest gallery item to each query vector (-1 where the index has none)."""
    if len(q) == 0:
        return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
    raw, ids = gallery["index"].search(np.ascontiguousarray(q, dtype=np.float32), 1)
    scores = raw[:, 0] if metric.higher_is_same else np.sqrt(np.maximum(raw[:, 0], 0.0))
    return scores.astype(np.float32), ids[:, 0].astype(np.int64)


def _commit_samples(table: pa.Table, index: int, *args: Any) -> Batch:
    """``_commit`` of a run judged image by image (no identity scores come back)."""
    return _commit(table, index, None, *args)


def _commit(table: pa.Table, index: int, back: pa.Table | None, base: dict[str, Any],
            limits: dict[str, tuple[float, str]], gallery: dict[str, Any], sha: str) -> Batch:
    """One shard's rows: each sample's own nearest gallery item, its identity's (from ``back``) where it is
    judged by identity, and the decision."""
    metric, space = base["metric"], base["space"]
    stage_columns = [f.name for f in LeakageStage.columns]
    rows = Rows(table.column(SAMPLE_ID).to_pylist(), stage_columns)
    x, ok, labels = _in_space(table, space, metric)
    valid = embedding_matrix(table)[1]
    spaces = table.column("embedding_space").to_pylist()
    for i in np.flatnonzero(~ok).tolist():
        if not valid[i]:
            rows.fail(i, "no_embedding", "leakage needs embed upstream")
        else:
            rows.fail(i, "embedding_space_mismatch", f"sample in {spaces[i]!r}, gallery in {space!r}")
    todo = np.flatnonzero(ok)
    own, own_at = _nearest(gallery, x[todo], metric)
    by_id: dict[str, tuple[float, int]] = {}
    if back is not None:
        by_id = dict(zip(back.column("identity").to_pylist(),
                         zip(back.column("score").to_pylist(), back.column("nearest").to_pylist(), strict=True),
                         strict=True))
    above = metric.higher_is_same
    for k, i in enumerate(todo.tolist()):
        label = labels[i]
        basis = BASIS_IDENTITY if label and label in by_id else BASIS_SAMPLE
        score, at = by_id[label] if basis == BASIS_IDENTITY else (float(own[k]), int(own_at[k]))
        if at < 0:
            continue
        threshold, source = limits[basis]
        rows.set(i, leakage_identity=gallery["identities"][at], leakage_item=gallery["items"][at],
                 leakage_score=float(score), leakage_basis=basis, leakage_sample_nearest=float(own[k]),
                 leakage_gallery_sha256=sha, threshold=threshold, threshold_source=source)
        if metric.same(score, threshold):
            op = ">=" if above else "<="
            rule = ("leakage_identity" if basis == BASIS_IDENTITY else "leakage") + (
                "_above_max" if above else "_below_min")
            what = f"identity {label} centroid" if basis == BASIS_IDENTITY else "sample"
            rows.drop(i, rule, f"{what} {score:.3f} {op} {threshold:.3f} to gallery item "
                               f"{gallery['items'][at]} (identity {gallery['identities'][at]})")
    return rows.batch()


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
