"""Near-duplicate search on random unit vectors with planted near-duplicates: time and recall.

Random unit vectors in 128-d / 512-d are almost orthogonal (cosine ~ N(0, 1/d)), so at a cosine
threshold of 0.9 the exact answer is the planted pairs whose perturbed copy stayed above the
threshold. Recall is measured two ways against exact search: over every planted pair (their exact
scores are computed directly), and over all pairs touching a random sample of query rows (an exact
FAISS range search of those rows against the whole set), which also catches chance pairs.

    .venv/bin/python bench/bench_near_duplicates.py --sizes 100000 --dims 128 512
    .venv/bin/python bench/bench_near_duplicates.py --sizes 1000000 --dims 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facekit.thresholds import Metric
from facekit.vector_index import EXACT_MAX, default_nlist, range_pairs

HEADER = "n        d    mode         nlist  nprobe search_s  recall_planted   recall_sampled  exact_est_s"
ROW = (
    "{n:<8} {d:<4} {mode:<12} {nlist:<6} {nprobe:<6} {search_s:>8.1f}"
    "  {recall_planted:.4f} ({planted_true:>6}) {recall_sampled:.4f} ({sampled_true:>5}) {exact_est_s:>11.0f}"
)


def make_data(
    n: int, d: int, planted: int, seed: int, low: float, high: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors, with ``planted`` rows replaced by a perturbed copy of another row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = rng.choice(n, 2 * planted, replace=False)
    src, dst = rows[:planted], rows[planted:]
    target_cos = rng.uniform(low, high, planted).astype(np.float32)
    sigma = np.sqrt(1.0 / target_cos**2 - 1.0)[:, None]
    noise = rng.standard_normal((planted, d), dtype=np.float32) / np.sqrt(d, dtype=np.float32)
    copy = x[src] + sigma * noise
    x[dst] = copy / np.linalg.norm(copy, axis=1, keepdims=True)
    return x, np.minimum(src, dst), np.maximum(src, dst)


def exact_pairs_of_queries(x: np.ndarray, queries: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x[queries], float(np.nextafter(np.float32(threshold), -np.inf)))
    out: set[tuple[int, int]] = set()
    for q, row in enumerate(queries):
        for j in ids[lims[q] : lims[q + 1]]:
            if j != row:
                out.add((min(int(row), int(j)), max(int(row), int(j))))
    return out


def run_one(n: int, d: int, args: argparse.Namespace) -> dict[str, float]:
    planted = max(1, int(n * args.planted_fraction))
    x, pi, pj = make_data(n, d, planted, args.seed, args.low, args.high)
    true_scores = np.einsum("ij,ij->i", x[pi], x[pj])
    planted_true = {
        (int(a), int(b)) for a, b, s in zip(pi, pj, true_scores, strict=True) if s >= args.threshold
    }

    t0 = time.perf_counter()
    pairs = range_pairs(
        x, Metric.COSINE, args.threshold, exact_max=args.exact_max, nlist=args.nlist, nprobe=args.nprobe
    )
    search_s = time.perf_counter() - t0
    found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))

    rng = np.random.default_rng(args.seed + 1)
    queries = np.concatenate(
        [rng.choice(n, args.exact_queries, replace=False), pi[: args.exact_queries // 4]]
    )
    t0 = time.perf_counter()
    sampled_true = exact_pairs_of_queries(x, queries, args.threshold)
    exact_s = time.perf_counter() - t0
    qset = set(queries.tolist())
    sampled_found = {p for p in found if p[0] in qset or p[1] in qset}
    return {
        "n": n,
        "d": d,
        "mode": "exact" if pairs.exact else "partitioned",
        "nlist": 0 if pairs.exact else (args.nlist or default_nlist(n)),
        "search_s": search_s,
        "planted_true": len(planted_true),
        "recall_planted": len(found & planted_true) / max(1, len(planted_true)),
        "recall_sampled": len(sampled_found & sampled_true) / max(1, len(sampled_true)),
        "sampled_true": len(sampled_true),
        "false_pos": len(found - planted_true - sampled_true) if pairs.exact is False else 0,
        "exact_est_s": exact_s * n / len(queries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--threshold", type=float, default=0.9, help="cosine similarity of a near-duplicate")
    parser.add_argument("--planted-fraction", type=float, default=0.01)
    parser.add_argument("--low", type=float, default=0.85, help="lowest planted cosine (some fall below)")
    parser.add_argument("--high", type=float, default=0.995)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--exact-max", type=int, default=EXACT_MAX)
    parser.add_argument("--exact-queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, threshold {args.threshold}")
    print(HEADER)
    for n in args.sizes:
        for d in args.dims:
            r = run_one(n, d, args)
            print(ROW.format(**r, nprobe=args.nprobe), flush=True)


if __name__ == "__main__":
    main()
