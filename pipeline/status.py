"""`facefoundry status`: per stage, shards committed/total, samples in/kept/dropped/errored,
throughput, and whether the run (and its export) is complete."""

from __future__ import annotations

import json
from typing import Any

from manifests.catalog import Catalog
from manifests.storage import RunStorage
from pipeline.engine.rundir import read_plan, read_run_file


class NotARunError(FileNotFoundError):
    pass


def stage_order(store: RunStorage) -> list[str]:
    state = read_run_file(store)
    if state is None:
        raise NotARunError(f"{store.url} is not a facefoundry run (no run.yaml)")
    return [s.get("id") or s["stage"].rsplit(":", 1)[-1].lower() for s in state.config.get("stages", [])]


_AGG = (
    "SELECT stage, count(*) AS rows, count(*) FILTER (WHERE status = 'ok' AND keep) AS kept, "
    "count(*) FILTER (WHERE status = 'ok' AND NOT keep) AS dropped, "
    "count(*) FILTER (WHERE status <> 'ok') AS errors, "
    "epoch(max(processed_at)) - epoch(min(processed_at)) AS span_s, "
    "sum(duration_ms) / 1000.0 AS busy_s, count(DISTINCT worker) AS workers "
    "FROM decisions GROUP BY stage"
)


def run_status(store: RunStorage) -> dict[str, Any]:
    order = stage_order(store)
    plan = read_plan(store)
    total = len(plan["shards"]) if plan else 0
    catalog = Catalog(store, order)
    # The catalog lists each stage's committed fragments once; the shard counts come from that listing.
    with catalog.connect(read_only=True, sql=_AGG) as con:
        agg = con.execute(_AGG).fetchall()
    by_stage = {r[0]: r for r in agg}
    stages = []
    for sid in order:
        r = by_stage.get(sid)
        rows = int(r[1]) if r else 0
        span, busy = (float(r[5] or 0), float(r[6] or 0)) if r else (0.0, 0.0)
        stages.append({
            "stage": sid,
            "shards_committed": len(catalog.source(sid).fragments),
            "shards_total": total,
            "samples": rows,
            "kept": int(r[2]) if r else 0,
            "dropped": int(r[3]) if r else 0,
            "errors": int(r[4]) if r else 0,
            "samples_per_s": rows / span if span > 1 else (rows / busy if busy > 0 else None),
            "busy_s": busy,
            "workers": int(r[7]) if r else 0,
        })
    export = None
    if store.exists("export", "export.json"):
        export = json.loads(store.read_bytes("export", "export.json"))
    stages_done = total > 0 and all(s["shards_committed"] == total for s in stages)
    return {"run": store.url, "stages": stages, "shards_total": total, "export": export,
            "complete": bool(stages_done and export is not None)}
