"""Global stages at scale: consistency -> separation -> dedup -> grouping as distributed work on a local Ray.

Builds a synthetic run without pixels (``features`` manifests shaped like fingerprint + embed output:
identities of ~50 unit vectors in a cosine space, content/pixel hashes, pHashes), with planted
near-duplicates (a copy of a sample of the previous shard: half byte-identical, half re-encoded) and
identity collisions (an identity re-generated from an earlier one's centre), then runs the four global
stages through pipeline.engine.global_exec exactly as the runner does, and prints one JSON line:

- samples, seconds (the four stages), per-stage seconds;
- peak RSS of the largest process (driver and every Ray worker, sampled with psutil every 0.2 s; plasma
  pages a worker maps count in its RSS, so this over-states rather than hides);
- recall of the planted duplicates (same dup group as their source) and collisions (the later identity
  dropped with the earlier one as partner);
- the bare baseline (bench/scale_baseline.py): the same four jobs in one process with every vector in
  memory, FAISS / numpy / scipy by hand, with its seconds per job and its peak RSS; the ratio of the whole
  and of each stage to its job.

    .venv/bin/python bench/bench_scale.py --samples 1000000 --dim 128 --out /tmp/scale-1m
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tests.fixtures.identity_model import hex_ids, mix
from tests.fixtures.synthetic_corpus import METRIC, SPACE, UPSTREAM, write_shard

# ---------------------------------------------------------------- a fast, vectorised synthetic corpus


class Corpus:
    def __init__(self, samples: int, dim: int, per_identity: int, shard_size: int, seed: int) -> None:
        self.dim, self.per, self.seed = dim, per_identity, seed
        self.ids = max(1, samples // per_identity)
        self.ids_per_shard = max(1, shard_size // per_identity)
        self.shards = -(-self.ids // self.ids_per_shard)

    def clone_of(self, i: int) -> int | None:
        u = np.random.default_rng([self.seed, 1, i]).random(2)
        return int(u[1] * i) if i > 0 and u[0] < 0.01 else None

    def centre(self, i: int) -> np.ndarray:
        src = self.clone_of(i)
        c = np.random.default_rng([self.seed, 3, i if src is None else src]).standard_normal(self.dim)
        if src is not None:
            c = c + 0.05 * np.random.default_rng([self.seed, 4, i]).standard_normal(self.dim)
        return c / np.linalg.norm(c)

    def identity(self, i: int) -> dict[str, np.ndarray]:
        """Everything about identity i's images, from one generator: kinds, vectors, draws."""
        rng = np.random.default_rng([self.seed, 5, i])
        u = rng.random(self.per)
        noise = rng.standard_normal((self.per, self.dim))
        x = self.centre(i)[None, :] + noise / np.linalg.norm(noise, axis=1, keepdims=True)
        kind = np.zeros(self.per, dtype=np.int64)  # 0 clean, 1 swap, 2 dup-exact, 3 dup-reencode
        kind[u < 0.005] = 1
        dup = (u >= 0.005) & (u < 0.015) & (i >= self.ids_per_shard)
        kind[dup] = np.where(rng.random(self.per) < 0.5, 2, 3)[dup]
        return {"kind": kind, "x": (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32),
                "swap": rng.integers(1, max(2, self.ids), self.per), "flip": rng.integers(0, 64, (self.per, 2)),
                "nudge": rng.standard_normal((self.per, self.dim)).astype(np.float32)}

    def shard(self, s: int) -> pa.Table:
        first, last = s * self.ids_per_shard, min(self.ids, (s + 1) * self.ids_per_shard)
        n = (last - first) * self.per
        xs = np.empty((n, self.dim), dtype=np.float32)
        key = np.empty(n, dtype=np.uint64)  # what the hashes derive from (a duplicate shares its source's)
        kinds = np.empty(n, dtype=np.int64)
        labels, truth_src = [], []
        flips = np.zeros(n, dtype=np.uint64)
        cache: dict[int, dict[str, np.ndarray]] = {}

        def ident(i: int) -> dict[str, np.ndarray]:
            if i not in cache:
                cache[i] = self.identity(i)
            return cache[i]

        for r, i in enumerate(range(first, last)):
            d = ident(i)
            sl = slice(r * self.per, (r + 1) * self.per)
            xs[sl] = d["x"]
            kinds[sl] = d["kind"]
            key[sl] = np.uint64(i * self.per) + np.arange(self.per, dtype=np.uint64)
            labels.extend([f"id{i:08d}"] * self.per)
            srcs: list[str | None] = [None] * self.per
            for j in np.flatnonzero(d["kind"] != 0).tolist():
                k = int(d["kind"][j])
                if k == 1:
                    t = (i + int(d["swap"][j])) % self.ids
                    v = self.centre(t) + d["nudge"][j] / np.linalg.norm(d["nudge"][j])
                    xs[r * self.per + j] = v / np.linalg.norm(v)
                    continue
                si = i - self.ids_per_shard
                sd = ident(si)
                clean = np.flatnonzero(sd["kind"] == 0)
                sj = int(clean[np.searchsorted(clean, j) % clean.size]) if clean.size else j
                v = sd["x"][sj].copy()
                key[r * self.per + j] = np.uint64(si * self.per + sj)
                srcs[j] = _sid(np.array([si * self.per + sj], dtype=np.uint64), self.seed)[0]
                if k == 3:
                    v = v + 0.05 * d["nudge"][j] / math.sqrt(self.dim)
                    v = v / np.linalg.norm(v)
                    f = d["flip"][j]
                    flips[r * self.per + j] = (np.uint64(1) << np.uint64(f[0])) | (np.uint64(1) << np.uint64(f[1]))
                xs[r * self.per + j] = v
            truth_src.extend(srcs)
        own = np.uint64(first * self.per) + np.arange(n, dtype=np.uint64)
        sids = _sid(own, self.seed)
        reencode = kinds == 3
        content = mix(key ^ np.uint64(self.seed * 7 + 1))
        content[reencode] = mix(content[reencode])
        pixel = mix(key ^ np.uint64(self.seed * 7 + 2))
        pixel[reencode] = mix(pixel[reencode])
        phash = mix(key ^ np.uint64(self.seed * 7 + 3)) ^ flips
        names = np.array(["clean", "swap", "dup-exact", "dup-reencode"])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(xs.ravel(), pa.float32()), self.dim)
        return pa.table({
            "sample_id": sids, "key": sids, "identity_id": labels, "parent_id": pa.nulls(n, pa.string()),
            "embedding": emb, "embedding_space": [SPACE] * n, "embedding_metric": [METRIC] * n,
            "content_sha256": hex_ids(content), "pixel_sha256": hex_ids(pixel), "phash": hex_ids(phash),
            "width": pa.array(np.where(reencode, 96, 112), pa.int32()),
            "height": pa.array(np.where(reencode, 96, 112), pa.int32()),
            "image_format": np.where(reencode, "jpeg", "png").tolist(),
            "truth_kind": names[kinds].tolist(), "truth_identity": labels,
            "truth_source": pa.array(truth_src, pa.string()),
        })

    def clone_pairs(self) -> list[tuple[str, str]]:
        out = []
        for i in range(self.ids):
            src = self.clone_of(i)
            if src is not None and self.clone_of(src) is None:
                out.append((f"id{src:08d}", f"id{i:08d}"))
        return out


def _sid(v: np.ndarray, seed: int) -> list[str]:
    return ["s" + h for h in hex_ids(mix(v ^ np.uint64(seed * 7 + 5)))]


def _write_shard(args: tuple[dict[str, int], str, int]) -> None:
    cfg, run, s = args
    write_shard(Corpus(**cfg), run, s)  # a committed fragment: readers verify its footer before use


# ---------------------------------------------------------------- measuring


class PeakRss:
    """Largest RSS of any one process among this one and its descendants (Ray's raylet, workers)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self.peak_name = ""
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.me, *self.me.children(recursive=True)]
            except psutil.Error:
                procs = [self.me]
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if rss > self.peak:
                        self.peak, self.peak_name = rss, " ".join(a for a in p.cmdline()[:3] if a)[:80]
                    if p.pid == self.me.pid:
                        self.driver_peak = max(self.driver_peak, rss)
                except psutil.Error:
                    continue
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _recall(run: str, corpus: Corpus) -> dict[str, float]:
    """Planted duplicates in their source's group; planted clones dropped with their source as partner.
    Streams shard by shard (a duplicate's source lies in the previous shard)."""
    prev: dict[str, str | None] = {}
    found = planted = 0
    for f in sorted(glob.glob(f"{run}/manifests/dedup/*.parquet")):
        dd = pq.read_table(f, columns=["sample_id", "dup_group_id"])
        tt = pq.read_table(f.replace("/dedup/", f"/{UPSTREAM}/"), columns=["sample_id", "truth_source"])
        group = dict(zip(dd["sample_id"].to_pylist(), dd["dup_group_id"].to_pylist(), strict=True))
        for sid, src in zip(tt["sample_id"].to_pylist(), tt["truth_source"].to_pylist(), strict=True):
            if src is None:
                continue
            planted += 1
            g = group.get(sid)
            found += int(g is not None and prev.get(src) == g)
        prev = group
    pairs = dict((b, a) for a, b in corpus.clone_pairs())
    hit = seen = 0
    for f in sorted(glob.glob(f"{run}/manifests/separation/*.parquet")):
        t = pq.read_table(f, columns=["identity_id", "reason", "collision_with"]).to_pylist()
        for r in t:
            if r["identity_id"] in pairs:
                seen += 1
                hit += int(r["reason"] == "identity_collision" and r["collision_with"] == pairs[r["identity_id"]])
    return {"planted_duplicates": planted, "recall_duplicates": found / max(planted, 1),
            "planted_collisions": len(pairs), "recall_collisions": hit / max(seen, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary folder)")
    ap.add_argument("--per-identity", type=int, default=50)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=2.0, help="declared per global task (Ray memory=)")
    ap.add_argument("--grouping-threshold", type=float, default=0.4,
                    help="average linkage: the mean pair score of a group (same-identity pairs here ~0.5)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--reuse", action="store_true", help="reuse a run directory built with the same settings")
    ap.add_argument("--verbose", action="store_true", help="log every distributed step's time to stderr")
    args = ap.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
        logging.getLogger("pipeline.engine.global_exec").setLevel(logging.DEBUG)

    import ray

    from pipeline.engine.execution import UpstreamInfo
    from pipeline.engine.global_exec import run_global_distributed
    from stages.base import Resources
    from stages.corpus.consistency import ConsistencyParams, ConsistencyStage
    from stages.corpus.dedup import DedupParams, DedupStage
    from stages.corpus.grouping import GroupingParams, GroupingStage
    from stages.corpus.separation import SeparationParams, SeparationStage
    from tests.fixtures.synthetic_corpus import global_spec

    run = args.out or tempfile.mkdtemp(prefix="ff-bench-scale-")
    cfg = {"samples": args.samples, "dim": args.dim, "per_identity": args.per_identity,
           "shard_size": args.shard_size, "seed": 0}
    corpus = Corpus(**cfg)
    t0 = time.perf_counter()
    built = Path(run, "built.json")
    if not (args.reuse and built.exists() and json.loads(built.read_text()) == cfg):
        shutil.rmtree(run, ignore_errors=True)
        with mp.get_context("spawn").Pool(args.cpus) as pool:
            pool.map(_write_shard, [(cfg, run, s) for s in range(corpus.shards)], chunksize=1)
        built.write_text(json.dumps(cfg))
    for sid in ("consistency", "separation", "dedup", "grouping"):
        shutil.rmtree(Path(run, "manifests", sid), ignore_errors=True)
    build_s = time.perf_counter() - t0
    shards = [f"{s:06d}" for s in range(corpus.shards)]

    res = Resources(cpus=1.0, memory_gb=args.memory_gb)
    plan = [
        # Nearest other identity: IVF over the centroid table above 2000 identities (exact below).
        ("consistency", ConsistencyStage, ConsistencyParams(exact_max=2000)),
        ("separation", SeparationStage, SeparationParams()),
        ("dedup", DedupStage, DedupParams()),
        ("grouping", GroupingStage, GroupingParams(method="scalable", threshold=args.grouping_threshold,
                                                   gt_column="truth_identity")),
    ]
    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"))
    stage_s: dict[str, float] = {}
    summaries: dict[str, object] = {}
    upstream = [UpstreamInfo(UPSTREAM, False, False)]
    with PeakRss() as rss:
        t0 = time.perf_counter()
        for sid, cls, params in plan:
            stage_cls = type(cls.__name__, (cls,), {"resources": res})
            t1 = time.perf_counter()
            spec = global_spec(stage_cls, params, run, stage_id=sid, upstream=tuple(upstream))
            run_global_distributed(spec, shards, shards)
            stage_s[sid] = round(time.perf_counter() - t1, 1)
            summaries[sid] = json.loads(Path(run, "report", f"{sid}.summary.json").read_text())
            upstream.append(UpstreamInfo(sid, False, False))
        seconds = time.perf_counter() - t0
    ray.shutdown()
    out: dict[str, object] = {
        "samples": args.samples, "dim": args.dim, "shards": corpus.shards, "seconds": round(seconds, 1),
        "stage_seconds": stage_s, "peak_rss_gib": round(rss.peak / 2**30, 3), "peak_rss_process": rss.peak_name,
        "driver_peak_rss_gib": round(rss.driver_peak / 2**30, 3), "build_seconds": round(build_s, 1),
    }
    out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in _recall(run, corpus).items()})
    g = summaries["grouping"]
    assert isinstance(g, dict)
    out["grouping"] = {k: g.get(k) for k in ("groups", "purity", "inverse_purity", "bcubed_f", "pairwise_f", "levels",
                                              "gt_identities")}
    d = summaries["dedup"]
    assert isinstance(d, dict)
    out["dedup_links"] = d.get("links")
    if not args.no_baseline:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus)}
        script = str(Path(__file__).with_name("scale_baseline.py"))
        base = subprocess.run([sys.executable, script, run, UPSTREAM, str(args.grouping_threshold), "2"],
                              stdout=subprocess.PIPE, text=True, env=env, check=True)
        b = json.loads(base.stdout.strip().splitlines()[-1])
        out.update({k: round(v, 3) if isinstance(v, float) else v for k, v in b.items()})
        out["ratio_to_baseline"] = round(seconds / b["baseline_seconds"], 2)
        out["stage_ratios"] = {s: round(stage_s[s] / v, 2) if v >= 0.1 else None
                               for s, v in b["baseline_stage_seconds"].items()}
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
