"""Folder ingest planning: the plan size and the driver's peak RSS, before (every path in plan.json) and
after (a streamed, sorted Parquet listing in the run directory; the plan holds row ranges).

    python bench/bench_ingest_listing.py [--files 200000] [--shard-size 256] [--synthetic N ...]

Builds a local tree of empty files (``--files`` of them, 1000 per folder), plans it in a fresh
process per variant (so each peak RSS is its own), sorts ``--synthetic`` counts of generated paths
through the listing alone (no tree: shows that the listing's memory does not grow with N), and
prints one JSON line with all of them side by side and the figures extrapolated to 1M paths. The
"after" peak is bounded by one folder and DuckDB's 64 MB sort limit, beyond which it spills to disk.
"before" is the former algorithm, kept here as the baseline: ``fs.find`` into a sorted Python list,
cut into shards of paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree(root: Path, files: int) -> None:
    marker = root / f".built-{files}"
    if marker.exists():
        return
    per = 1000
    for d in range((files + per - 1) // per):
        folder = root / f"person{d:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per, files - d * per)):
            (folder / f"img_{i:05d}.jpg").touch()
    marker.touch()


def child(variant: str, root: str, run_dir: str, shard_size: int) -> dict[str, object]:
    import resource

    import fsspec

    from manifests.storage import RunStorage
    from stages.base import StageContext
    from stages.sources.ingest import IngestParams, IngestStage

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after the imports: same for both
    t0 = time.monotonic()
    if variant.startswith("synthetic-"):  # the listing machinery alone on N generated paths, unsorted
        from manifests.listing import write_listing

        n = int(variant.split("-", 1)[1])
        paths = (f"person{i // 1000:06d}/img_{i % 1000:05d}.jpg" for i in range(n - 1, -1, -1))
        count = write_listing(RunStorage(run_dir), ("listing.parquet",), paths)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"paths": count, "listing_bytes": (Path(run_dir) / "listing.parquet").stat().st_size,
                "rss_growth_mb": round((peak - base) / 2**20, 1), "seconds": round(time.monotonic() - t0, 2)}
    if variant == "before":
        fs, r = fsspec.core.url_to_fs(root)
        exts = {"jpg", "jpeg", "png", "webp", "bmp"}
        paths = []
        for path in fs.find(r):
            rel = os.path.relpath(path, r)
            if "." in rel.rsplit("/", 1)[-1] and rel.rsplit(".", 1)[1].lower() in exts:
                paths.append(rel)
        paths.sort()
        shards = [{"root": root, "paths": paths[a : a + shard_size]} for a in range(0, len(paths), shard_size)]
        plan = json.dumps({"shards": shards}, sort_keys=True).encode()
        listing_bytes = 0
        n = len(paths)
    else:
        st = IngestStage(IngestParams(root=root), StageContext(run_dir=run_dir, stage_id="ingest", seed=0))
        store = RunStorage(run_dir)
        st.prepare(store)
        shards = st.plan(shard_size)
        plan = json.dumps({"shards": shards}, sort_keys=True).encode()
        listing = Path(run_dir) / shards[0]["listing"]
        listing_bytes = listing.stat().st_size
        n = shards[-1]["stop"]
    seconds = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"paths": n, "shards": len(shards), "plan_bytes": len(plan), "listing_bytes": listing_bytes,
            "peak_rss_mb": round(peak / 2**20, 1), "rss_growth_mb": round((peak - base) / 2**20, 1),
            "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ff-bench-listing"))
    ap.add_argument("--synthetic", type=int, nargs="*", default=[200_000, 1_000_000, 3_000_000],
                    help="also sort this many generated paths through the listing alone (no tree)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "ROOT", "RUN_DIR"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, shard_size=args.shard_size)))
        return
    tree = Path(args.dir) / "tree"
    t0 = time.monotonic()
    build_tree(tree, args.files)
    built = time.monotonic() - t0
    out: dict[str, object] = {"files": args.files, "shard_size": args.shard_size, "build_s": round(built, 1)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for variant in ("before", "after"):
        with tempfile.TemporaryDirectory(prefix="ff-bench-run-") as run_dir:
            res = subprocess.run([sys.executable, __file__, "--shard-size", str(args.shard_size), "--child",
                                  variant, str(tree), run_dir], env=env, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    for n in args.synthetic:
        with tempfile.TemporaryDirectory(prefix="ff-bench-run-") as run_dir:
            res = subprocess.run([sys.executable, __file__, "--child", f"synthetic-{n}", "-", run_dir], env=env,
                                 capture_output=True, text=True, check=True)
        out[f"listing_only_{n}"] = json.loads(res.stdout.strip().splitlines()[-1])
    scale = 1_000_000 / args.files
    before, after = out["before"], out["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    out["per_1M_paths"] = {
        "before_plan_mb": round(before["plan_bytes"] * scale / 2**20, 1),
        "after_plan_mb": round(after["plan_bytes"] * scale / 2**20, 2),
        "after_listing_mb": round(after["listing_bytes"] * scale / 2**20, 1),
        "before_rss_growth_mb": round(before["rss_growth_mb"] * scale, 0),
    }
    out["plan_ratio"] = round(before["plan_bytes"] / max(after["plan_bytes"], 1), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
