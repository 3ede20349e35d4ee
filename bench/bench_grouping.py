"""Grouping and dedup scored against planted truth at scale, the way face-clustering papers score them.

Builds an image-free run (tests/fixtures/identity_model.py: identities with a per-identity spread, a
long tail of images per identity, look-alike identity pairs at a set centroid cosine, hard images,
planted re-encode / resize / crop duplicates across shards, near variants that are distinct pictures),
written shard by shard by a process pool so no process holds the corpus; then runs dedup and grouping
(the scalable method) through pipeline.engine.global_exec on a local Ray, as the runner does, and the
exact method beside the scalable one on a prefix subset (``--subset`` samples, whole identities).

Scores come from the committed manifests joined with the truth columns (tests/fixtures/truth_scores.py),
not from the stages' own summaries (``summary_bcubed_f`` is the stage's own figure where it reports one).
Prints one JSON line:

- samples, identities, seconds (dedup and grouping on the full run), peak_rss_gib (the largest single
  process meanwhile: driver, raylet and every Ray worker, sampled every 0.2 s);
- bcubed_precision / bcubed_recall / bcubed_f, pairwise precision / recall / f, purity, inverse_purity
  of the scalable grouping of the full run;
- exact_bcubed_f / exact_pairwise_f (exact average linkage) and subset_scalable_bcubed_f /
  subset_scalable_pairwise_f on the same subset (a run of its own), and full_run_on_subset_bcubed_f /
  _pairwise_f: the full run's scalable grouping scored on the subset's samples only, so what the scalable
  path loses at scale (approximate neighbour search, more neighbours competing) shows beside the exact
  figure; subset_peak_rss_gib: the largest process while the subset was grouped (the exact method's
  memory grows with the subset, so it is kept out of peak_rss_gib);
- duplicate_recall (planted copies in their source's duplicate group) and duplicate_false_drop_rate
  (distinct pictures lost: per duplicate group, pictures in it minus samples it keeps, over all
  distinct pictures), and variants_dropped (near variants dropped as duplicates).

    .venv/bin/python bench/bench_grouping.py --samples 1000000 --out /tmp/grouping-1m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_scale import PeakRss
from tests.fixtures.identity_model import IdentityModel
from tests.fixtures.synthetic_corpus import write_shard
from tests.fixtures.truth_scores import TRUTH, clustering_scores, duplicate_scores


def _write_shard(args: tuple[dict[str, Any], str, int]) -> None:
    cfg, run, s = args
    write_shard(IdentityModel(**cfg), run, s)


def build(model: IdentityModel, run: str, cpus: int) -> list[str]:
    """The model's ``features`` manifests in ``run``, reused when the run was built from the same model."""
    cfg = dataclasses.asdict(model)
    built = Path(run, "built.json")
    if not (built.exists() and json.loads(built.read_text()) == json.loads(json.dumps(cfg))):
        shutil.rmtree(run, ignore_errors=True)
        Path(run).mkdir(parents=True)
        with mp.get_context("spawn").Pool(cpus) as pool:
            pool.map(_write_shard, [(cfg, run, s) for s in range(model.shards)], chunksize=1)
        built.write_text(json.dumps(cfg))
    return [f"{s:06d}" for s in range(model.shards)]


def grouping_params(method: str, threshold: float | None, limit: int) -> Any:
    """GroupingParams for ``exact`` or ``scalable``; a grouping stage that knows neither name gets its
    average linkage (``agglomerative``), whole up to ``limit`` samples for exact, per threshold-graph
    component above ``agglomerative_max`` for scalable."""
    from pydantic import ValidationError

    from stages.corpus.grouping import GroupingParams

    try:
        return GroupingParams(method=method, threshold=threshold, gt_column=TRUTH)
    except ValidationError:
        extra = {"agglomerative_max": max(limit, 12_000)} if method == "exact" else {}
        return GroupingParams(method="agglomerative", threshold=threshold, gt_column=TRUTH, **extra)


def run_stage(run: str, shards: list[str], sid: str, cls: type, params: Any, memory_gb: float) -> dict[str, Any]:
    from pipeline.engine.global_exec import run_global_distributed
    from stages.base import Resources
    from tests.fixtures.synthetic_corpus import global_spec

    shutil.rmtree(Path(run, "manifests", sid), ignore_errors=True)
    stage_cls = type(cls.__name__, (cls,), {"resources": Resources(cpus=1.0, memory_gb=memory_gb)})
    run_global_distributed(global_spec(stage_cls, params, run, stage_id=sid), shards, shards)  # type: ignore[arg-type]
    summary: dict[str, Any] = json.loads(Path(run, "report", f"{sid}.summary.json").read_text())
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--subset", type=int, default=12_000, help="samples of the exact-vs-scalable subset")
    ap.add_argument("--out", default=None, help="keep the runs here (full/ and subset/); reused if built alike")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--per-identity", type=int, default=25, help="mean images per identity (long-tailed)")
    ap.add_argument("--sibling-fraction", type=float, default=0.1, help="identities that are look-alikes")
    ap.add_argument("--sibling-cosine", type=float, default=0.6, help="centroid cosine of a look-alike pair")
    ap.add_argument("--threshold", type=float, default=None, help="grouping threshold; default: the stage's")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=2.0, help="declared per global task (Ray memory=)")
    args = ap.parse_args()

    import ray

    from stages.corpus.dedup import DedupParams, DedupStage
    from stages.corpus.grouping import GroupingStage

    root = args.out or tempfile.mkdtemp(prefix="ff-bench-grouping-")
    common = {"dim": args.dim, "shard_size": args.shard_size, "mean_per_identity": args.per_identity,
              "sibling_fraction": args.sibling_fraction, "sibling_cosine": args.sibling_cosine}
    model = IdentityModel(samples=args.samples, **common)
    subset = IdentityModel(samples=min(args.subset, args.samples), **common)
    full_run, sub_run = str(Path(root, "full")), str(Path(root, "subset"))
    t0 = time.perf_counter()
    shards = build(model, full_run, args.cpus)
    sub_shards = build(subset, sub_run, args.cpus)
    build_s = time.perf_counter() - t0

    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"))
    summaries: dict[str, dict[str, Any]] = {}
    stage_s: dict[str, float] = {}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        for sid, cls, params in (("dedup", DedupStage, DedupParams()),
                                 ("grouping", GroupingStage, grouping_params("scalable", args.threshold, 0))):
            t1 = time.perf_counter()
            summaries[sid] = run_stage(full_run, shards, sid, cls, params, args.memory_gb)
            stage_s[sid] = round(time.perf_counter() - t1, 1)
        seconds = time.perf_counter() - t0
    with PeakRss() as sub_rss:  # the exact method's memory grows with the subset: measured apart
        for sid, method in (("grouping", "scalable"), ("grouping_exact", "exact")):
            t1 = time.perf_counter()
            summaries[f"subset_{sid}"] = run_stage(sub_run, sub_shards, sid, GroupingStage,
                                                   grouping_params(method, args.threshold, subset.samples),
                                                   args.memory_gb)
            stage_s[f"subset_{method}"] = round(time.perf_counter() - t1, 1)
    ray.shutdown()

    full = clustering_scores(full_run, "grouping")
    sub_scalable = clustering_scores(sub_run, "grouping")
    sub_exact = clustering_scores(sub_run, "grouping_exact")
    full_on_sub = clustering_scores(full_run, "grouping", shards=sub_shards)
    g = summaries["grouping"]
    out: dict[str, Any] = {
        "samples": args.samples, "identities": model.identities, "dim": args.dim,
        "look_alike_pairs": len(model.sibling_pairs()), "sibling_cosine": args.sibling_cosine,
        "method": g.get("method"), "threshold": g.get("threshold"), "groups": int(full["groups"]),
        **{k: full[k] for k in ("bcubed_precision", "bcubed_recall", "bcubed_f", "pairwise_precision",
                                "pairwise_recall", "pairwise_f", "purity", "inverse_purity")},
        "summary_bcubed_f": g.get("bcubed_f"),
        "subset_samples": subset.samples, "subset_exact_method": summaries["subset_grouping_exact"].get("method"),
        "exact_bcubed_f": sub_exact["bcubed_f"], "exact_pairwise_f": sub_exact["pairwise_f"],
        "subset_scalable_bcubed_f": sub_scalable["bcubed_f"], "subset_scalable_pairwise_f": sub_scalable["pairwise_f"],
        "full_run_on_subset_bcubed_f": full_on_sub["bcubed_f"],
        "full_run_on_subset_pairwise_f": full_on_sub["pairwise_f"],
        **duplicate_scores(full_run),
        "seconds": round(seconds, 1), "stage_seconds": stage_s, "build_seconds": round(build_s, 1),
        "peak_rss_gib": round(rss.peak / 2**30, 3), "peak_rss_process": rss.peak_name,
        "driver_peak_rss_gib": round(rss.driver_peak / 2**30, 3),
        "subset_peak_rss_gib": round(sub_rss.peak / 2**30, 3),
    }
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
