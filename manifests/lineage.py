"""The lineage of one sample: every stage's row for it (and for its parent, for stages that ran
before it was derived), in pipeline order, plus where the export put it.

An indexed lookup, never a scan of every stage: a compacted stage (manifests/compaction.py) is
sorted by sample_id and its pointer holds each file's id range, so a lookup opens the one file
whose range holds the id and reads the one row group whose min/max statistics do. Only a stage
that is not compacted yet (a run still in progress) is searched through its fragments.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.catalog import Catalog
from manifests.compaction import compacted_files_for
from manifests.layout import EXPORT_DIR, EXPORT_MANIFEST, MANIFESTS_DIR
from manifests.sql import lit, q
from manifests.storage import RunStorage


class _Lookup:
    def __init__(self, store: RunStorage, stage_ids: list[str]) -> None:
        self.store = store
        self.catalog = Catalog(store, stage_ids)
        self._con: Any = None
        self._ctx: Any = None

    def _read(self, path: str, ids: list[str]) -> pa.Table:
        """The rows of ``ids`` in one Parquet file, reading only the row groups whose sample_id
        statistics can hold them (all of them for a file written without statistics)."""
        with (open(path, "rb") if self.store.is_local else self.store.fs.open(path, "rb")) as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            col = pf.schema_arrow.get_field_index("sample_id")
            groups = []
            for g in range(meta.num_row_groups):
                st = meta.row_group(g).column(col).statistics
                if st is None or not st.has_min_max or any(st.min <= i <= st.max for i in ids):
                    groups.append(g)
            table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        return table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(ids, pa.string())))

    def rows(self, sid: str, ids: list[str]) -> list[dict[str, Any]]:
        src = self.catalog.source(sid)
        if src.read_sql is None:
            return []
        if src.compacted is not None:
            out: list[dict[str, Any]] = []
            for rel in compacted_files_for(src.compacted, ids):
                out.extend(self._read(self.store.path(MANIFESTS_DIR, sid, rel), ids).to_pylist())
            return out
        if self._con is None:
            self._ctx = self.catalog.connect(read_only=True)
            self._con = self._ctx.__enter__()
        listing = ", ".join(lit(i) for i in ids)
        return self._con.sql(f"SELECT * FROM {q(sid)} WHERE sample_id IN ({listing})").to_arrow_table().to_pylist()

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)


def trace(store: RunStorage, stage_ids: list[str], sample_id: str) -> list[dict[str, Any]]:
    look = _Lookup(store, stage_ids)
    try:
        own = [look.rows(sid, [sample_id]) for sid in stage_ids]
        parents = sorted({r["parent_id"] for rows in own for r in rows if r.get("parent_id")})
        parent = parents[-1] if parents else None
        rows: list[dict[str, Any]] = []
        for i, sid in enumerate(stage_ids):
            mine = own[i]
            if not mine and parent:
                mine = look.rows(sid, [parent])
            for r in mine:
                r["stage_index"] = i
                rows.append(r)
    finally:
        look.close()
    path = store.path(EXPORT_DIR, EXPORT_MANIFEST)
    if store.fs.exists(path):
        schema = pq.read_schema(path if store.is_local else store.fs.open(path, "rb"))
        if "sample_id" in schema.names:
            table = look._read(path, [sample_id])
            # The generation round that made the sample (0, or a refill round), beside where it went.
            made = next((r["round"] for r in rows if r.get("round") is not None), None)
            for r in table.to_pylist():
                rows.append({"stage": "export", "stage_index": len(stage_ids), "round": made, **r})
    return rows
