"""Dedup: exact, perceptual and embedding near-duplicates, grouped, one sample kept per group.

Three kinds of evidence link two samples, strongest first:
- ``exact``: the same file bytes (content_sha256) or the same decoded pixels (pixel_sha256), from the
  fingerprint stage;
- ``phash``: 64-bit perceptual hashes within ``phash_max_distance`` bits (JPEG re-encodes, resizes);
- ``embedding``: identity embeddings within the space's near-duplicate threshold (the same face crop
  through different processing), via facekit.vector_index (exact FAISS for small runs, partitioned
  above ``exact_max``).
Links are unioned into groups (connected components). In each group one sample is kept by a fixed
rule -- highest ``prefer`` score if a quality column is named, then the largest image, then a lossless
encoding over a lossy one, then the smallest sample_id -- so reruns keep the same one. Every other
member is dropped with its group id, the kept sample's id and the kind of its strongest link.

Perceptual hashes of aligned faces of one identity can be close, so when embeddings are present a
pHash link counts only if the pair's embeddings also say "same identity" (``phash_confirm``).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import faiss
import numpy as np
import pyarrow as pa
from pydantic import Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from facekit.thresholds import Metric, defaults_for
from facekit.vector_index import EXACT_MAX, embedding_matrix, normalise_rows, range_pairs, space_of
from stages.base import SAMPLE_ID, Batch, GlobalStage, Params, Resources, StageContext, rows_ok, stable_hash
from stages.mappers.fingerprint import (
    CONTENT_SHA256,
    HEIGHT,
    IMAGE_FORMAT,
    LOSSLESS_FORMATS,
    PHASH,
    PIXEL_SHA256,
    WIDTH,
)

KINDS = ("exact", "phash", "embedding")  # strongest first
EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")


class DedupParams(Params):
    exact: bool = True
    # Tight by default: aligned or rendered faces share their low frequencies (measured on procedural
    # renders: re-encodes and downscales of one image within 2 bits, distinct images of one identity from
    # 4 bits, 1st percentile 6). Raise it for photo corpora with crops and edits (imagededup uses 10).
    phash_max_distance: int | None = Field(3, ge=0, le=32)  # None: no perceptual dedup
    phash_confirm: bool = True  # with embeddings: a pHash link also needs same-identity embeddings
    embeddings: bool = True  # embedding near-duplicates (needs the embed stage upstream)
    embedding_threshold: float | None = None  # None: the space's near_duplicate default
    prefer: str | None = None  # a score column, higher is better (e.g. a quality score)
    exact_max: int = Field(EXACT_MAX, ge=0)
    phash_exact_max: int = Field(100_000, ge=0)
    nprobe: int = Field(16, ge=1)


def phash_codes(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) uint8 codes of hex pHashes and the mask of rows that have one."""
    valid = np.array([v is not None for v in values], dtype=bool)
    ints = np.array([int(v, 16) if v is not None else 0 for v in values], dtype=np.uint64)
    return ints.view(np.uint8).reshape(-1, 8).copy(), valid


def hamming_pairs(codes: np.ndarray, max_distance: int, exact_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) within ``max_distance`` bits; exact at every size.

    Above ``exact_max`` rows a multi-index hash replaces the flat scan: 4 tables of 16 bits, probing
    every bucket within ``max_distance // 4`` flips -- by pigeonhole a pair within the distance agrees
    that closely on at least one table, so nothing is missed.
    """
    if len(codes) < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if len(codes) <= exact_max:
        index: faiss.IndexBinary = faiss.IndexBinaryFlat(64)
    else:
        index = faiss.IndexBinaryMultiHash(64, 4, 16)
        index.nflip = max_distance // 4
    index.add(codes)
    lims, _, ids = index.range_search(codes, max_distance + 1)  # binary range search keeps d < radius
    rows = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims.astype(np.int64)))
    ids = ids.astype(np.int64)
    keep = rows < ids
    return rows[keep], ids[keep]


def equal_value_pairs(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Chains linking rows with the same non-null value (enough for connected components)."""
    first: dict[str, int] = {}
    a, b = [], []
    for row, v in enumerate(values):
        if v is None:
            continue
        if v in first:
            a.append(first[v])
            b.append(row)
        else:
            first[v] = row
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def _whole_image_edge_filter(table: pa.Table) -> Any:
    """Byte, pixel and pHash fingerprints describe the whole image they were taken on. Faces derived
    from one photo all inherit that photo's fingerprint, so for derived samples a link only holds
    between the same face (same rank among its siblings) of two different photos, never between
    siblings."""
    n = table.num_rows
    parents = table.column("parent_id").to_pylist() if "parent_id" in table.column_names else [None] * n
    if not any(parents):
        return lambda a, b: (a, b)
    keys = table.column("key").to_pylist() if "key" in table.column_names else [""] * n
    siblings: dict[str, list[int]] = {}
    for i, par in enumerate(parents):
        if par:
            siblings.setdefault(par, []).append(i)
    rank = np.full(n, -1, dtype=np.int64)
    for members in siblings.values():
        for r, i in enumerate(sorted(members, key=lambda i: (keys[i] or "", i))):
            rank[i] = r
    parent_arr = np.asarray([p or "" for p in parents], dtype=object)

    def keep(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        derived = (parent_arr[a] != "") | (parent_arr[b] != "")
        ok = ~derived | ((rank[a] == rank[b]) & (parent_arr[a] != parent_arr[b]))
        return a[ok], b[ok]

    return keep


class DedupStage(GlobalStage):
    """Groups duplicates of every kind and keeps one sample per group by a deterministic rule."""

    name: ClassVar[str] = "dedup"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = DedupParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    # What every configuration reads; an instance adds embeddings and the ``prefer`` column (see __init__).
    needs: ClassVar[tuple[str, ...]] = (CONTENT_SHA256, PIXEL_SHA256, PHASH)
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("dup_group_id", pa.string()),
        pa.field("dup_group_size", pa.int32()),
        pa.field("dup_kind", pa.string()),  # strongest link of this sample: exact / phash / embedding
        pa.field("kept_sample_id", pa.string()),
    )

    params: DedupParams
    _summary: dict[str, Any]

    def __init__(self, params: Params, context: StageContext) -> None:
        super().__init__(params, context)
        p = self.params
        needs: list[str] = []
        if p.exact:
            needs += [CONTENT_SHA256, PIXEL_SHA256]
        if p.phash_max_distance is not None:
            needs.append(PHASH)
        needs += [WIDTH, HEIGHT, IMAGE_FORMAT]
        if p.embeddings or (p.phash_max_distance is not None and p.phash_confirm):
            needs += list(EMBEDDING_COLUMNS)
        if p.prefer:
            needs.append(p.prefer)
        self.needs = tuple(needs)  # per instance: what these params actually read

    def summary(self) -> dict[str, Any]:
        return dict(getattr(self, "_summary", {}))

    def run_global(self, table: pa.Table) -> Batch:
        p = self.params
        n = table.num_rows
        ids = table.column(SAMPLE_ID).to_pylist()
        out = rows_ok(ids)
        for f in self.columns:
            out[f.name] = [None] * n
        if n == 0:
            self._summary = {"groups": 0, "dropped": 0}
            return out
        cols = set(table.column_names)
        edges: list[tuple[np.ndarray, np.ndarray, int]] = []  # (i, j, kind rank)

        keep_edge = _whole_image_edge_filter(table)
        if p.exact:
            for col in (CONTENT_SHA256, PIXEL_SHA256):
                if col in cols:
                    a, b = keep_edge(*equal_value_pairs(table.column(col).to_pylist()))
                    edges.append((a, b, 0))

        x, metric, same_identity, embed_threshold = self._embeddings(table)
        if p.phash_max_distance is not None and PHASH in cols:
            codes, has = phash_codes(table.column(PHASH).to_pylist())
            rows = np.flatnonzero(has)
            a, b = hamming_pairs(codes[rows], p.phash_max_distance, p.phash_exact_max)
            a, b = keep_edge(rows[a], rows[b])
            if p.phash_confirm and x is not None and metric is not None and same_identity is not None:
                ok = metric.same(metric.score(x[a], x[b]), same_identity)
                both = ~np.isnan(x[a, 0]) & ~np.isnan(x[b, 0])
                a, b = a[ok | ~both], b[ok | ~both]
            edges.append((a, b, 1))
        if p.embeddings and x is not None and metric is not None and embed_threshold is not None:
            rows = np.flatnonzero(~np.isnan(x[:, 0]))
            pairs = range_pairs(
                x[rows],
                metric,
                embed_threshold,
                exact_max=p.exact_max,
                nprobe=p.nprobe,
                seed=self.context.seed,
            )
            edges.append((rows[pairs.i], rows[pairs.j], 2))

        a = np.concatenate([e[0] for e in edges]) if edges else np.empty(0, dtype=np.int64)
        b = np.concatenate([e[1] for e in edges]) if edges else np.empty(0, dtype=np.int64)
        kind = (
            np.concatenate([np.full(e[0].size, e[2]) for e in edges])
            if edges
            else np.empty(0, dtype=np.int64)
        )
        strongest = np.full(n, len(KINDS), dtype=np.int64)
        np.minimum.at(strongest, a, kind)
        np.minimum.at(strongest, b, kind)
        graph = coo_matrix((np.ones(a.size), (a, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)

        rank = self._keep_rank(table, ids)
        order = np.lexsort((rank, comp))  # by component, best candidate first
        starts = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1]])
        bounds = np.r_[starts, n]
        groups = dropped = 0
        for s, e in itertools.pairwise(bounds):
            if e - s < 2:
                continue
            members = order[s:e]
            kept = int(members[0])
            group_id = "dup-" + stable_hash([min(ids[m] for m in members)], 12)
            groups += 1
            for m in members.tolist():
                out["dup_group_id"][m] = group_id
                out["dup_group_size"][m] = int(e - s)
                out["dup_kind"][m] = KINDS[strongest[m]]
                out["kept_sample_id"][m] = ids[kept]
                if m != kept:
                    out["keep"][m] = False
                    out["reason"][m] = f"duplicate ({KINDS[strongest[m]]}) of {ids[kept]}"
                    dropped += 1
        self._summary = {
            "groups": groups,
            "dropped": dropped,
            "links": {k: int((kind == r).sum()) for r, k in enumerate(KINDS)},
            "embedding_threshold": embed_threshold,
            "phash_max_distance": p.phash_max_distance,
        }
        return out

    def _embeddings(
        self, table: pa.Table
    ) -> tuple[np.ndarray | None, Metric | None, float | None, float | None]:
        """Vectors (NaN rows where missing), metric, same-identity and near-duplicate thresholds."""
        if not set(EMBEDDING_COLUMNS) <= set(table.column_names):
            return None, None, None, None
        x, valid = embedding_matrix(table)
        if not valid.any():
            return None, None, None, None
        space, metric = space_of(table, valid)
        if metric.higher_is_same:
            x = normalise_rows(x)
        x = x.astype(np.float32)
        x[~valid] = np.nan
        defaults = defaults_for(space)
        near = self.params.embedding_threshold
        return x, metric, defaults.same_identity, defaults.near_duplicate if near is None else float(near)

    def _keep_rank(self, table: pa.Table, ids: list[str]) -> np.ndarray:
        """Rank of each row as its group's keeper, 0 = best: preferred score, area, lossless, sample_id."""
        n = table.num_rows
        cols = set(table.column_names)
        keys: list[np.ndarray] = [np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"))]
        if IMAGE_FORMAT in cols:
            fmt = table.column(IMAGE_FORMAT).to_pylist()
            keys.append(np.array([0 if f in LOSSLESS_FORMATS else 1 for f in fmt], dtype=np.int64))
        if WIDTH in cols and HEIGHT in cols:
            w = np.array([v or 0 for v in table.column(WIDTH).to_pylist()], dtype=np.int64)
            h = np.array([v or 0 for v in table.column(HEIGHT).to_pylist()], dtype=np.int64)
            keys.append(-(w * h))
        if self.params.prefer and self.params.prefer in cols:
            raw = table.column(self.params.prefer).to_pylist()
            score = np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)
            keys.append(-np.nan_to_num(score, nan=-np.inf))
        order = np.lexsort(keys)  # the last key is the primary one
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        return rank
