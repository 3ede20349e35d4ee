"""The lineage of one sample: every stage's row for it (and for its parent, for stages that ran
before it was derived), in pipeline order, plus where the export put it."""

from __future__ import annotations

import io
from typing import Any

import pyarrow.parquet as pq

from manifests.catalog import Catalog, _lit, _q
from manifests.storage import RunStorage


def trace(store: RunStorage, stage_ids: list[str], sample_id: str) -> list[dict[str, Any]]:
    catalog = Catalog(store, stage_ids)
    rows: list[dict[str, Any]] = []
    with catalog.connect(read_only=True) as con:
        ids = [sample_id]
        parent = con.execute(
            f"SELECT max(parent_id) FROM decisions WHERE sample_id = {_lit(sample_id)}"
        ).fetchall()
        if parent and parent[0][0]:
            ids.append(parent[0][0])
        listing = ", ".join(_lit(i) for i in ids)
        for i, sid in enumerate(stage_ids):
            table = con.sql(f"SELECT * FROM {_q(sid)} WHERE sample_id IN ({listing})").to_arrow_table()
            mine = [r for r in table.to_pylist() if r["sample_id"] == sample_id] or table.to_pylist()
            for r in mine:
                r["stage_index"] = i
                rows.append(r)
    if store.exists("export", "manifest.parquet"):
        table = pq.read_table(io.BytesIO(store.read_bytes("export", "manifest.parquet")))
        if "sample_id" in table.column_names:
            for r in table.to_pylist():
                if r["sample_id"] == sample_id:
                    rows.append({"stage": "export", "stage_index": len(stage_ids), **r})
    return rows
