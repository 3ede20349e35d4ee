"""`facefoundry whatif` at scale: a grid of 50 export settings over a synthetic run of 1M samples of
50k identities (tables/samples written as a run's tables commit writes them: one schema, one file per
shard), through the real command line in a child process.

Budget: wall <= 60 s and peak RSS of the largest process (the command: whatif starts no other)
<= 2 GiB. Prints one JSON line; exits 1 when over budget.

    python bench/bench_whatif.py --samples 1000000 --identities 50000 --out /tmp/bench-whatif
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The export bench's three stages (gen, quality, labels): the same samples table shape.
from bench.bench_export import STAGES  # noqa: E402
from manifests.layout import RUN_FILE, SAMPLES_TABLE, TABLES_DONE  # noqa: E402
from manifests.storage import RunStorage  # noqa: E402
from manifests.tables import samples_schema  # noqa: E402
from pipeline.export.config import ExportConfig  # noqa: E402

# 5 x 5 x 2 = 50 combinations.
GRID = ["export.thresholds.quality.sharpness.min=0,10,20,30,40",
        "export.thresholds.quality.yaw.max_abs=10,15,20,25,30",
        "export.min_images_per_identity=5,15"]
BUDGET_S = 60.0
BUDGET_RSS = 2 * 1024**3


def build(out: Path, samples: int, identities: int, shard_size: int) -> None:
    """The run directory whatif reads: run.yaml, tables/samples/*.parquet, tables/tables.json."""
    store = RunStorage(str(out))
    schema = samples_schema(STAGES)
    rng = np.random.default_rng(0)
    for s, start in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - start)
        idx = np.arange(start, start + n)
        sids = pa.array([f"s{i:09d}" for i in idx])
        cols: dict[str, pa.Array] = {
            "sample_id": sids, "key": sids, "identity_id": pa.array([f"id{i % identities:07d}" for i in idx]),
            "shard": pa.array([f"{s:06d}"] * n), "image_shard": pa.array([f"shards/gen/{s:06d}.tar"] * n),
            "image_offset": pa.array(idx * 1024), "image_size": pa.array(np.full(n, 1024)),
            "image_ext": pa.array(["png"] * n),
        }
        error = rng.random(n) < 0.01  # quality failed on 1 %: an error row with a rule
        sharp = (rng.random(n) * 100).astype(np.float32)
        yaw = (rng.normal(0, 15, n)).astype(np.float32)
        keep_q = ~error & (sharp >= 10) & (np.abs(yaw) <= 25)
        for st in STAGES:
            p = st.stage_id
            ok = ~error if p == "quality" else np.ones(n, bool)
            keep = keep_q if p == "quality" else np.ones(n, bool)
            cols[f"{p}__status"] = pa.array(np.where(ok, "ok", "error"))
            cols[f"{p}__keep"] = pa.array(keep)
            if p == "quality":
                reason = np.where(error, "decode_error", np.where(sharp < 10, "blurry", "pose"))
                cols[f"{p}__reason"] = pa.array(np.where(keep, None, reason))
            else:
                cols[f"{p}__reason"] = pa.nulls(n, pa.string())
        cols["gen__variant"] = pa.array((idx // identities).astype(np.int32))
        cols["quality__sharpness"] = pa.array(np.where(error, np.nan, sharp), pa.float32())
        cols["quality__yaw"] = pa.array(np.where(error, np.nan, yaw), pa.float32())
        cols["labels__pose_bin"] = pa.array(np.array(["frontal", "left", "right"])[idx % 3])
        keep_all = keep_q
        cols["keep"] = pa.array(keep_all)
        cols["dropped_by"] = pa.array(np.where(keep_all, None, "quality"))
        table = pa.table({f.name: (cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type))
                          for f in schema}, schema=schema)
        path = store.path(*SAMPLES_TABLE, f"{s:06d}.parquet")
        store.fs.makedirs(store.path(*SAMPLES_TABLE), exist_ok=True)
        pq.write_table(table, path, compression="zstd")
    cfg = {"name": "bench-whatif", "stages": [{"stage": f"bench:{st.stage_id}", "id": st.stage_id} for st in STAGES],
           "export": ExportConfig().model_dump(mode="json")}
    store.write_atomic(yaml.safe_dump({"config_hash": "bench", "fingerprints": {}, "config": cfg}).encode(), RUN_FILE)
    store.write_atomic(json.dumps({"stamp": "bench", "shards": samples // shard_size}).encode(), *TABLES_DONE)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=50_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--out", default=None, help="run directory (kept); default: a temporary one")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-whatif-"))
    try:
        t0 = time.perf_counter()
        if not (out / TABLES_DONE[0] / TABLES_DONE[1]).exists():
            build(out, args.samples, args.identities, args.shard_size)
        built = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "pipeline.cli", "whatif", str(out), "--json",
               *[x for g in GRID for x in ("--set", g)]]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss * 1024  # the largest child: the command
        result = json.loads(proc.stdout)
        kept = [c["samples"] for c in result["combinations"]]
        ev = result["evaluation"]
        record = {"bench": "whatif", "samples": args.samples, "identities": args.identities,
                  "combinations": len(result["combinations"]), "seconds": round(wall, 2),
                  "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                  "load_average": round(os.getloadavg()[0], 1), "peak_rss_mb": round(peak / 2**20),
                  "compact_rows": ev["largest_compact_table_rows"], "partitions": ev["partitions"],
                  "kept_min": min(kept), "kept_max": max(kept), "build_seconds": round(built, 1),
                  "budget": {"seconds": BUDGET_S, "peak_rss_mb": BUDGET_RSS // 2**20},
                  "within_budget": wall <= BUDGET_S and peak <= BUDGET_RSS}
        print(json.dumps(record), flush=True)
        return 0 if record["within_budget"] else 1
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
