"""Dedup: the same picture, found by exact, perceptual and embedding links, one sample kept per group.

A *duplicate* is the same picture up to re-encoding, resizing, a small crop or a horizontal flip. Three
kinds of evidence link two samples, strongest first:
- ``exact``: the same file bytes (content_sha256) or the same decoded pixels (pixel_sha256), from the
  fingerprint stage; these stand on their own;
- ``phash``: 64-bit perceptual hashes, of the pictures or of one and the other's mirror image, within
  ``phash_max_distance`` bits (re-encodes, resizes, flips);
- ``embedding``: identity embeddings within ``embedding_threshold`` (crops, and whatever moved the
  pHash), via facekit.vector_index (exact FAISS for small runs, per k-means cell above
  ``exact_max``).
A pHash or embedding link is a candidate: it becomes a duplicate link only when the two thumbnails
show the same picture (``picture_similarity`` of the fingerprint stage at ``picture_min_similarity``:
one thumbnail registered against small crops and the mirror image of the other). Neither hash nor
identity space can say that alone. On the quickstart renders (64 identities x 8, SFace): two renders
of one identity are at least 4 pHash bits apart as they are, but 0 bits once one is mirrored (a face
turned the other way); 8 pairs of different renders of one identity lie above the near-duplicate
default 0.97 in SFace cosine (up to 0.976), and 633 pairs of renders above the candidate threshold 0.91;
their thumbnails correlate at most 0.963, while JPEG q50 re-encodes, 0.5x resizes, 5% crops and flips of renders and
photos score 0.976 or more -- hence 0.97. An identity embedding ignores everything but identity, so closeness
in identity space between two different pictures is a rule of its own, ``redundant_variant``: reported
(a column naming the better-ranked partner, and a count), never dropped, since intra-class variation
is what a face dataset is for.

Duplicate links are unioned into groups (connected components). In each group one sample is kept by
a fixed rule -- highest ``prefer`` score if a quality column is named, then the largest image, then a
lossless encoding over a lossy one, then the smallest sample_id -- so reruns keep the same one. Every
other member is dropped with its group id, the kept sample's id and the kind of its strongest link.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, Literal

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
    range_pairs,
    range_rows,
    space_of,
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
    stable_hash,
)
from stages.corpus.components import key_partition
from stages.corpus.kernels import EMBEDDING_COLUMNS, census_space, corpus_cells, embedding_census, unit_vectors
from stages.mappers.fingerprint import (
    CONTENT_SHA256,
    HEIGHT,
    IMAGE_FORMAT,
    LOSSLESS_FORMATS,
    PHASH,
    PHASH_MIRROR,
    PIXEL_SHA256,
    THUMBNAIL,
    WIDTH,
    picture_similarity,
)

KINDS = ("exact", "phash", "embedding")  # strongest first
DUPLICATE = "duplicate_of"  # the rule; the detail names the link kind and the kept sample
REDUNDANT = "redundant_variant_of"  # column: the distinct picture this one is a redundant variant of


class DedupParams(Params):
    exact: bool = Field(True, description="byte-identical and pixel-identical images are duplicates")
    # A candidate radius; the thumbnail confirms every candidate (picture_min_similarity). On the quickstart
    # renders (64 identities x 8) the closest two renders of one identity are 4 bits apart, JPEG q50
    # re-encodes of a render within 4 bits (97% within 3), 0.5x resizes within 6 (99% within 3); the
    # embedding candidates find the rest. 3 keeps the banded search's buckets at 16 bits.
    phash_max_distance: int | None = Field(
        3, ge=0, le=32, description=
        "pHash Hamming distance (of the picture or its mirror image) at or below which two images are "
        "candidate duplicates; null: no perceptual candidates")
    phash_confirm: bool = Field(True, description="with embeddings: a pHash link also needs same-identity embeddings")
    picture_min_similarity: float = Field(
        0.97, ge=0.0, le=1.0, description=
        "thumbnail correlation (best over small crops and the mirror image) at or above which two candidates "
        "show the same picture; where either image has no thumbnail a pHash link stands on its own and an "
        "embedding link is never a duplicate")
    embeddings: bool = Field(
        True, description="embedding near-duplicates are candidates (needs the embed stage upstream)")
    # A candidate threshold; the thumbnail decides. A 5% crop moves the detected and aligned face, and with
    # it the embedding: SFace cosine of 47 planted crops (renders and photos) to their originals 0.959-0.99,
    # below the space's near-duplicate default 0.97. So candidates reach three times as far from identical
    # as that default (SFace 0.91, dlib 0.18).
    embedding_threshold: float | None = Field(
        None, description=
        "embedding score (in the space's metric) at which two samples are candidate duplicates; null: three "
        "times as far from identical as the space's near-duplicate default")
    redundant_variants: Literal["off", "report"] = Field(
        "report", description=
        "distinct pictures within redundant_threshold in identity space: report them (a column and a count, "
        "nothing dropped) or not at all")
    redundant_threshold: float | None = Field(
        None, description=
        "embedding score (in the space's metric) at which two distinct pictures are redundant variants; null: "
        "the space's near-duplicate default")
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


def _mirror_entries(phash: list[str | None], mirror: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, variant (0 the picture, 1 its mirror image) and hex code of every pHash entry to compare."""
    rows = [i for i, v in enumerate(phash) if v is not None]
    mrows = [i for i, v in enumerate(mirror) if v is not None and phash[i] is not None]
    return (np.asarray(rows + mrows, dtype=np.int64), np.r_[np.zeros(len(rows)), np.ones(len(mrows))].astype(np.int64),
            np.asarray([phash[i] for i in rows] + [mirror[i] for i in mrows], dtype=object))


def _entry_pairs(owner: np.ndarray, variant: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Which entry pairs compare two samples: different samples, at most one side mirrored (a flip of
    one picture is close to the other; two mirror images say what the pictures themselves say)."""
    return (owner[i] != owner[j]) & ((variant[i] == 0) | (variant[j] == 0))


def phash_pairs(phash: list[str | None], mirror: list[str | None], max_distance: int,
                exact_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (a < b) whose pictures, or one picture and the other's mirror image, are within
    ``max_distance`` bits; each pair once."""
    owner, variant, hexes = _mirror_entries(phash, mirror)
    codes, _ = phash_codes(list(hexes))
    i, j = hamming_pairs(codes, max_distance, exact_max)
    ok = _entry_pairs(owner, variant, i, j)
    return _unique_pairs(owner[i[ok]], owner[j[ok]])


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    code = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
    return code[:, 0], code[:, 1]


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


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([*arrays, np.empty(0, dtype=np.int64)]).astype(np.int64)


class DedupStage(GlobalStage):
    """Groups duplicates of every kind, keeps one sample per group by a deterministic rule, and reports
    distinct pictures that are close in identity space as redundant variants."""

    name: ClassVar[str] = "dedup"
    version: ClassVar[str] = "2"
    params_model: ClassVar[type[Params]] = DedupParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    # What every configuration reads; an instance adds embeddings and the ``prefer`` column (see __init__).
    needs: tuple[str, ...] = (CONTENT_SHA256, PIXEL_SHA256, PHASH)
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("dup_group_id", pa.string()),
        pa.field("dup_group_size", pa.int32()),
        pa.field("dup_kind", pa.string()),  # strongest link of this sample: exact / phash / embedding
        pa.field("kept_sample_id", pa.string()),
        # a distinct picture this one is a redundant variant of (close in identity space, the better keeper)
        pa.field(REDUNDANT, pa.string()),
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
            needs += [PHASH, PHASH_MIRROR]
        needs += [WIDTH, HEIGHT, IMAGE_FORMAT, THUMBNAIL]
        if p.embeddings or (p.phash_max_distance is not None and p.phash_confirm):
            needs += list(EMBEDDING_COLUMNS)
        if p.prefer:
            needs.append(p.prefer)
        self.needs = tuple(needs)  # per instance: what these params actually read

    def summary(self) -> dict[str, Any]:
        return dict(getattr(self, "_summary", {}))

    def _thresholds(self, space: str) -> tuple[float, float, float, float]:
        """Same-identity, duplicate-candidate, redundant-variant and search thresholds of a space."""
        p = self.params
        d = defaults_for(space)
        if p.embedding_threshold is not None:
            candidate = float(p.embedding_threshold)
        elif d.metric.higher_is_same:
            candidate = round(1.0 - 3.0 * (1.0 - d.near_duplicate), 6)
        else:
            candidate = round(3.0 * d.near_duplicate, 6)
        redundant = d.near_duplicate if p.redundant_threshold is None else float(p.redundant_threshold)
        search = candidate
        if p.redundant_variants == "report" and d.metric.closer(candidate, redundant):
            search = redundant
        return d.same_identity, candidate, redundant, search

    def run_global(self, table: pa.Table) -> Batch:
        p = self.params
        n = table.num_rows
        cols = set(table.column_names)
        exact: list[tuple[np.ndarray, np.ndarray]] = []
        parent, rank = _sibling_ranks(table)
        if p.exact:
            for col in (CONTENT_SHA256, PIXEL_SHA256):
                if col in cols:
                    a, b = equal_value_pairs(table.column(col).to_pylist())
                    ok = _edge_filter(parent, rank, a, b)
                    exact.append((a[ok], b[ok]))
        phash = None
        if p.phash_max_distance is not None and PHASH in cols:
            mirror = table.column(PHASH_MIRROR).to_pylist() if PHASH_MIRROR in cols else [None] * n
            a, b = phash_pairs(table.column(PHASH).to_pylist(), mirror, p.phash_max_distance, p.phash_exact_max)
            ok = _edge_filter(parent, rank, a, b)
            phash = (a[ok], b[ok])
        emb = None
        x, metric, space = self._embeddings(table)
        thresholds = self._thresholds(space) if space is not None else None
        if p.embeddings and x is not None and metric is not None and thresholds is not None:
            rows = np.flatnonzero(~np.isnan(x[:, 0]))
            pairs = range_pairs(x[rows], metric, thresholds[3], exact_max=p.exact_max, nprobe=p.nprobe,
                                seed=self.context.seed)
            emb = (rows[pairs.i], rows[pairs.j])
        endpoints = np.unique(_cat([e for pair in [*exact, phash, emb] if pair is not None for e in pair]))
        vectors = x is not None and (emb is not None or (phash is not None and p.phash_confirm))
        info = _gather([_endpoint_info(table, 0, endpoints, vectors, p.prefer)], endpoints)
        groups = self._resolve(endpoints, exact, phash, emb, info, metric, thresholds)
        return self._commit(table, 0, groups)

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
        census = corpus.map(embedding_census, list(self.needs))
        n_rows = sum(c["n"] for c in census)
        n_valid = sum(c["valid"] for c in census)
        emb_ok = bool(set(EMBEDDING_COLUMNS) <= needs and n_valid)
        metric = thresholds = None
        if emb_ok:
            space, metric = census_space(census)
            thresholds = self._thresholds(space)
        exact: list[tuple[np.ndarray, np.ndarray]] = []
        corpus.plan_partitions(max(1, n_rows) * 2) if p.partitions is None else None
        parts = p.partitions or corpus.partitions
        corpus.partitions = parts
        if p.exact and {CONTENT_SHA256, PIXEL_SHA256} & needs:
            corpus.shuffle("exact", _exact_records, list(self.needs), parts)
            exact = list(corpus.reduce("exact", _exact_links))
        phash = None
        if p.phash_max_distance is not None and PHASH in needs:
            corpus.shuffle("phash", _phash_records, list(self.needs), parts, p.phash_max_distance)
            found = corpus.reduce("phash", _phash_links, p.phash_max_distance)
            phash = _unique_pairs(_cat([f[0] for f in found]), _cat([f[1] for f in found]))
        emb = None
        if p.embeddings and emb_ok and metric is not None and thresholds is not None:
            nlist = p.cells or (1 if n_valid <= p.exact_max else default_nlist(n_valid))
            cells = corpus_cells(corpus, n_valid, nlist, self.context.seed)
            spill = 1 if nlist == 1 else p.spill
            if p.partitions is None:
                corpus.plan_partitions(n_valid * spill)
            cells_ref = corpus.put(cells)
            corpus.shuffle("cells", _cell_records, list(EMBEDDING_COLUMNS), cells_ref, spill, corpus.partitions)
            found = corpus.reduce("cells", _cell_links, metric, thresholds[3])
            emb = (_cat([f[0] for f in found]), _cat([f[1] for f in found]))
        endpoints = np.unique(_cat([e for pair in [*exact, phash, emb] if pair is not None for e in pair]))
        vectors = bool(emb_ok and (emb is not None or (phash is not None and p.phash_confirm)))
        info = _gather(corpus.map(_endpoint_info, list(self.needs), corpus.put(endpoints), vectors, p.prefer),
                       endpoints)
        groups = self._resolve(endpoints, exact, phash, emb, info, metric, thresholds)
        corpus.commit(self._commit, corpus.put(groups))

    # ------------------------------------------------------------ the rule (both forms)

    def _resolve(self, endpoints: np.ndarray, exact: list[tuple[np.ndarray, np.ndarray]],
                 phash: tuple[np.ndarray, np.ndarray] | None, emb: tuple[np.ndarray, np.ndarray] | None,
                 info: dict[str, Any], metric: Metric | None,
                 thresholds: tuple[float, float, float, float] | None) -> dict[str, Any]:
        """Candidates to duplicates and redundant variants, then groups and keepers; sets the summary.

        Exact links stand on their own. A pHash candidate (optionally also same-identity by embedding)
        and an embedding near-duplicate are duplicates only when their thumbnails show the same picture;
        without thumbnails a pHash candidate stands on its own and an embedding one never does. Embedding
        pairs within the redundant threshold that are not the same picture are redundant variants.
        """
        p = self.params

        def pos(o: np.ndarray) -> np.ndarray:
            return np.searchsorted(endpoints, o).astype(np.int64)

        edges = [(pos(a), pos(b), np.zeros(a.size, dtype=np.int64)) for a, b in exact]
        thumbs: list[bytes | None] = info["thumbnail"]
        has_thumb = np.array([t is not None for t in thumbs], dtype=bool)
        parent, rank = info["parent"], info["rank"]
        x, has_x = info.get("x"), info.get("has_x")
        memo: dict[tuple[int, int], bool] = {}

        def same_picture(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            """Picture evidence: both thumbnails, the derived-sample rule, correlation at the threshold."""
            out = np.zeros(a.size, dtype=bool)
            judged = has_thumb[a] & has_thumb[b] & _edge_filter(parent, rank, a, b)
            for k in np.flatnonzero(judged).tolist():
                key = (int(a[k]), int(b[k]))
                ta, tb = thumbs[key[0]], thumbs[key[1]]
                if key not in memo and ta is not None and tb is not None:
                    memo[key] = picture_similarity(ta, tb, p.picture_min_similarity) >= p.picture_min_similarity
                out[k] = memo[key]
            return out

        def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            assert x is not None and has_x is not None and metric is not None
            s = metric.score(np.nan_to_num(x[a]), np.nan_to_num(x[b])).astype(np.float64)
            s[~(has_x[a] & has_x[b])] = np.nan
            return s

        candidates = {"phash": 0, "embedding": 0}
        rejected = 0
        if phash is not None:
            a, b = pos(phash[0]), pos(phash[1])
            if p.phash_confirm and x is not None and metric is not None and thresholds is not None and a.size:
                s = scores(a, b)
                ok = np.isnan(s) | metric.same(np.nan_to_num(s, nan=metric.worst()), thresholds[0])
                a, b = a[ok], b[ok]
            candidates["phash"] = int(a.size)
            both = has_thumb[a] & has_thumb[b]
            ok = ~both | same_picture(a, b)
            rejected += int((~ok).sum())
            edges.append((a[ok], b[ok], np.ones(int(ok.sum()), dtype=np.int64)))
        redundant = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
        if emb is not None and metric is not None and thresholds is not None:
            a, b = pos(emb[0]), pos(emb[1])
            s = np.nan_to_num(scores(a, b), nan=metric.worst())
            near = metric.same(s, thresholds[1])
            candidates["embedding"] = int(near.sum())
            confirmed = near & same_picture(a, b)
            rejected += int((near & ~confirmed).sum())
            edges.append((a[confirmed], b[confirmed], np.full(int(confirmed.sum()), 2, dtype=np.int64)))
            if p.redundant_variants == "report":
                close = ~confirmed & metric.same(s, thresholds[2])
                redundant = (a[close], b[close])
        groups = _groups(endpoints, edges, info, p.prefer is not None, redundant)
        self._summary = self._resolved_summary(groups, _cat([e[2] for e in edges]), candidates, rejected,
                                               redundant, thresholds)
        return groups

    def _resolved_summary(self, groups: dict[str, Any], kinds: np.ndarray, candidates: dict[str, int],
                          rejected: int, redundant: tuple[np.ndarray, np.ndarray],
                          thresholds: tuple[float, float, float, float] | None) -> dict[str, Any]:
        """The stage's summary: groups and drops, links by kind, candidates and what the pictures refuted."""
        p = self.params
        return {
            "groups": int(groups["n_groups"]),
            "dropped": int(groups["dropped"]),
            "duplicates": groups.pop("dropped_by_kind"),
            "links": {k: int((kinds == r).sum()) for r, k in enumerate(KINDS)},
            "candidates": candidates,
            "not_same_picture": rejected,
            "redundant_variants": int(groups["n_redundant"]),
            "redundant_pairs": int(redundant[0].size),
            "phash_max_distance": p.phash_max_distance,
            "picture_min_similarity": p.picture_min_similarity,
            "embedding_threshold": thresholds[1] if thresholds else None,
            "redundant_threshold": thresholds[2] if thresholds and p.redundant_variants == "report" else None,
        }

    def _commit(self, table: pa.Table, index: int, groups: dict[str, Any]) -> Batch:
        out = Rows(table.column(SAMPLE_ID).to_pylist(), [f.name for f in self.columns])
        ords = ordinals(index, table.num_rows)
        lo, hi = np.searchsorted(groups["ordinal"], [ords[0], ords[-1] + 1]) if ords.size else (0, 0)
        ids = groups["sample_id"]
        for g in range(int(lo), int(hi)):
            i = int(groups["ordinal"][g] - ords[0])
            if groups["redundant_of"][g] >= 0:
                out.set(i, **{REDUNDANT: ids[int(groups["redundant_of"][g])]})
            if groups["group"][g] is None:
                continue
            kept = int(groups["kept"][g])
            kind = KINDS[int(groups["kind"][g])]
            out.set(i, dup_group_id=groups["group"][g], dup_group_size=int(groups["size"][g]), dup_kind=kind,
                    kept_sample_id=ids[kept])
            if kept != g:
                out.drop(i, DUPLICATE, f"{kind}: {ids[kept]}")
        return out.batch()

    def _embeddings(self, table: pa.Table) -> tuple[np.ndarray | None, Metric | None, str | None]:
        """Vectors (NaN rows where missing, unit rows in cosine spaces), metric and space."""
        if not set(EMBEDDING_COLUMNS) <= set(table.column_names):
            return None, None, None
        x, valid = embedding_matrix(table)
        if not valid.any():
            return None, None, None
        space, metric = space_of(table, valid)
        if metric.higher_is_same:
            x = normalise_rows(x)
        x = x.astype(np.float32)
        x[~valid] = np.nan
        return x, metric, space


def _groups(endpoints: np.ndarray, edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]], info: dict[str, Any],
            prefer: bool, redundant: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Components of the duplicate links and each one's keeper: highest ``prefer`` score, then the
    largest image, then a lossless encoding, then the smallest sample_id -- so reruns keep the same one.
    A redundant variant points at its best-ranked partner outside its own group, when that one ranks
    above it."""
    m = endpoints.size
    a = _cat([e[0] for e in edges])
    b = _cat([e[1] for e in edges])
    kind = _cat([e[2] for e in edges])
    strongest = np.full(m, len(KINDS), dtype=np.int64)
    np.minimum.at(strongest, a, kind)
    np.minimum.at(strongest, b, kind)
    comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(m, m)), directed=False)[1] \
        if m else np.empty(0, dtype=np.int64)
    ids = info["sample_id"]
    keys: list[np.ndarray] = [np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"))]
    keys.append(np.array([0 if f in LOSSLESS_FORMATS else 1 for f in info["format"]], dtype=np.int64))
    keys.append(-(info["width"] * info["height"]))
    if prefer:
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
    by_kind = dict.fromkeys(KINDS, 0)
    for s, e in itertools.pairwise(np.r_[starts, m]):
        if e - s < 2:
            continue
        members = order[s:e]
        g = "dup-" + stable_hash([min(ids[i] for i in members)], 12)
        n_groups += 1
        dropped += int(e - s - 1)
        for i in members.tolist():
            gid[i], size[i], kept[i] = g, e - s, members[0]
        for i in members[1:].tolist():
            by_kind[KINDS[int(strongest[i])]] += 1
    # Redundant variants: each sample points at its best-ranked partner in another group, if that ranks higher.
    ra, rb = redundant
    other = comp[ra] != comp[rb] if ra.size else np.zeros(0, dtype=bool)
    ra, rb = ra[other], rb[other]
    worse = np.where(rank[ra] > rank[rb], ra, rb)
    better = np.where(rank[ra] > rank[rb], rb, ra)
    redundant_of = np.full(m, -1, dtype=np.int64)
    best = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, worse, rank[better])
    has = best < np.iinfo(np.int64).max
    redundant_of[has] = order_by_rank(rank)[best[has]]
    return {"ordinal": endpoints, "group": gid, "size": size, "kept": kept, "kind": strongest,
            "sample_id": ids, "n_groups": n_groups, "dropped": dropped, "dropped_by_kind": by_kind,
            "redundant_of": redundant_of, "n_redundant": int(has.sum())}


def order_by_rank(rank: np.ndarray) -> np.ndarray:
    """The endpoint at each rank (the inverse permutation of ``rank``)."""
    inv = np.empty_like(rank)
    inv[rank] = np.arange(rank.size)
    return inv


# ---------------------------------------------------------------- distributed kernels (one shard or partition)


def _sibling_ranks(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Parent id ('' for none) and rank among siblings (by key) -- the whole-image edge filter's inputs.
    Faces derived from one photo are made in one shard, so ranks are complete per shard."""
    n = table.num_rows
    parents = table.column("parent_id").to_pylist() if "parent_id" in table.column_names else [None] * n
    keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * n
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
    """One record per (pHash entry, band) -- the picture's hash and its mirror image's: partitioned by
    the band's bits."""
    mirror = table.column(PHASH_MIRROR).to_pylist() if PHASH_MIRROR in table.column_names else \
        [None] * table.num_rows
    rows, variant, hexes = _mirror_entries(table.column(PHASH).to_pylist(), mirror)
    if rows.size == 0:
        return {}
    codes = np.array([int(h, 16) for h in hexes], dtype=np.uint64)
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
    return _records(table, index, rows_c, part, parts,
                    {"band": band, "key": key, "code": code, "variant": np.tile(variant, len(bands))})


def _phash_links(table: pa.Table | None, part: int, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample pairs of one band bucket within ``max_distance`` bits (exact Hamming check), filtered."""
    e = np.empty(0, dtype=np.int64)
    if table is None or table.num_rows < 2:
        return e, e
    band = table.column("band").to_numpy()
    key = table.column("key").to_numpy()
    ords = table.column("ordinal").to_numpy()
    variant = table.column("variant").to_numpy()
    order = np.lexsort((variant, ords, key, band))
    band, key, ords, variant = band[order], key[order], ords[order], variant[order]
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
        close = (np.bitwise_count(code[i] ^ code[j]) <= max_distance) & _entry_pairs(ords, variant, i, j)
        i, j = i[close], j[close]
        ok = _edge_filter(parent, rank, i, j)
        found_a.append(ords[i[ok]])
        found_b.append(ords[j[ok]])
    if not found_a:
        return e, e
    return _unique_pairs(np.concatenate(found_a), np.concatenate(found_b))


def _cell_records(table: pa.Table, index: int, cells: np.ndarray, spill: int, parts: int) -> dict[int, pa.Table]:
    """Each vector once per each of its ``spill`` nearest cells, partitioned by cell."""
    rows, x = unit_vectors(table)
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
    """Keeper-rule columns, thumbnails, sibling ranks (and vectors, to score candidates) of this shard's
    linked samples."""
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

    parent, rank = _sibling_ranks(table)
    info: dict[str, Any] = {
        "ordinal": mine,
        "sample_id": col(SAMPLE_ID, None),
        "thumbnail": col(THUMBNAIL, None),
        "parent": parent[rows],
        "rank": rank[rows],
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
        "thumbnail": [t for p in got for t in p["thumbnail"]],
        "parent": np.concatenate([p["parent"] for p in got]) if got else np.empty(0, dtype=object),
        "rank": np.concatenate([p["rank"] for p in got]) if got else np.empty(0, dtype=np.int64),
    }
    for k in ("width", "height", "prefer"):
        out[k] = np.concatenate([p[k] for p in got]) if got else np.empty(0)
    if got and "x" in got[0]:
        out["x"] = np.concatenate([p["x"] for p in got])
        out["has_x"] = np.concatenate([p["has_x"] for p in got])
    assert len(out["sample_id"]) == endpoints.size
    return out
