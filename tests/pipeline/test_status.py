"""`facefoundry status` sums the counts each commit record carries; it must say exactly what the rows
say, and fragments written before records carried counts are still counted, from their rows."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.catalog import Catalog
from manifests.commit import COMMIT_KEY, read_manifest_verified
from manifests.layout import manifest_path
from manifests.storage import RunStorage
from pipeline.status import STAGE_STATS_SQL, run_status, stage_order, stage_stats
from tests.fixtures.synthetic_run import STAGES, build_run, commit_fragment, stage_table

EXACT = ("samples", "kept", "dropped", "errors", "workers", "shards_committed")


def _from_rows(store: RunStorage) -> dict[str, dict[str, Any]]:
    with Catalog(store, stage_order(store)).connect(read_only=True, sql=STAGE_STATS_SQL) as con:
        return stage_stats(con)


def _assert_same(status: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    for s in status["stages"]:
        want = rows[s["stage"]]
        for k in EXACT[:-1]:
            assert s[k] == want[k], (s["stage"], k)
        for k in ("busy_s", "wall_s"):
            assert s[k] == pytest.approx(want[k], rel=1e-9, abs=1e-6), (s["stage"], k)


def test_status_from_commit_records_says_what_the_rows_of_a_real_run_say(small_quickstart_run: Path) -> None:
    store = RunStorage(str(small_quickstart_run))
    st = run_status(store)
    rows = _from_rows(store)
    _assert_same(st, rows)
    assert sum(s["dropped"] for s in st["stages"]) > 0 and max(s["workers"] for s in st["stages"]) >= 1
    first = st["stages"][0]["stage"]
    _, record = read_manifest_verified(store, first, "000000")
    assert record.stats is not None, "the engine's commits carry the counts"


def _varied(stage: str, shard: int, n: int) -> pa.Table:
    """Rows with every case the counts distinguish: errors (whose keep is not looked at), drops, two
    workers in one fragment, spread times, a missing duration."""
    t = stage_table(stage, shard, n)
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=100 * shard)
    cols = {
        "status": ["error" if i % 7 == 3 else "ok" for i in range(n)],
        "keep": [i % 3 != 0 for i in range(n)],
        "worker": [f"w{(shard + i) % 2}" if shard else "w0" for i in range(n)],
        "processed_at": [start + timedelta(seconds=i) for i in range(n)],
        "duration_ms": [None if i == 2 else 250.0 * (i + 1) for i in range(n)],
    }
    for name, values in cols.items():
        field = t.schema.field(name)
        t = t.set_column(t.schema.get_field_index(name), field, pa.array(values, field.type))
    return t


def _commit_like_the_previous_version(store: RunStorage, stage: str, shard: int, table: pa.Table) -> None:
    """A fragment as commits wrote them before records carried counts (commit record version 1)."""
    buf = io.BytesIO()
    writer = pq.ParquetWriter(buf, table.schema, compression="zstd")
    writer.write_table(table)
    data = buf.getvalue()
    record = {"v": 1, "data_bytes": len(data), "data_sha256": hashlib.sha256(data).hexdigest(),
              "rows": table.num_rows, "tar": None}
    writer.add_key_value_metadata({COMMIT_KEY.decode(): json.dumps(record, sort_keys=True)})
    writer.close()
    store.write_atomic(buf.getvalue(), *manifest_path(stage, f"{shard:06d}"))


@pytest.mark.parametrize("old", [(), (1,), (0, 1, 2)], ids=["all-new", "one-old", "all-old"])
def test_status_counts_errors_drops_and_workers_as_the_rows_do_and_reads_old_fragments(
        tmp_path: Path, old: tuple[int, ...]) -> None:
    store = RunStorage(str(tmp_path / "run"))
    build_run(store, 3, 10)
    for stage in STAGES:
        for shard in range(3):
            table = _varied(stage, shard, 10)
            if shard in old and stage == "emb":
                _commit_like_the_previous_version(store, stage, shard, table)
            else:
                commit_fragment(store, stage, shard, table)
    st = run_status(store)
    rows = _from_rows(store)
    _assert_same(st, rows)
    emb = next(s for s in st["stages"] if s["stage"] == "emb")
    assert emb["errors"] == 3 * 1 and emb["workers"] == 2  # row 3 of each shard; w0 and w1
    assert emb["kept"] + emb["dropped"] + emb["errors"] == 30
    assert emb["wall_s"] == pytest.approx(rows["emb"]["wall_s"]) and emb["wall_s"] > 200


def test_a_compacted_stage_reports_the_counts_its_copy_recorded_and_they_are_the_rows_counts(tmp_path: Path) -> None:
    from manifests.compaction import compact_stage

    store = RunStorage(str(tmp_path / "run"))
    build_run(store, 3, 10)
    for stage in STAGES:
        for shard in range(3):
            commit_fragment(store, stage, shard, _varied(stage, shard, 10))
    before = run_status(store)
    pointers = {sid: compact_stage(store, sid) for sid in STAGES}
    assert all(p is not None and p["stats"]["samples"] == 30 for p in pointers.values())
    after = run_status(store)
    _assert_same(after, _from_rows(store))
    assert after["stages"] == before["stages"]
