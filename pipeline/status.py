"""`facefoundry status`: per stage, shards committed/total, samples in/kept/dropped/errored,
throughput, and whether the run (and its export) is complete.

Throughput is two numbers on purpose. Capacity is rows per busy second of one worker (rows over the
sum of ``duration_ms``): what the stage can do. Wall rate is rows per second of the stage's wall
span (from the start of its first shard to the commit of its last): what it did. A stage whose wall
rate is far below capacity x workers waited on its input or on the cluster; the stage with the lowest
capacity x workers is the bottleneck. A resumed run's wall span includes the pause.

The figures are sums of the per-fragment counts each commit record carries (manifests/commit.py), so
status reads one footer per fragment -- the read that verifies the fragment anyway -- and no rows.
Fragments written before the records carried counts are counted from their rows, with the same SQL.
"""

from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING, Any

from manifests.commit import scan_fragments, stage_totals
from manifests.layout import EXPORT_DIR, EXPORT_DONE, TABLES_DONE
from manifests.storage import RunStorage
from pipeline.engine.rundir import NotARunError as NotARunError  # the CLI's callers import it from here
from pipeline.engine.rundir import RunState, plan_size, read_run_file

if TYPE_CHECKING:
    import duckdb


def stage_order(store: RunStorage) -> list[str]:
    return _order(_run_state(store))


def _run_state(store: RunStorage) -> RunState:
    state = read_run_file(store)
    if state is None:
        raise NotARunError(f"{store.url} is not a facefoundry run (no run.yaml)")
    return state


def _order(state: RunState) -> list[str]:
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
        out[stage] = _stats(int(n), int(kept), int(dropped), int(errors), float(busy or 0.0), int(workers),
                            float(wall or 0.0))
    return out


def _stats(n: int, kept: int, dropped: int, errors: int, busy: float, workers: int, wall: float) -> dict[str, Any]:
    return {"samples": n, "kept": kept, "dropped": dropped, "errors": errors, "busy_s": busy, "workers": workers,
            "wall_s": wall, "capacity_per_worker": n / busy if busy > 0 else None,
            "wall_rate": n / wall if wall > 0 else None}


def _from_totals(t: dict[str, Any]) -> dict[str, Any]:
    start, done = t.get("start_s"), t.get("done_s")
    wall = float(done - start) if start is not None and done is not None else 0.0
    return _stats(int(t["samples"]), int(t["kept"]), int(t["dropped"]), int(t["errors"]), float(t["busy_s"]),
                  len(t["workers"]), wall)


def run_status(store: RunStorage) -> dict[str, Any]:
    from manifests.catalog import Catalog

    state = _run_state(store)
    order = _order(state)
    total = plan_size(store)
    # The catalog decides what is committed (a valid compacted copy, else each fragment's footer);
    # the counts come from the copy's pointer or the footers' records, never from the rows.
    catalog = Catalog(store, order)
    stats: dict[str, dict[str, Any] | None] = {}
    for sid in order:
        src = catalog.source(sid)
        totals = (src.compacted or {}).get("stats")
        if totals is None and src.fragments:
            frags = src.verified if src.verified is not None else scan_fragments(store, sid).fragments
            totals = stage_totals(f for f in frags if posixpath.basename(f.path) in src.fragments)
            stats[sid] = None if totals is None else _from_totals(totals)
        else:
            stats[sid] = _from_totals(totals) if totals is not None else _stats(0, 0, 0, 0, 0.0, 0, 0.0)
    if any(v is None for v in stats.values()):  # fragments of an older version: count their rows
        with catalog.connect(read_only=True, sql=STAGE_STATS_SQL) as con:
            from_rows = stage_stats(con)
        empty = _stats(0, 0, 0, 0, 0.0, 0, 0.0)
        stats = {sid: v if v is not None else from_rows.get(sid, empty) for sid, v in stats.items()}
    stages = [{"stage": sid, "shards_committed": len(catalog.source(sid).fragments), "shards_total": total,
               "not_committed": catalog.source(sid).bad, **(stats[sid] or {})} for sid in order]
    export = None
    if store.exists(EXPORT_DIR, EXPORT_DONE):
        export = json.loads(store.read_bytes(EXPORT_DIR, EXPORT_DONE))
    stages_done = total > 0 and all(s["shards_committed"] == total for s in stages)
    # A run whose config turns the export off ends with its tables (the runner's last step then).
    exporting = (state.config.get("export") or {}).get("enabled", True) is not False
    finished = export is not None if exporting else store.exists(*TABLES_DONE)
    from pipeline.refill import read_summary

    return {"run": store.url, "stages": stages, "shards_total": total, "export": export,
            "refill": read_summary(store), "complete": bool(stages_done and finished)}
