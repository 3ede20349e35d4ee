"""`facefoundry status`: per stage, shards committed/total, samples in/kept/dropped/errored,
throughput, and whether the run (and its export) is complete."""

from __future__ import annotations

import json
from typing import Any

from manifests.catalog import Catalog
from manifests.commit import scan_fragments
from manifests.storage import RunStorage
from pipeline.engine.rundir import read_plan, read_run_file


class NotARunError(FileNotFoundError):
    pass


def stage_order(store: RunStorage) -> list[str]:
    state = read_run_file(store)
    if state is None:
        raise NotARunError(f"{store.url} is not a facefoundry run (no run.yaml)")
    return [s.get("id") or s["stage"].rsplit(":", 1)[-1].lower() for s in state.config.get("stages", [])]


def run_status(store: RunStorage) -> dict[str, Any]:
    order = stage_order(store)
    plan = read_plan(store)
    total = len(plan["shards"]) if plan else 0
    catalog = Catalog(store, order)
    with catalog.connect(read_only=True) as con:
        agg = con.execute(
            "SELECT stage, count(*) AS rows, count(*) FILTER (WHERE status = 'ok' AND keep) AS kept, "
            "count(*) FILTER (WHERE status = 'ok' AND NOT keep) AS dropped, "
            "count(*) FILTER (WHERE status <> 'ok') AS errors, "
            "epoch(max(processed_at)) - epoch(min(processed_at)) AS span_s, "
            "sum(duration_ms) / 1000.0 AS busy_s, count(DISTINCT worker) AS workers "
            "FROM decisions GROUP BY stage"
        ).fetchall()
    by_stage = {r[0]: r for r in agg}
    stages = []
    for sid in order:
        r = by_stage.get(sid)
        rows = int(r[1]) if r else 0
        span, busy = (float(r[5] or 0), float(r[6] or 0)) if r else (0.0, 0.0)
        scan = scan_fragments(store, sid)  # verified fragments only; the footers are cached from the catalog
        stages.append({
            "stage": sid,
            "shards_committed": len(scan.shards),
            "not_committed": [b.message() for b in scan.bad],
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
