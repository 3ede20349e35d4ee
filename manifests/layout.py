"""Every path and file name of a run directory, in one place.

A run directory is read by the engine, the catalog, lineage, status, the report, the export and the
training jobs; each of them names its files through this module, so the layout documented in the
README is the layout in the code. Paths are tuples of parts, joined by ``RunStorage``.

```
run.yaml                                  frozen config, its hash, per-stage fingerprints
plan.parquet                              the source's shard plan (one row per shard; plan.json in older runs)
.lock                                     one writer per run directory
identities/identities.parquet
shards/<stage>/<shard>.tar                pixel-writing stages only
manifests/<stage>/<shard>.parquet         one row per sample per stage: the lineage (the commit)
export/...                                training shards, export manifest, dataset card
report/index.html, report/<stage>.summary.json
history/<time>.json                       what each invocation did
metrics/<job>/...                         training and evaluation metrics
cache/...                                 stage caches (MLLM answers)
```
"""

from __future__ import annotations

RUN_FILE = "run.yaml"
PLAN_FILE = "plan.parquet"
LEGACY_PLAN_FILE = "plan.json"  # read (never written) for runs made before the plan became Parquet
LOCK_FILE = ".lock"

IDENTITIES_DIR = "identities"
IDENTITIES_FILE = (IDENTITIES_DIR, "identities.parquet")
SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
EXPORT_DIR = "export"
EXPORT_DONE = "export.json"
EXPORT_MANIFEST = "manifest.parquet"
REPORT_DIR = "report"
REPORT_FILE = (REPORT_DIR, "index.html")
HISTORY_DIR = "history"
METRICS_DIR = "metrics"
CACHE_DIR = "cache"

MANIFEST_SUFFIX = ".parquet"
SHARD_SUFFIX = ".tar"

# What ``--new`` removes: everything a run wrote (the lock and history stay).
RUN_OUTPUTS = (MANIFESTS_DIR, SHARDS_DIR, EXPORT_DIR, IDENTITIES_DIR, REPORT_DIR, CACHE_DIR, METRICS_DIR,
               RUN_FILE, PLAN_FILE, LEGACY_PLAN_FILE)


def manifest_path(stage_id: str, shard: str) -> tuple[str, ...]:
    return (MANIFESTS_DIR, stage_id, f"{shard}{MANIFEST_SUFFIX}")


def shard_path(stage_id: str, shard: str) -> tuple[str, ...]:
    return (SHARDS_DIR, stage_id, f"{shard}{SHARD_SUFFIX}")


def stage_summary_path(stage_id: str) -> tuple[str, ...]:
    return (REPORT_DIR, f"{stage_id}.summary.json")


def history_path(stamp: str) -> tuple[str, ...]:
    return (HISTORY_DIR, f"{stamp}.json")
