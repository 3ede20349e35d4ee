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
from facekit.vector_index import (
    EXACT_MAX,
    assign_cells,
    cell_pairs,
    default_nlist,
    embedding_matrix,
    normalise_rows,
    one_space,
    range_pairs,
    range_rows,
    space_of,
    table_spaces,
    train_cells,
)
from stages.base import (
    SAMPLE_ID,
    Batch,
    Corpus,
    GlobalStage,
    Params,
    Resources,
    Rows,
    StageContext,
    ordinals,
    rows_ok,
    stable_hash,
)
from stages.corpus.components import key_partition
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
DUPLICATE = "duplicate_of"  # the rule; the detail names the link kind and the kept sample
EMBEDDING_COLUMNS = ("embedding", "embedding_space", "embedding_metric")


class DedupParams(Params):
    exact: bool = Field(True, description="byte-identical and pixel-identical images are duplicates")
    # Tight by default: aligned or rendered faces share their low frequencies (measured on procedural
    # renders: re-encodes and downscales of one image within 2 bits, distinct images of one identity from
    # 4 bits, 1st percentile 6). Raise it for photo corpora with crops and edits (imagededup uses 10).
    phash_max_distance: int | None = Field(
        3, ge=0, le=32, description=
        "pHash Hamming distance at or below which images are duplicates; null: no perceptual dedup")
    phash_confirm: bool = Field(True, description="with embeddings: a pHash link also needs same-identity embeddings")
    embeddings: bool = Field(True, description="embedding near-duplicates (needs the embed stage upstream)")
    embedding_threshold: float | None = Field(
        None, description="near-duplicate score in the space's metric; null: the space's default")
    prefer: str | None = Field(
        None, description=
        "a score column, higher is better, that picks the sample kept of each group (e.g. a quality score)")
    exact_max: int = Field(
        EXACT_MAX, ge=0, description=
        "up to this many vectors the near-duplicate search is exact, above it per k-means cell")
    phash_exact_max: int = Field(
        100_000, ge=0, description="up to this many hashes per band pHash pairs are compared all against all")
    nprobe: int = Field(16, ge=1, description="IVF cells probed by an approximate search")
    # Distributed near-duplicate search (SemDeDup): every vector joins its ``spill`` nearest k-means
    # cells and pairs are searched exactly inside each cell; a near-duplicate pair is missed only when
    # the two copies share none of their ``spill`` nearest cells.
    spill: int = Field(
        2, ge=1, le=8, description="k-means cells each vector joins; a pair is missed only when the copies share none")
    cells: int | None = Field(
        None, ge=1, description=
        "k-means cells of the distributed search; null: about 2 sqrt(n) above exact_max, one below")
    partitions: int | None = Field(None, ge=1, description="shuffle partitions; null: from the row count")


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
    rows = range_rows(lims)
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
    needs: tuple[str, ...] = (CONTENT_SHA256, PIXEL_SHA256, PHASH)
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
        out["detail"] = [None] * n
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
                    out["reason"][m] = DUPLICATE
                    out["detail"][m] = f"{KINDS[strongest[m]]}: {ids[kept]}"
                    dropped += 1
        self._summary = {
            "groups": groups,
            "dropped": dropped,
            "links": {k: int((kind == r).sum()) for r, k in enumerate(KINDS)},
            "embedding_threshold": embed_threshold,
            "phash_max_distance": p.phash_max_distance,
        }
        return out

    # ------------------------------------------------------------ distributed form

    def distributed(self) -> bool:
        return True

    def run_corpus(self, corpus: Corpus) -> None:
        """Links as partitioned work, the (few) linked samples unioned in the driver, decisions per shard.

        Exact hashes and pHash bands are hash-partitioned group-bys; embeddings are clustered by
        k-means trained on a sample, shuffled by cell and searched exactly inside each cell.
        """
        p = self.params
        needs = set(self.needs)
        census = corpus.map(_dedup_census, list(self.needs))
        n_rows = sum(c["n"] for c in census)
        n_valid = sum(c["valid"] for c in census)
        emb_ok = bool(set(EMBEDDING_COLUMNS) <= needs and n_valid)
        metric = same_identity = near = None
        if emb_ok:
            space, metric = one_space(set().union(*(c["spaces"] for c in census)),
                                      set().union(*(c["metrics"] for c in census)))
            defaults = defaults_for(space)
            same_identity = defaults.same_identity
            near = defaults.near_duplicate if p.embedding_threshold is None else float(p.embedding_threshold)
        edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        corpus.plan_partitions(max(1, n_rows) * 2) if p.partitions is None else None
        parts = p.partitions or corpus.partitions
        corpus.partitions = parts
        if p.exact and {CONTENT_SHA256, PIXEL_SHA256} & needs:
            corpus.shuffle("exact", _exact_records, list(self.needs), parts)
            for a, b in corpus.reduce("exact", _exact_links):
                edges.append((a, b, np.zeros(a.size, dtype=np.int64)))
        phash_edges = None
        if p.phash_max_distance is not None and PHASH in needs:
            corpus.shuffle("phash", _phash_records, list(self.needs), parts, p.phash_max_distance)
            found = corpus.reduce("phash", _phash_links, p.phash_max_distance)
            a = np.concatenate([f[0] for f in found]) if found else np.empty(0, dtype=np.int64)
            b = np.concatenate([f[1] for f in found]) if found else np.empty(0, dtype=np.int64)
            code = np.unique(np.stack([a, b], axis=1), axis=0) if a.size else np.empty((0, 2), dtype=np.int64)
            phash_edges = (code[:, 0], code[:, 1])
        if p.embeddings and emb_ok and metric is not None and near is not None:
            nlist = p.cells or (1 if n_valid <= p.exact_max else default_nlist(n_valid))
            if nlist > 1:
                per_shard = max(1, -(-min(n_valid, max(nlist * 32, 20_000)) // max(1, len(census))))
                sample = np.concatenate(corpus.map(_vector_sample, list(EMBEDDING_COLUMNS), per_shard,
                                                   self.context.seed))
                cells = corpus.call(train_cells, sample, nlist, self.context.seed)
                del sample
            else:
                cells = np.zeros((1, 1), dtype=np.float32)
            spill = 1 if nlist == 1 else p.spill
            if p.partitions is None:
                corpus.plan_partitions(n_valid * spill)
            cells_ref = corpus.put(cells)
            corpus.shuffle("cells", _cell_records, list(EMBEDDING_COLUMNS), cells_ref, spill, corpus.partitions)
            for a, b in corpus.reduce("cells", _cell_links, metric, near):
                edges.append((a, b, np.full(a.size, 2, dtype=np.int64)))
        endpoints = np.unique(np.concatenate(
            [e[0] for e in edges] + [e[1] for e in edges]
            + ([phash_edges[0], phash_edges[1]] if phash_edges is not None else []) + [np.empty(0, np.int64)]))
        want_vectors = bool(phash_edges is not None and p.phash_confirm and emb_ok)
        info = _gather(corpus.map(_endpoint_info, list(self.needs), corpus.put(endpoints), want_vectors,
                                  p.prefer), endpoints)
        if phash_edges is not None:
            a, b = phash_edges
            if want_vectors and metric is not None and same_identity is not None and a.size:
                ia, ib = np.searchsorted(endpoints, a), np.searchsorted(endpoints, b)
                xa, xb = info["x"][ia], info["x"][ib]
                both = info["has_x"][ia] & info["has_x"][ib]
                ok = metric.same(metric.score(np.nan_to_num(xa), np.nan_to_num(xb)), same_identity)
                a, b = a[ok | ~both], b[ok | ~both]
            edges.append((a, b, np.ones(a.size, dtype=np.int64)))
        groups = self._groups(endpoints, edges, info)
        corpus.commit(self._commit, corpus.put(groups))
        kinds = np.concatenate([e[2] for e in edges]) if edges else np.empty(0, dtype=np.int64)
        self._summary = {
            "groups": int(groups["n_groups"]),
            "dropped": int(groups["dropped"]),
            "links": {k: int((kinds == r).sum()) for r, k in enumerate(KINDS)},
            "embedding_threshold": near,
            "phash_max_distance": p.phash_max_distance,
        }

    def _groups(self, endpoints: np.ndarray, edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                info: dict[str, Any]) -> dict[str, Any]:
        """Components of the linked samples and each one's keeper (the single-process keeper rule)."""
        m = endpoints.size
        a = np.searchsorted(endpoints, np.concatenate([e[0] for e in edges] + [np.empty(0, np.int64)]))
        b = np.searchsorted(endpoints, np.concatenate([e[1] for e in edges] + [np.empty(0, np.int64)]))
        kind = np.concatenate([e[2] for e in edges] + [np.empty(0, np.int64)])
        strongest = np.full(m, len(KINDS), dtype=np.int64)
        np.minimum.at(strongest, a, kind)
        np.minimum.at(strongest, b, kind)
        comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(m, m)), directed=False)[1] \
            if m else np.empty(0, dtype=np.int64)
        ids = info["sample_id"]
        keys: list[np.ndarray] = [np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"))]
        keys.append(np.array([0 if f in LOSSLESS_FORMATS else 1 for f in info["format"]], dtype=np.int64))
        keys.append(-(info["width"] * info["height"]))
        if self.params.prefer:
            keys.append(-np.nan_to_num(info["prefer"], nan=-np.inf))
        order = np.lexsort(keys) if m else np.empty(0, dtype=np.int64)
        rank = np.empty(m, dtype=np.int64)
        rank[order] = np.arange(m)
        order = np.lexsort((rank, comp)) if m else order
        starts = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1]]) if m else np.empty(0, np.int64)
        gid: list[str | None] = [None] * m
        size = np.zeros(m, dtype=np.int64)
        kept = np.full(m, -1, dtype=np.int64)
        n_groups = dropped = 0
        for s, e in itertools.pairwise(np.r_[starts, m]):
            if e - s < 2:
                continue
            members = order[s:e]
            g = "dup-" + stable_hash([min(ids[i] for i in members)], 12)
            n_groups += 1
            dropped += int(e - s - 1)
            for i in members.tolist():
                gid[i], size[i], kept[i] = g, e - s, members[0]
        return {"ordinal": endpoints, "group": gid, "size": size, "kept": kept, "kind": strongest,
                "sample_id": ids, "n_groups": n_groups, "dropped": dropped}

    def _commit(self, table: pa.Table, index: int, groups: dict[str, Any]) -> Batch:
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        ords = ordinals(index, table.num_rows)
        lo, hi = np.searchsorted(groups["ordinal"], [ords[0], ords[-1] + 1]) if ords.size else (0, 0)
        ids = groups["sample_id"]
        for g in range(int(lo), int(hi)):
            if groups["group"][g] is None:
                continue
            i = int(groups["ordinal"][g] - ords[0])
            kept = int(groups["kept"][g])
            kind = KINDS[int(groups["kind"][g])]
            out.set(i, dup_group_id=groups["group"][g], dup_group_size=int(groups["size"][g]), dup_kind=kind,
                    kept_sample_id=ids[kept])
            if kept != g:
                out.drop(i, DUPLICATE, f"{kind}: {ids[kept]}")
        return out.batch()

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


# ---------------------------------------------------------------- distributed kernels (one shard or partition)


def _sibling_ranks(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Parent id ('' for none) and rank among siblings (by key) -- the whole-image edge filter's inputs.
    Faces derived from one photo are made in one shard, so ranks are complete per shard."""
    n = table.num_rows
    parents = table.column("parent_id").to_pylist()
    keys = table.column("key").to_pylist()
    rank = np.full(n, -1, dtype=np.int64)
    siblings: dict[str, list[int]] = {}
    for i, par in enumerate(parents):
        if par:
            siblings.setdefault(par, []).append(i)
    for members in siblings.values():
        for r, i in enumerate(sorted(members, key=lambda i: (keys[i] or "", i))):
            rank[i] = r
    return np.asarray([par or "" for par in parents], dtype=object), rank


def _records(table: pa.Table, index: int, rows: np.ndarray, part: np.ndarray, parts: int,
             columns: dict[str, Any]) -> dict[int, pa.Table]:
    parent, rank = _sibling_ranks(table)
    ords = ordinals(index, table.num_rows)
    data = {"ordinal": ords[rows], "parent": pa.array(parent[rows].tolist(), pa.string()), "rank": rank[rows],
            **columns}
    full = pa.table(data)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return {q: full.take(pa.array(order[bounds[q]:bounds[q + 1]])) for q in range(parts) if bounds[q + 1] > bounds[q]}


def _exact_records(table: pa.Table, index: int, parts: int) -> dict[int, pa.Table]:
    """One record per (hash column, value): partitioned by value, so equal values meet in one task."""
    rows_all, cols, vals = [], [], []
    for c, col in enumerate((CONTENT_SHA256, PIXEL_SHA256)):
        if col not in table.column_names:
            continue
        v = table.column(col)
        rows = np.flatnonzero(~np.asarray(v.is_null().to_numpy(zero_copy_only=False), dtype=bool))
        rows_all.append(rows)
        cols.append(np.full(rows.size, c, dtype=np.int64))
        vals.append(np.asarray(v.take(pa.array(rows)).to_pylist(), dtype=object))
    if not rows_all:
        return {}
    rows = np.concatenate(rows_all)
    value = np.concatenate(vals)
    col_of = np.concatenate(cols)
    keyed = np.array([f"{c}:{v}" for c, v in zip(col_of.tolist(), value.tolist(), strict=True)], dtype=object)
    return _records(table, index, rows, key_partition(keyed, parts), parts,
                    {"col": col_of, "value": pa.array(value.tolist(), pa.string())})


def _edge_filter(parent: np.ndarray, rank: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whole-image fingerprints link derived samples only between the same face of two photos."""
    derived = (parent[a] != "") | (parent[b] != "")
    return ~derived | ((rank[a] == rank[b]) & (parent[a] != parent[b]))


def _exact_links(table: pa.Table | None, part: int) -> tuple[np.ndarray, np.ndarray]:
    """Chains from each value's first sample (in run order) to every later one, as the single-process
    stage builds them, then the derived-sample filter."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows < 2:
        return e, e
    col = table.column("col").to_numpy()
    value = np.asarray(table.column("value").to_pylist(), dtype=object)
    ords = table.column("ordinal").to_numpy()
    order = np.lexsort((ords, value, col))
    col, value, ords = col[order], value[order], ords[order]
    parent = np.asarray(table.column("parent").to_pylist(), dtype=object)[order]
    rank = table.column("rank").to_numpy()[order]
    new = np.r_[True, (col[1:] != col[:-1]) | (value[1:] != value[:-1])]
    first = np.maximum.accumulate(np.where(new, np.arange(len(col)), 0))
    later = np.flatnonzero(~new)
    a, b = first[later], later
    ok = _edge_filter(parent, rank, a, b)
    return ords[a[ok]], ords[b[ok]]


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of max_distance + 1 bit bands: pairs within the distance agree on one (pigeonhole)."""
    n = max_distance + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    starts = np.r_[0, np.cumsum(widths)[:-1]].tolist()
    return list(zip(starts, widths, strict=True))


def _phash_records(table: pa.Table, index: int, parts: int, max_distance: int) -> dict[int, pa.Table]:
    """One record per (pHash, band): partitioned by the band's bits."""
    v = table.column(PHASH)
    rows = np.flatnonzero(~np.asarray(v.is_null().to_numpy(zero_copy_only=False), dtype=bool))
    if rows.size == 0:
        return {}
    codes = np.array([int(h, 16) for h in v.take(pa.array(rows)).to_pylist()], dtype=np.uint64)
    bands = _bands(max_distance)
    r_all, band_all, key_all = [], [], []
    for bi, (shift, width) in enumerate(bands):
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        r_all.append(rows)
        band_all.append(np.full(rows.size, bi, dtype=np.int64))
        key_all.append((codes >> np.uint64(shift)) & mask)
    rows_c = np.concatenate(r_all)
    band = np.concatenate(band_all)
    key = np.concatenate(key_all)
    code = np.tile(codes, len(bands))
    mixed = key ^ (band.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    part = (mixed % np.uint64(parts)).astype(np.int64)
    return _records(table, index, rows_c, part, parts, {"band": band, "key": key, "code": code})


def _phash_links(table: pa.Table | None, part: int, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of one band bucket within ``max_distance`` bits (exact Hamming check), filtered."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows < 2:
        return e, e
    band = table.column("band").to_numpy()
    key = table.column("key").to_numpy()
    ords = table.column("ordinal").to_numpy()
    order = np.lexsort((ords, key, band))
    band, key, ords = band[order], key[order], ords[order]
    code = table.column("code").to_numpy()[order]
    parent = np.asarray(table.column("parent").to_pylist(), dtype=object)[order]
    rank = table.column("rank").to_numpy()[order]
    group = np.cumsum(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
    found_a, found_b = [], []
    n = len(group)
    for d in range(1, n):
        same = group[d:] == group[:-d]
        if not same.any():
            break
        i = np.flatnonzero(same)
        j = i + d
        close = np.bitwise_count(code[i] ^ code[j]) <= max_distance
        i, j = i[close], j[close]
        ok = _edge_filter(parent, rank, i, j)
        found_a.append(ords[i[ok]])
        found_b.append(ords[j[ok]])
    if not found_a:
        return e, e
    return np.concatenate(found_a), np.concatenate(found_b)


def _dedup_census(table: pa.Table, index: int) -> dict[str, Any]:
    valid = np.zeros(table.num_rows, dtype=bool)
    spaces: set[str] = set()
    metrics: set[str] = set()
    if set(EMBEDDING_COLUMNS) <= set(table.column_names):
        _, valid = embedding_matrix(table)
        spaces, metrics = table_spaces(table, valid)
    return {"n": table.num_rows, "valid": int(valid.sum()), "spaces": spaces, "metrics": metrics}


def _unit_vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows and their vectors, normalised in cosine spaces (what the single-process stage compares)."""
    x, valid = embedding_matrix(table)
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        return rows, np.zeros((0, x.shape[1]), dtype=np.float32)
    metric = Metric(table.column("embedding_metric")[int(rows[0])].as_py())
    xv = normalise_rows(x[rows]) if metric.higher_is_same else x[rows]
    return rows, np.ascontiguousarray(xv, dtype=np.float32)


def _vector_sample(table: pa.Table, index: int, per_shard: int, seed: int) -> np.ndarray:
    _, x = _unit_vectors(table)
    if len(x) <= per_shard:
        return x
    pick = np.sort(np.random.default_rng([seed, index]).choice(len(x), per_shard, replace=False))
    return x[pick]


def _cell_records(table: pa.Table, index: int, cells: np.ndarray, spill: int, parts: int) -> dict[int, pa.Table]:
    """Each vector once per each of its ``spill`` nearest cells, partitioned by cell."""
    rows, x = _unit_vectors(table)
    if rows.size == 0:
        return {}
    assigned = assign_cells(x, cells, spill)
    k = assigned.shape[1]
    cell = assigned.ravel()
    rep = np.repeat(np.arange(rows.size), k)
    ords = ordinals(index, table.num_rows)[rows][rep]
    d = x.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x[rep].ravel(), pa.float32()), d)
    part = cell % parts
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    full = pa.table({"cell": cell, "ordinal": ords, "vector": vec})
    return {q: full.take(pa.array(order[bounds[q]:bounds[q + 1]])) for q in range(parts) if bounds[q + 1] > bounds[q]}


def _cell_links(table: pa.Table | None, part: int, metric: Metric, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact pairs inside every cell of one partition."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows < 2:
        return e, e
    cell = table.column("cell").to_numpy()
    ords = table.column("ordinal").to_numpy()
    d = table.schema.field("vector").type.list_size
    x = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d)
    order = np.lexsort((ords, cell))
    cell, ords, x = cell[order], ords[order], x[order]
    bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
    found_a, found_b = [], []
    for s, t in itertools.pairwise(bounds.tolist()):
        if t - s < 2:
            continue
        a, b, _ = cell_pairs(x[s:t], ords[s:t], metric, threshold)
        found_a.append(a)
        found_b.append(b)
    if not found_a:
        return e, e
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    code = np.unique(np.stack([a, b], axis=1), axis=0)  # a pair sharing two cells is found twice
    return code[:, 0], code[:, 1]


def _endpoint_info(table: pa.Table, index: int, endpoints: np.ndarray, vectors: bool,
                   prefer: str | None) -> dict[str, Any] | None:
    """Keeper-rule columns (and vectors, for pHash confirmation) of this shard's linked samples."""
    ords = ordinals(index, table.num_rows)
    if ords.size == 0:
        return None
    lo, hi = np.searchsorted(endpoints, [ords[0], ords[-1] + 1])
    mine = endpoints[lo:hi]
    if mine.size == 0:
        return None
    rows = (mine - ords[0]).astype(np.int64)
    take = pa.array(rows)

    def col(name: str, default: Any) -> list[Any]:
        if name not in table.column_names:
            return [default] * rows.size
        return table.column(name).take(take).to_pylist()

    info: dict[str, Any] = {
        "ordinal": mine,
        "sample_id": col(SAMPLE_ID, None),
        "format": col(IMAGE_FORMAT, None),
        "width": np.array([v or 0 for v in col(WIDTH, 0)], dtype=np.int64),
        "height": np.array([v or 0 for v in col(HEIGHT, 0)], dtype=np.int64),
        "prefer": np.array([np.nan if v is None else float(v) for v in col(prefer, None)] if prefer else
                           [np.nan] * rows.size, dtype=np.float64),
    }
    if vectors:
        x, valid = embedding_matrix(table)
        xv = x[rows].astype(np.float32)
        if valid.any():
            metric = Metric(table.column("embedding_metric")[int(np.flatnonzero(valid)[0])].as_py())
            if metric.higher_is_same:
                xv = normalise_rows(xv).astype(np.float32)
        info["x"] = xv
        info["has_x"] = valid[rows]
    return info


def _gather(parts: list[dict[str, Any] | None], endpoints: np.ndarray) -> dict[str, Any]:
    got = [p for p in parts if p is not None]
    out: dict[str, Any] = {
        "sample_id": [s for p in got for s in p["sample_id"]],
        "format": [f for p in got for f in p["format"]],
    }
    for k in ("width", "height", "prefer"):
        out[k] = np.concatenate([p[k] for p in got]) if got else np.empty(0)
    if got and "x" in got[0]:
        out["x"] = np.concatenate([p["x"] for p in got])
        out["has_x"] = np.concatenate([p["has_x"] for p in got])
    assert len(out["sample_id"]) == endpoints.size
    return out
