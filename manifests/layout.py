"""Every path and file name of a run directory, in one place.

A run directory is read by the engine, the catalog, lineage, status, the report, the export and the
training jobs; each of them names its files through this module, so the layout documented in the
README is the layout in the code. Paths are tuples of parts, joined by ``RunStorage``.

```
run.yaml                                  frozen config, its hash, per-stage fingerprints
plan.parquet                              the source's shard plan (one row per shard; plan.json in older runs)
.lock                                     one writer per run directory
identities/identities.parquet
sources/<stage>/listing-<hash>.parquet    a folder source's file listing, frozen on first run
sources/storage.json                      fsspec options per source location (scheme://bucket) images are read from
shards/<stage>/<shard>.tar                pixel-writing stages only
manifests/<stage>/<shard>.parquet         one row per sample per stage: the lineage (the commit)
manifests/<stage>/_compacted/current.json the stage's sorted copy (which fragments it covers) ...
manifests/<stage>/_compacted/<gen>/*.parquet   ... and its files, sorted by sample_id
tables/samples/<shard>.parquet            one row per sample, every stage's columns, ONE schema
tables/decisions/<shard>.parquet          one row per sample per stage: status, keep, rule, detail
tables/tables.json                        the tables' commit: stamp, shards, rows
export/export.json                        the export's commit (written last), names its version folder
export/README.md, export/manifest.parquet the dataset card (HF front matter) and the export manifest
export/v-<fingerprint>/<split>/shard-*.tar training shards of one export version
report/index.html, report/<stage>.summary.json
report/refill.json                        refill rounds of a generator run and where its identities ended
history/<time>.json                       what each invocation did
metrics/<job>/...                         training and evaluation metrics
cache/...                                 stage caches (MLLM answers)
cache/gallery/<key>/{gallery.parquet,index.faiss}   a reference gallery embedded + indexed once (leakage)
cache/gallery/<stage>.json                the gallery key and space a stage's run uses
cache/gallery/<stage>.fit.json            the thresholds it decided with (fitted or given) and how
work/<stage>/<step>/p<part>/<shard>.parquet   a global stage's shuffle partitions (removed when it ends)
```
"""

from __future__ import annotations

RUN_FILE = "run.yaml"
PLAN_FILE = "plan.parquet"
LEGACY_PLAN_FILE = "plan.json"  # read (never written) for runs made before the plan became Parquet
LOCK_FILE = ".lock"

IDENTITIES_DIR = "identities"
IDENTITIES_FILE = (IDENTITIES_DIR, "identities.parquet")
SOURCES_DIR = "sources"
SOURCE_STORAGE_FILE = (SOURCES_DIR, "storage.json")
SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
EXPORT_DIR = "export"
EXPORT_DONE = "export.json"
EXPORT_MANIFEST = "manifest.parquet"
EXPORT_CARD = "README.md"  # the Hugging Face dataset card: `datasets.load_dataset(export_dir)` reads it
EXPORT_CARD_LEGACY = "dataset_card.md"
EXPORT_VERSION_PREFIX = "v-"
TABLES_DIR = "tables"
SAMPLES_TABLE = (TABLES_DIR, "samples")
DECISIONS_TABLE = (TABLES_DIR, "decisions")
TABLES_DONE = (TABLES_DIR, "tables.json")
REPORT_DIR = "report"
REPORT_FILE = (REPORT_DIR, "index.html")
REFILL_SUMMARY = (REPORT_DIR, "refill.json")
HISTORY_DIR = "history"
METRICS_DIR = "metrics"
CACHE_DIR = "cache"
WORK_DIR = "work"

COMPACTED_DIR = "_compacted"  # "_": never a committed fragment, never matched by the fragment glob
COMPACTED_POINTER = "current.json"

MANIFEST_SUFFIX = ".parquet"
SHARD_SUFFIX = ".tar"

# What ``--new`` removes: everything a run wrote (the lock and history stay).
RUN_OUTPUTS = (MANIFESTS_DIR, SHARDS_DIR, TABLES_DIR, EXPORT_DIR, IDENTITIES_DIR, SOURCES_DIR, REPORT_DIR, CACHE_DIR,
               METRICS_DIR, WORK_DIR, RUN_FILE, PLAN_FILE, LEGACY_PLAN_FILE)


def manifest_path(stage_id: str, shard: str) -> tuple[str, ...]:
    return (MANIFESTS_DIR, stage_id, f"{shard}{MANIFEST_SUFFIX}")


def shard_path(stage_id: str, shard: str) -> tuple[str, ...]:
    return (SHARDS_DIR, stage_id, f"{shard}{SHARD_SUFFIX}")


def tar_owner(rel: str) -> tuple[str, str] | None:
    """(stage_id, shard) of a shard tar path as ``shard_path`` builds it; None for any other path."""
    parts = rel.split("/", 2)
    if len(parts) != 3 or parts[0] != SHARDS_DIR or not parts[2].endswith(SHARD_SUFFIX):
        return None
    return parts[1], parts[2][: -len(SHARD_SUFFIX)]


def compacted_dir(stage_id: str) -> tuple[str, ...]:
    return (MANIFESTS_DIR, stage_id, COMPACTED_DIR)


def stage_summary_path(stage_id: str) -> tuple[str, ...]:
    return (REPORT_DIR, f"{stage_id}.summary.json")


GALLERY_CACHE = "gallery"
GALLERY_TABLE = "gallery.parquet"
GALLERY_INDEX = "index.faiss"


def gallery_cache_path(key: str, name: str) -> tuple[str, ...]:
    """A file of a reference gallery's cache; ``key`` hashes the gallery and how it was embedded."""
    return (CACHE_DIR, GALLERY_CACHE, key, name)


def gallery_pointer_path(stage_id: str) -> tuple[str, ...]:
    """Which cached gallery a stage scores against in this run (written once per run, before the shards)."""
    return (CACHE_DIR, GALLERY_CACHE, f"{stage_id}.json")


def gallery_fit_path(stage_id: str) -> tuple[str, ...]:
    """The thresholds a leakage stage decided with, written before its shards commit."""
    return (CACHE_DIR, GALLERY_CACHE, f"{stage_id}.fit.json")


def history_path(stamp: str) -> tuple[str, ...]:
    return (HISTORY_DIR, f"{stamp}.json")


def listing_path(stage_id: str, digest: str) -> tuple[str, ...]:
    """Named after what shaped the listing (root, extensions), so a changed source never reuses it."""
    return (SOURCES_DIR, stage_id, f"listing-{digest}.parquet")


def table_file(table: tuple[str, ...], shard: str) -> tuple[str, ...]:
    """One file of a run table (``SAMPLES_TABLE`` or ``DECISIONS_TABLE``) per source shard."""
    return (*table, f"{shard}{MANIFEST_SUFFIX}")


def export_version_dir(fingerprint: str) -> str:
    """The folder (relative to ``export/``) one export version writes beside the committed one."""
    return f"{EXPORT_VERSION_PREFIX}{fingerprint[:16]}"


# Shuffle pieces are written once and read once by the next step of the same stage: Arrow IPC with
# lz4 buffers, not Parquet (no encoding or statistics to compute for a file nobody queries; an order of
# magnitude faster to write and read for a piece of float vectors, and smaller).
SHUFFLE_SUFFIX = ".arrow"


def global_work_dir(stage_id: str, step: str | None = None) -> tuple[str, ...]:
    """Scratch space of one global stage (or one shuffle step of it): partitioned Arrow IPC files, not a
    commit."""
    return (WORK_DIR, stage_id) if step is None else (WORK_DIR, stage_id, step)


def global_work_partition(stage_id: str, step: str, part: int) -> tuple[str, ...]:
    """The folder of one shuffle partition: one piece per source (shard or earlier partition)."""
    return (WORK_DIR, stage_id, step, f"p{part:05d}")


def global_work_path(stage_id: str, step: str, part: int, source: str) -> tuple[str, ...]:
    """One source's piece of one shuffle partition."""
    return (*global_work_partition(stage_id, step, part), f"{source}{SHUFFLE_SUFFIX}")
