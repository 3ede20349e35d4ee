"""The Ray driver side of the run's tables (``tables/samples``, ``tables/decisions``): write them as part
of the run's commit; their file format and column rules are ``manifests.tables``.

One Ray task per source shard joins that shard's fragments of every stage and writes one file of
each table with the common schema; the driver holds shard names and
counts only. ``tables/tables.json`` is written last: a run whose tables commit matches the stage
fingerprints skips this step entirely, and a killed one resumes file by file (each file carries
the stamp it was built from).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa
import ray

from manifests.layout import DECISIONS_TABLE, MANIFEST_SUFFIX, SAMPLES_TABLE, TABLES_DONE
from manifests.storage import RunStorage
from manifests.tables import StageColumns, resolve_stage_columns, samples_schema, stamp, write_shard_tables
from pipeline.engine.tasks import run_tasks, task_options
from pipeline.engine.warm import WarmWorkers

TASK_MEMORY = 512 * 1024 * 1024  # one shard's fragments at a time: far below this
MAX_SHARDS_PER_TASK = 64


def _write_some(url: str, storage_options: dict[str, Any], stages: list[StageColumns], shards: list[str],
                schema_bytes: bytes, stamp_value: str) -> int:

    store = RunStorage(url, storage_options)
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    return sum(write_shard_tables(store, stages, sh, schema, stamp_value)["written"] for sh in shards)


def tables_up_to_date(store: RunStorage, stamp_value: str, shards: list[str]) -> bool:
    done = store.read_json(*TABLES_DONE)
    return done is not None and done.get("stamp") == stamp_value and done.get("shards") == len(shards)


def tables_stamp(store: RunStorage, stages: list[StageColumns], fingerprints: dict[str, str], shards: list[str]
                 ) -> tuple[list[StageColumns], pa.Schema, str]:
    """The stages' columns as committed, the samples schema, and the stamp tables built from them carry."""
    resolved = resolve_stage_columns(store, stages, shards)
    schema = samples_schema(resolved)
    return resolved, schema, stamp(resolved, fingerprints, schema)


def write_run_tables(store: RunStorage, stages: list[StageColumns], fingerprints: dict[str, str],
                     shards: list[str], cpus_per_task: float = 1.0, workers: WarmWorkers | None = None
                     ) -> dict[str, Any]:
    """Build (or resume) the run's tables; returns the tables commit document. ``workers``: the run's
    parked actors, which take the first attempt of each group (retries are fresh tasks)."""
    resolved, schema, value = tables_stamp(store, stages, fingerprints, shards)
    if tables_up_to_date(store, value, shards):
        return dict(json.loads(store.read_bytes(*TABLES_DONE)), written=0)
    pool = workers or WarmWorkers()
    opts = task_options(cpus_per_task, TASK_MEMORY)
    schema_bytes = schema.serialize().to_pybytes()
    # A few shards per task, a whole CPU each: two tasks per CPU fill the cluster and run on the workers
    # Ray already keeps warm (a fraction of a CPU per task makes Ray start a new worker process for each,
    # at the very end of the run). Each file is still its own commit.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, min(MAX_SHARDS_PER_TASK, math.ceil(len(shards) / (2 * cpus))))
    groups = [shards[i : i + per_task] for i in range(0, len(shards), per_task)]
    written = sum(run_tasks("tables", len(groups), lambda i, fresh: pool.submit(
        _write_some, store.url, store.storage_options, resolved, groups[i], schema_bytes, value, options=opts,
        fresh=fresh)))
    keep = {f"{s}{MANIFEST_SUFFIX}" for s in shards}
    for table in (SAMPLES_TABLE, DECISIONS_TABLE):  # files of shards no longer in the plan
        for name in store.list_files(*table, suffix=MANIFEST_SUFFIX):
            if name not in keep:
                store.remove(*table, name)
    doc = {"stamp": value, "shards": len(shards), "stages": [s.stage_id for s in resolved],
           "columns": schema.names, "fingerprints": {s.stage_id: fingerprints.get(s.stage_id) for s in resolved}}
    store.write_atomic(json.dumps(doc, indent=2, sort_keys=True).encode(), *TABLES_DONE)
    return dict(doc, written=written)
