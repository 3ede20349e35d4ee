"""The bare single-process baseline of ``bench_scale.py``: the same four global jobs written the way one
would by hand, every vector of the run in one process's memory, FAISS / numpy / scipy and nothing of ours.

Why a whole-job baseline: the distributed stages do four jobs (consistency, separation, dedup, grouping);
timing them against dedup's embedding search alone compared four jobs with one. Each job here does what
its stage decides, with the stage's defaults, as a tight loop would:

- consistency: two passes of leave-one-out scores against per-identity sums (the second from the first
  pass's inliers), each with a bounded impostor sample for the threshold statistics, then every image's
  nearest other identity (IVF over the identity centroids above 2,000 identities, as the stage);
- separation: identity centroids, the collision pairs among them at the collision threshold, and each
  identity's nearest other;
- dedup: exact byte and pixel hashes as group-bys, pHash within 3 bits through FAISS's multi-index
  hashing, embedding near-duplicates by one IVF index (k-means on a sample, about 2 sqrt(n) cells,
  nprobe = the stage's spill) range-searched at the near-duplicate threshold, the links unioned;
- grouping: a range search of the same index at the grouping threshold, components by scipy.

It reuses one IVF index for both range searches (the stages train their cells each), which favours the
baseline. The thresholds are the space's documented defaults (facekit.thresholds: a table lookup).

    python bench/scale_baseline.py RUN_DIR UPSTREAM_STAGE GROUPING_THRESHOLD SPILL  -> one JSON line
"""

from __future__ import annotations

import glob
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facekit.thresholds import defaults_for

IMPOSTORS = 1_000_000  # consistency's fit_max_impostors
BLOCK = 262_144


def _hex64(col: pa.ChunkedArray) -> np.ndarray:
    """16-hex-digit hashes as uint64 (what a hand-written loop would key on)."""
    return np.array([int(h, 16) for h in col.to_pylist()], dtype=np.uint64)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _cells(n: int) -> int:
    """About 2 sqrt(n) k-means cells, the usual IVF sizing."""
    return int(min(8192, max(16, round(2 * n**0.5))))


def _centroid_index(cents: np.ndarray) -> faiss.Index:
    """Identity centroids: exact up to 2,000 of them, IVF above (as the stages)."""
    if len(cents) > 2000:
        return _ivf(cents, _cells(len(cents)), 16)
    index = faiss.IndexFlatIP(cents.shape[1])
    index.add(cents)
    return index


def _ivf(x: np.ndarray, nlist: int, nprobe: int) -> faiss.IndexIVFFlat:
    n, d = x.shape
    sample = x[np.sort(np.random.default_rng(0).choice(n, min(n, nlist * 32), replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=0, max_points_per_centroid=64)
    km.train(sample)
    index = faiss.IndexIVFFlat(km.index, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    index.nprobe = nprobe
    return index


def _range_edges(index: faiss.Index, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    lims, _, ids = index.range_search(x, float(np.nextafter(np.float32(threshold), np.float32(-1))))
    rows = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
    ids = ids.astype(np.int64)
    keep = rows < ids
    return rows[keep], ids[keep]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return connected_components(coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n)), directed=False)[1]


def main() -> None:
    run, upstream, grouping_t, spill = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    cols = ["embedding", "identity_id", "content_sha256", "pixel_sha256", "phash", "embedding_space"]
    tables = [pq.read_table(f, columns=cols) for f in sorted(glob.glob(f"{run}/manifests/{upstream}/*.parquet"))]
    t = pa.concat_tables(tables)
    del tables
    space = t["embedding_space"][0].as_py()
    emb = t["embedding"].combine_chunks()
    x = _unit(emb.flatten().to_numpy().reshape(len(emb), -1))
    del emb
    names, codes = np.unique(pc.cast(t["identity_id"], pa.string()).to_numpy(zero_copy_only=False),
                             return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    content, pixel, phash = _hex64(t["content_sha256"]), _hex64(t["pixel_sha256"]), _hex64(t["phash"])
    del t
    n = len(x)
    k = names.size
    defaults = defaults_for(space)
    seconds: dict[str, float] = {}
    member = csr_matrix((np.ones(n, np.float32), (codes, np.arange(n))), shape=(k, n))
    t0 = time.perf_counter()

    # consistency: two leave-one-out passes, then each image's nearest other identity
    inlier = np.ones(n, dtype=bool)
    rng = np.random.default_rng(0)
    same = inlier
    for _ in range(2):
        sums = np.asarray(member @ (x * inlier[:, None]), dtype=np.float64)
        counts = np.bincount(codes[inlier], minlength=k)
        m = counts[codes] - inlier
        ok = m > 0
        own = np.empty(n, dtype=np.float32)
        for s in range(0, n, BLOCK):  # in blocks: a (n, d) float64 temporary would dwarf the vectors
            e = slice(s, s + BLOCK)
            ref = _unit(((sums[codes[e]] - x[e] * inlier[e, None]) / np.maximum(m[e], 1)[:, None]).astype(np.float32))
            own[e] = np.einsum("ij,ij->i", x[e], ref)
        own[~ok] = np.nan
        cents = _unit(sums / np.maximum(counts, 1)[:, None])
        rows = rng.integers(0, n, IMPOSTORS)
        other = (codes[rows] + rng.integers(1, k, IMPOSTORS)) % k
        impostor = np.concatenate([np.einsum("ij,ij->i", x[rows[s:s + BLOCK]], cents[other[s:s + BLOCK]])
                                   for s in range(0, IMPOSTORS, BLOCK)])
        same = ~ok | (own >= defaults.same_identity)
        enough = np.bincount(codes[same], minlength=k) >= 2
        inlier = same | ~enough[codes]
    stranger = float(np.median(impostor))
    scores, ids = _centroid_index(cents).search(x, 2)
    pick = np.where(ids[:, 0] == codes, 1, 0)
    other_score = scores[np.arange(n), pick]
    drop_consistency = ~same & ((other_score > own) | (own < stranger))
    seconds["consistency"] = time.perf_counter() - t0

    # separation: collisions among identity centroids, each identity's nearest other
    t1 = time.perf_counter()
    sums = np.asarray(member @ x, dtype=np.float64)
    cents = _unit(sums / np.maximum(np.bincount(codes, minlength=k), 1)[:, None])
    cindex = _centroid_index(cents)
    ci, cj = _range_edges(cindex, cents, defaults.collision)
    cindex.search(cents, 2)
    later = np.zeros(k, dtype=bool)
    for a, b in sorted(zip(ci.tolist(), cj.tolist(), strict=True), key=lambda p: p[1]):
        if not later[a]:
            later[b] = True
    seconds["separation"] = time.perf_counter() - t1

    # dedup: exact hashes, pHash within 3 bits, embedding near-duplicates; links unioned
    t2 = time.perf_counter()
    edges_a, edges_b = [], []
    for h in (content, pixel):
        _, first = np.unique(h, return_inverse=True)
        order = np.argsort(first.ravel(), kind="stable")
        g = first.ravel()[order]
        same_next = g[1:] == g[:-1]
        edges_a.append(order[:-1][same_next])
        edges_b.append(order[1:][same_next])
    bindex = faiss.IndexBinaryMultiHash(64, 4, 16)
    bindex.nflip = 0
    codes8 = phash.view(np.uint8).reshape(-1, 8).copy()
    bindex.add(codes8)
    lims, _, pid = bindex.range_search(codes8, 4)
    prow = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
    pid = pid.astype(np.int64)
    edges_a.append(prow[prow < pid])
    edges_b.append(pid[prow < pid])
    index = _ivf(x, _cells(n), spill)
    ea, eb = _range_edges(index, x, defaults.near_duplicate)
    edges_a.append(ea)
    edges_b.append(eb)
    dup = _components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    dup_links = int(sum(a.size for a in edges_a))
    seconds["dedup"] = time.perf_counter() - t2

    # grouping: the threshold graph of the same index, its components
    t3 = time.perf_counter()
    ga, gb = _range_edges(index, x, grouping_t)
    groups = _components(n, ga, gb)
    seconds["grouping"] = time.perf_counter() - t3

    print(json.dumps({
        "baseline_seconds": time.perf_counter() - t0,
        "baseline_stage_seconds": {s: round(v, 1) for s, v in seconds.items()},
        "baseline_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "baseline_counts": {"consistency_dropped": int(drop_consistency.sum()), "collisions": int(later.sum()),
                            "dedup_links": dup_links, "dup_groups": int(np.unique(dup).size),
                            "groups": int(np.unique(groups).size)},
    }))


if __name__ == "__main__":
    main()
