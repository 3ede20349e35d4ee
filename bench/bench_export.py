"""Export planning and writing at scale, on synthetic manifests (no real pixels), side by side with
the single-process export of git `main` in the same run.

The synthetic run: --samples samples in shards of --shard-size, identities of 50 images, three
stages (a pixel-writing source `gen`, a filter `quality` dropping ~10 %, a `labels` stage with a
pose bin). Source tars hold a tiny PNG per sample only for the first --write-shards shards; the
written export is restricted to them with `export.where` (`shard < ...`), while planning reads all.

Prints one JSON line per measured step: seconds and the peak RSS of the largest process (driver or
any Ray worker; sampled every 50 ms).

    python bench/bench_export.py --samples 1000000 --old-samples 100000 --out /tmp/bench-export
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_scale import PeakRss  # noqa: E402
from facekit.imaging import encode_png  # noqa: E402
from manifests.layout import manifest_path  # noqa: E402
from manifests.schema import manifest_schema  # noqa: E402
from manifests.shards import write_tar  # noqa: E402
from manifests.tables import StageColumns  # noqa: E402

GEN = StageColumns("gen", (pa.field("variant", pa.int64()),), True)
QUALITY = StageColumns("quality", (pa.field("sharpness", pa.float32()), pa.field("yaw", pa.float32())), False)
LABELS = StageColumns("labels", (pa.field("pose_bin", pa.string()),), False)
STAGES = [GEN, QUALITY, LABELS]


def build_run(out: Path, samples: int, shard_size: int, write_shards: int) -> list[str]:
    """Synthetic manifests (and tiny tars for the first write_shards shards)."""
    from manifests.storage import RunStorage

    store = RunStorage(str(out))
    rng = np.random.default_rng(0)
    png = encode_png(np.full((8, 8, 3), 128, np.uint8))
    shards = []
    for s, start in enumerate(range(0, samples, shard_size)):
        shard = f"{s:06d}"
        shards.append(shard)
        n = min(shard_size, samples - start)
        idx = np.arange(start, start + n)
        sids = [f"s{i:09d}" for i in idx]
        common = {"sample_id": sids, "key": sids, "identity_id": [f"id{i // 50:07d}" for i in idx],
                  "parent_id": [None] * n, "shard": [shard] * n, "status": ["ok"] * n, "params_hash": ["p"] * n,
                  "fingerprint": ["f"] * n, "stage_version": ["1"] * n}
        if s < write_shards:
            data, index = write_tar([{"__key__": k, "png": png} for k in sids])
            store.write_atomic(data, "shards", "gen", f"{shard}.tar")
            offsets = [index[k]["png"].offset for k in sids]
            sizes = [index[k]["png"].size for k in sids]
            tar = [f"shards/gen/{shard}.tar"] * n
        else:
            offsets, sizes, tar = list(range(0, n * 1024, 1024)), [len(png)] * n, [f"shards/gen/{shard}.tar"] * n
        keep_q = rng.random(n) > 0.1
        sharp = rng.random(n).astype(np.float32) * 100
        per_stage = {
            "gen": {"keep": [True] * n, "reason": [None] * n, "variant": (idx % 50).tolist(), "output_shard": tar,
                    "tar_offset": offsets, "tar_size": sizes, "image_ext": ["png"] * n},
            "quality": {"keep": keep_q.tolist(),
                        "reason": [None if k else f"sharpness {v:.2f} < 10" for k, v in zip(keep_q, sharp,
                                                                                             strict=True)],
                        "sharpness": sharp.tolist(), "yaw": (rng.random(n) * 60 - 30).astype(np.float32).tolist()},
            "labels": {"keep": [True] * n, "reason": [None] * n,
                       "pose_bin": [("frontal", "left", "right")[i % 3] for i in idx]},
        }
        for st in STAGES:
            schema = manifest_schema(list(st.fields))
            cols = dict(common, stage=[st.stage_id] * n, stage_name=[st.stage_id] * n, **per_stage[st.stage_id])
            t = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)
            buf = io.BytesIO()
            pq.write_table(t, buf)
            store.write_atomic(buf.getvalue(), *manifest_path(st.stage_id, shard))
    return shards


def run_new(out: Path, shards: list[str], write_shards: int, shard_size: int, cpus: int) -> list[dict[str, Any]]:
    import ray

    from manifests.storage import RunStorage
    from pipeline.export.config import ExportConfig
    from pipeline.export.task import run_export
    from pipeline.run_tables import write_run_tables

    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ffbench-", dir="/tmp"))
    store = RunStorage(str(out))
    fps = {s.stage_id: "fp-" + s.stage_id for s in STAGES}
    stages = [{"id": "gen", "name": "gen"}, {"id": "quality", "name": "quality"}, {"id": "labels", "name": "labels"}]
    rows = []
    try:
        with PeakRss() as peak:
            t0 = time.perf_counter()
            write_run_tables(store, STAGES, fps, shards)
            rows.append({"step": "new: run tables", "samples": len(shards) * shard_size,
                         "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": peak.peak >> 20,
                         "largest": peak.peak_name})
        plan_only = ExportConfig(where="shard < '000000'", shard_size=1000)  # plans everything, writes nothing
        with PeakRss() as peak:
            t0 = time.perf_counter()
            run_export(store, stages, plan_only, "bench-plan", "h", rows_per_file=shard_size)
            rows.append({"step": "new: export planning (all rows scanned, none selected)",
                         "samples": len(shards) * shard_size, "seconds": round(time.perf_counter() - t0, 2),
                         "peak_rss_mib": peak.peak >> 20, "largest": peak.peak_name})
        cfg = ExportConfig(where=f"shard < '{write_shards:06d}'", shard_size=1000)
        with PeakRss() as peak:
            t0 = time.perf_counter()
            done, _ = run_export(store, stages, cfg, "bench-write", "h", rows_per_file=shard_size)
            written = sum(s["samples"] for s in done["splits"].values())
            rows.append({"step": "new: export plan + write", "samples": len(shards) * shard_size,
                         "exported": written, "seconds": round(time.perf_counter() - t0, 2),
                         "peak_rss_mib": peak.peak >> 20, "largest": peak.peak_name})
    finally:
        ray.shutdown()
    return rows


OLD_SCRIPT = r"""
import json, resource, sys, time, importlib.util
sys.path.insert(0, sys.argv[2])
spec = importlib.util.spec_from_file_location("old_export", sys.argv[3])
old = importlib.util.module_from_spec(spec); sys.modules["old_export"] = old; spec.loader.exec_module(old)
from manifests.storage import RunStorage
t0 = time.perf_counter()
table, stats = old.plan_export(RunStorage(sys.argv[1]), ["gen", "quality", "labels"], "gen",
                               old.ExportConfig(shard_size=1000))
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "selected": table.num_rows,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))
"""


def run_old(out: Path, samples: int) -> dict[str, Any] | None:
    """main's single-process export planning (Catalog samples view + Python rows), in a subprocess."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", "main:pipeline/export.py"], check=True,
                             capture_output=True, text=True).stdout
    except subprocess.CalledProcessError:
        return None
    mod = out.parent / "old_export.py"
    mod.write_text(src)
    res = subprocess.run([sys.executable, "-c", OLD_SCRIPT, str(out), str(ROOT), str(mod)], capture_output=True,
                         text=True, timeout=3600)
    if res.returncode != 0:
        return {"step": "old (main): export planning", "samples": samples, "error": res.stderr.strip()[-400:]}
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    return {"step": "old (main): export planning, one process", "samples": samples, **doc, "largest": "driver"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--old-samples", type=int, default=100_000, help="main's planner at this size (0: skip); "
                    "it holds every row as Python dicts, so 1M needs ~30 GiB")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--write-shards", type=int, default=20, help="source shards with real tars, exported")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = Path(args.out or tempfile.mkdtemp(prefix="bench-export-"))
    results = []
    sizes = sorted({n for n in (args.old_samples, args.samples) if n})
    for n in sizes:
        run = base / f"run-{n}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        shards = build_run(run, n, args.shard_size, min(args.write_shards, -(-n // args.shard_size)))
        print(json.dumps({"step": "build synthetic manifests", "samples": n,
                          "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        if n == args.old_samples:
            old = run_old(run, n)
            if old:
                results.append(old)
                print(json.dumps(old), flush=True)
        for row in run_new(run, shards, min(args.write_shards, len(shards)), args.shard_size, args.cpus):
            results.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
