"""`facefoundry status`: per stage, shards committed/total, samples in/kept/dropped/errored,
throughput, and whether the run (and its export) is complete.

Throughput is two numbers on purpose. Capacity is rows per busy second of one worker (rows over the
sum of ``duration_ms``): what the stage can do. Wall rate is rows per second of the stage's wall
span (from the start of its first shard to the commit of its last): what it did. A stage whose wall
rate is far below capacity x workers waited on its input or on the cluster; the stage with the lowest
capacity x workers is the bottleneck. A resumed run's wall span includes the pause.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from manifests.catalog import Catalog
from manifests.layout import EXPORT_DIR, EXPORT_DONE
from manifests.storage import RunStorage
from pipeline.engine.rundir import read_plan, read_run_file


class NotARunError(FileNotFoundError):
    pass


def stage_order(store: RunStorage) -> list[str]:
    state = read_run_file(store)
    if state is None:
        raise NotARunError(f"{store.url} is not a facefoundry run (no run.yaml)")
    return [s.get("id") or s["stage"].rsplit(":", 1)[-1].lower() for s in state.config.get("stages", [])]


# One shard is committed by one worker; its rows share the commit time and split the shard's busy time.
STAGE_STATS_SQL = """
WITH per_shard AS (
    SELECT stage, shard, worker, count(*) AS n,
           count(*) FILTER (WHERE status = 'ok' AND keep) AS kept,
           count(*) FILTER (WHERE status = 'ok' AND NOT keep) AS dropped,
           count(*) FILTER (WHERE status <> 'ok') AS errors,
           coalesce(sum(duration_ms), 0) / 1000.0 AS busy_s,
           epoch(max(processed_at)) AS done_s
    FROM decisions GROUP BY stage, shard, worker
)
SELECT stage, sum(n) AS n, sum(kept) AS kept, sum(dropped) AS dropped, sum(errors) AS errors,
       sum(busy_s) AS busy_s, count(DISTINCT worker) AS workers,
       max(done_s) - min(done_s - busy_s) AS wall_s
FROM per_shard GROUP BY stage
"""


def stage_stats(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """Per stage id: rows, kept, dropped, errors, busy_s, workers, wall_s, capacity_per_worker, wall_rate."""
    out: dict[str, dict[str, Any]] = {}
    for stage, n, kept, dropped, errors, busy, workers, wall in con.execute(STAGE_STATS_SQL).fetchall():
        n, busy, wall = int(n), float(busy or 0.0), float(wall or 0.0)
        out[stage] = {
            "samples": n, "kept": int(kept), "dropped": int(dropped), "errors": int(errors),
            "busy_s": busy, "workers": int(workers), "wall_s": wall,
            "capacity_per_worker": n / busy if busy > 0 else None,
            "wall_rate": n / wall if wall > 0 else None,
        }
    return out


def run_status(store: RunStorage) -> dict[str, Any]:
    order = stage_order(store)
    plan = read_plan(store)
    total = len(plan["shards"]) if plan else 0
    catalog = Catalog(store, order)
    # The catalog lists each stage's committed fragments once; the shard counts come from that listing.
    with catalog.connect(read_only=True, sql=STAGE_STATS_SQL) as con:
        stats = stage_stats(con)
    empty = {"samples": 0, "kept": 0, "dropped": 0, "errors": 0, "busy_s": 0.0, "workers": 0, "wall_s": 0.0,
             "capacity_per_worker": None, "wall_rate": None}
    stages = [{"stage": sid, "shards_committed": len(catalog.source(sid).fragments), "shards_total": total,
               "not_committed": catalog.source(sid).bad, **stats.get(sid, empty)} for sid in order]
    export = None
    if store.exists(EXPORT_DIR, EXPORT_DONE):
        export = json.loads(store.read_bytes(EXPORT_DIR, EXPORT_DONE))
    stages_done = total > 0 and all(s["shards_committed"] == total for s in stages)
    return {"run": store.url, "stages": stages, "shards_total": total, "export": export,
            "complete": bool(stages_done and export is not None)}
