"""Identity selection and the leak-checked split at scale: the export plan (both passes, look-alike
search, cross-split similarities) on synthetic ``tables/samples`` written shard by shard (identities
of 50 images, 32-d embeddings, planted look-alikes and a dedup group), no pixels.

Prints one JSON line per size: seconds and the peak RSS of the largest process (driver or any Ray
worker), to show that memory per process stays flat as N grows (rows_per_task bounds each task).

    python bench/bench_selection.py --samples 500000 2000000 --out /tmp/bench-selection
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import PeakRss  # noqa: E402

from manifests.storage import RunStorage  # noqa: E402
from pipeline.engine.tasks import task_options  # noqa: E402
from pipeline.export.config import ExportConfig  # noqa: E402
from pipeline.export.task import plan_export  # noqa: E402
from tests.fixtures.selection_tables import STAGES, write_samples  # noqa: E402

SHARD_ROWS = 10_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[500_000, 2_000_000])
    ap.add_argument("--rows-per-task", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/bench-selection")
    args = ap.parse_args()
    import ray

    from pipeline.engine import embedded

    embedded.start(num_cpus=2, configure_logging=False, log_to_driver=False)
    # 32-d random identities sit closer than ArcFace's 512-d ones: the look-alike threshold is set for them.
    cfg = ExportConfig(val_fraction=0.1, rows_per_task=args.rows_per_task, splits={"threshold": 0.8}, identities={
        "min_images": 20, "max_images": 40, "prefer": {"score": "labels.quality"},
        "balance": {"column": "labels.pose_bin", "shares": {"frontal": 0.5, "left": 0.25, "right": 0.25},
                    "fill": True}})
    for n in args.samples:
        run = Path(args.out) / f"n{n}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        write_samples(run, n // 50 + 1, 51, max(1, n // SHARD_ROWS), dim=32)
        wrote = time.perf_counter() - t0
        store = RunStorage(str(run))
        with PeakRss() as peak:
            t0 = time.perf_counter()
            plan = plan_export(store, STAGES, cfg, "v-bench", SHARD_ROWS, task_options(0.5, 2**30))
            seconds = time.perf_counter() - t0
        print(json.dumps({"bench": "selection_split", "samples": n, "identities": plan.selection.identities,
                          "selected": plan.selection.samples, "seconds": round(seconds, 2),
                          "write_seconds": round(wrote, 2), "peak_rss_mib": peak.peak >> 20,
                          "peak_process": peak.peak_name, "rows_per_task": args.rows_per_task,
                          "lookalike_pairs": plan.splits.get("lookalike_pairs"),
                          "max_identity_similarity": (plan.splits.get("max_identity_similarity") or {}).get("score"),
                          "max_image_similarity": (plan.splits.get("max_image_similarity") or {}).get("score")}),
              flush=True)
        shutil.rmtree(run, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
