"""The run report at two run sizes: time and the report process's peak RSS side by side.

The report sees the whole run, so its memory must not grow with the run: every number is a DuckDB
aggregation over the manifests and only a handful of example rows and image byte ranges are read.
Synthetic runs (real manifests with the engine's schema, one real tar of PNGs that every pixel row
points into) of 10x different sizes are built with the engine's own layout helpers; each report is
built in a fresh process so ru_maxrss is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facekit.imaging import encode_png  # noqa: E402
from manifests.layout import manifest_path, shard_path  # noqa: E402
from manifests.schema import manifest_schema  # noqa: E402
from manifests.shards import write_tar  # noqa: E402
from manifests.storage import RunStorage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.engine.rundir import stage_fingerprints, write_plan, write_run_file  # noqa: E402
from tests.fixtures import engine_stage, pattern_config  # noqa: E402

CONFIG = pattern_config(
    "bench-report", seed=0, shard_size=1000, identities=(10, 4, 64, 0.5),
    stages=[engine_stage("MeanFilter", "meanf", params={"min_mean": 60})],
    export={"thresholds": {"meanf.mean": {"min": 70}}})


def build_run(root: Path, rows: int, shard_size: int = 1000) -> None:
    store = RunStorage(str(root))
    cfg, stages = load_config(raw=CONFIG)
    write_run_file(store, cfg, stage_fingerprints(cfg, stages))
    shards = [f"{i:06d}" for i in range((rows + shard_size - 1) // shard_size)]
    write_plan(store, {"shards": [{"name": s} for s in shards]})
    rng = np.random.default_rng(0)
    tiles = [encode_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(16)]
    data, locs = write_tar([{"__key__": f"k{i}", "png": t} for i, t in enumerate(tiles)])
    store.write_atomic(data, *shard_path("pattern", "tiles"))
    tar_rel = "/".join(shard_path("pattern", "tiles"))
    src_schema = manifest_schema([pa.field("gt_mean", pa.float32())])
    flt_schema = manifest_schema([pa.field("mean", pa.float32())])
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    for si, shard in enumerate(shards):
        n = min(shard_size, rows - si * shard_size)
        ids = [f"{si:06d}{j:06d}" for j in range(n)]
        ident = [f"id-{(si * shard_size + j) // 40:06d}" for j in range(n)]
        tile = [f"k{j % 16}" for j in range(n)]
        mean = rng.normal(90, 25, n).astype(np.float32)
        common = {"sample_id": ids, "key": ids, "identity_id": ident, "parent_id": [None] * n,
                  "shard": [shard] * n, "params_hash": ["p"] * n, "fingerprint": ["f"] * n, "stage_version": ["1"] * n,
                  "worker": [f"w{si % 4}"] * n, "processed_at": pa.array([now.value + si * 1000] * n,
                                                                          pa.timestamp("ms", tz="UTC")),
                  "duration_ms": [2.0] * n}
        src = {**common, "stage": ["pattern"] * n, "stage_name": ["pattern"] * n, "status": ["ok"] * n,
               "keep": [True] * n, "output_shard": [tar_rel] * n, "image_ext": ["png"] * n,
               "tar_offset": [locs[t]["png"].offset for t in tile], "tar_size": [locs[t]["png"].size for t in tile],
               "gt_mean": mean}
        keep = mean >= 60
        err = rng.random(n) < 0.01
        ke = list(zip(keep.tolist(), err.tolist(), strict=True))
        flt = {**common, "stage": ["meanf"] * n, "stage_name": ["mean_filter"] * n,
               "status": ["error" if e else "ok" for e in err], "keep": [k and not e for k, e in ke],
               "reason": ["unreadable_image" if e else (None if k else "mean_below_min") for k, e in ke],
               "detail": [None if k and not e else f"{m:.1f} < 60" for m, (k, e) in zip(mean, ke, strict=True)],
               "input_shard": [tar_rel] * n, "mean": mean}
        for stage, cols, schema in (("pattern", src, src_schema), ("meanf", flt, flt_schema)):
            table = pa.Table.from_pydict({f.name: cols.get(f.name, [None] * n) for f in schema}, schema=schema)
            path = root.joinpath(*manifest_path(stage, shard))
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from manifests.storage import RunStorage
from pipeline.report import build_report
t = time.perf_counter()
page = build_report(RunStorage({root!r}))
print(json.dumps({{"s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kb": len(page) / 1024, "imgs": page.count("<img "), "svgs": page.count("<svg ")}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ff-bench-report-") as tmp:
        for rows in args.rows:
            root = Path(tmp) / f"run-{rows}"
            build_run(root, rows)
            out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), root=str(root))],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            results.append({"rows_per_stage": rows, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'rows/stage':>10} {'seconds':>8} {'peak RSS MB':>11} {'page kB':>8} {'imgs':>5} {'svgs':>5}")
    for r in results:
        print(f"{r['rows_per_stage']:>10} {r['s']:>8.1f} {r['rss_mb']:>11.0f} {r['kb']:>8.0f} {r['imgs']:>5} "
              f"{r['svgs']:>5}")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"rows x{b['rows_per_stage'] / a['rows_per_stage']:.0f}: peak RSS x{b['rss_mb'] / a['rss_mb']:.2f}, "
              f"time x{b['s'] / a['s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
