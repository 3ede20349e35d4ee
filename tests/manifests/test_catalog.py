"""The catalog over real committed fragments (pyarrow-written, read by DuckDB): glob views that
never see a temporary file, column projection, fixed-size vectors, the own-or-parent samples view,
and one SQL sandbox on local, memory:// and S3-protocol runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from manifests.catalog import Catalog, QueryError, samples_fields
from manifests.commit import committed_tokens
from manifests.reader import own_or_parent_rows, take_own_or_parent
from manifests.storage import RunStorage
from pipeline.status import run_status
from tests.fixtures.s3_server import s3_server
from tests.fixtures.synthetic_run import STAGES, build_run, child_id, sample_ids, stage_table

SHARDS, PER_SHARD = 3, 12
DENIED = r"(?i)permission|disabled"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> RunStorage:
    store = RunStorage(str(tmp_path_factory.mktemp("catalog") / "run"))
    build_run(store, SHARDS, PER_SHARD)
    return store


@pytest.fixture(scope="module")
def s3_run() -> Iterator[RunStorage]:
    with s3_server() as opts:
        bucket = opts.pop("bucket")
        store = RunStorage(f"s3://{bucket}/run", opts)
        build_run(store, 2, 6)
        yield store


def _memory_run() -> RunStorage:
    store = RunStorage(f"memory://run-{uuid.uuid4().hex}")
    build_run(store, 2, 6)
    return store


def _plant_temporary(store: RunStorage, stage: str) -> None:
    """What a killed writer leaves: a temporary name with bytes that are no Parquet at all."""
    with store.fs.open(store.path("manifests", stage, "_tmp-deadbeef-000009.parquet"), "wb") as f:
        f.write(b"half-written")


def test_stage_views_glob_the_folder_and_never_see_a_temporary_file(local_run: RunStorage) -> None:
    _plant_temporary(local_run, "src")
    cat = Catalog(local_run, STAGES)
    sql = "\n".join(cat.view_sql())
    assert "000001.parquet" not in sql, "a view must not list fragments one by one"
    assert cat.query("SELECT count(*) AS n FROM src").column("n")[0].as_py() == SHARDS * PER_SHARD
    assert len(committed_tokens(local_run, "src")) == SHARDS


def test_vectors_read_as_fixed_size_arrays(local_run: RunStorage) -> None:
    cat = Catalog(local_run, STAGES)
    got = cat.query("SELECT typeof(vec) AS t FROM emb LIMIT 1").column("t")[0].as_py()
    assert got == "FLOAT[8]"
    assert cat.query("SELECT typeof(vector) AS t FROM identities LIMIT 1").column("t")[0].as_py() == "FLOAT[16]"
    assert cat.query("SELECT typeof(emb.vec) AS t FROM samples LIMIT 1").column("t")[0].as_py() == "FLOAT[8]"


def _scan_columns(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    return "\n".join(str(r[1]) for r in con.sql("EXPLAIN " + sql).fetchall())


def test_a_count_over_samples_reads_sample_ids_not_whole_rows(local_run: RunStorage) -> None:
    cat = Catalog(local_run, STAGES)
    sql = "SELECT count(*) FROM samples"
    with cat.connect(sql=sql) as con:
        plan = _scan_columns(con, sql)
        assert con.sql(sql).fetchall()[0][0] == SHARDS * PER_SHARD + SHARDS * PER_SHARD // 4
    assert "vec" not in plan and "score" not in plan and "variant" not in plan and "tar_offset" not in plan
    one = "SELECT sample_id, emb.score FROM samples WHERE emb.score > 0.5"
    with cat.connect(sql=one) as con:
        plan = _scan_columns(con, one)
    assert "score" in plan and "vec" not in plan and "variant" not in plan


def test_samples_fields_follow_the_query() -> None:
    got = samples_fields("SELECT s.emb.score, src.variant, crop FROM samples s WHERE emb.keep", STAGES)
    assert got == {"emb": ["score", "keep"], "src": ["variant"], "crop": None}
    assert samples_fields("SELECT * FROM samples", STAGES) is None
    assert samples_fields("SELECT count(*) FROM samples", STAGES) == {}


def test_a_derived_sample_sees_its_parents_rows_before_it_was_derived(local_run: RunStorage) -> None:
    parent = sample_ids(0, PER_SHARD)[0]
    kid = child_id(parent)
    cat = Catalog(local_run, STAGES)
    rows = cat.query(
        f"SELECT sample_id, parent_id, src.variant AS v, src.sample_id AS src_id, crop.face AS face "
        f"FROM samples WHERE sample_id IN ('{parent}', '{kid}') ORDER BY parent_id NULLS FIRST").to_pylist()
    assert rows[0]["sample_id"] == parent and rows[0]["face"] is None  # the parent has no crop row
    assert rows[1] == {"sample_id": kid, "parent_id": parent, "v": 0, "src_id": parent, "face": rows[1]["face"]}
    assert rows[1]["face"] is not None
    # The SQL and the Arrow forms of the join agree on every sample.
    full = cat.query("SELECT sample_id, parent_id, src.variant AS v FROM samples ORDER BY sample_id")
    src = pa.concat_tables([stage_table("src", i, PER_SHARD) for i in range(SHARDS)])
    arrow = take_own_or_parent(src, full.column("sample_id"), full.column("parent_id"), ["variant"])
    assert arrow.column("variant").to_pylist() == full.column("v").to_pylist()


def test_the_arrow_join_prefers_the_own_row_then_the_parent_then_null() -> None:
    got = own_or_parent_rows(["a", "b", "c", None], ["x", "a", "zz", "b"], ["b", "a", "x"])
    assert got.to_pylist() == [1, 0, None, 0]


def test_status_counts_committed_shards_from_one_listing(local_run: RunStorage) -> None:
    st = run_status(local_run)
    assert [s["shards_committed"] for s in st["stages"]] == [SHARDS] * 3
    assert st["stages"][0]["samples"] == SHARDS * PER_SHARD


FORBIDDEN = [
    "COPY (SELECT 1) TO '{root}/evil.csv'",
    "ATTACH '{root}/evil.duckdb' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1",
    "SELECT 1; SELECT 2",
    "SET enable_external_access=true",
    "PRAGMA enable_profiling",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/evil.csv'",
    "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{root}/evil.csv'",
    "/* x */ explain analyse COPY (SELECT 1) TO '{root}/evil.csv'",
]


def _assert_sandboxed(store: RunStorage, tmp_path: Path) -> None:
    """``tmp_path``: an empty folder beside a readable ``outside.csv``; both outside the run."""
    cat = Catalog(store, STAGES)
    assert cat.query("SELECT count(*) AS n FROM emb").column("n")[0].as_py() > 0
    with pytest.raises(duckdb.Error, match=DENIED):
        cat.query("SELECT count(*) FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error, match=DENIED):
        cat.query(f"SELECT count(*) FROM read_csv('{tmp_path.parent}/outside.csv')")
    for text in FORBIDDEN:
        with pytest.raises(QueryError):
            cat.query(text.format(root=tmp_path))
    assert not list(tmp_path.iterdir())
    assert cat.query("EXPLAIN SELECT count(*) FROM emb").num_rows >= 1


def test_user_sql_is_sandboxed_on_a_local_run(local_run: RunStorage, tmp_path: Path) -> None:
    (tmp_path / "outside.csv").write_text("a\n1\n")
    _assert_sandboxed(local_run, tmp_path / "probe")
    # Inside the run directory, where DuckDB's file sandbox would let a write through.
    with pytest.raises(QueryError):
        Catalog(local_run, STAGES).query(f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{local_run.root}/evil.csv'")
    assert not local_run.exists("evil.csv")


def test_user_sql_is_sandboxed_on_a_memory_run(tmp_path: Path) -> None:
    (tmp_path / "outside.csv").write_text("a\n1\n")
    store = _memory_run()
    _assert_sandboxed(store, tmp_path / "probe")
    other = _memory_run()
    with pytest.raises(duckdb.Error, match=DENIED):
        Catalog(store, STAGES).query(f"SELECT count(*) FROM read_parquet('{other.url}/manifests/src/*.parquet')")


def test_user_sql_is_sandboxed_on_an_s3_run(s3_run: RunStorage, tmp_path: Path) -> None:
    (tmp_path / "outside.csv").write_text("a\n1\n")
    _assert_sandboxed(s3_run, tmp_path / "probe")
    bucket = s3_run.root.split("/")[0]
    other = RunStorage(f"s3://{bucket}/other", s3_run.storage_options)
    build_run(other, 1, 2, stages=["src"])
    with pytest.raises(duckdb.Error, match=DENIED):
        Catalog(s3_run, STAGES).query(f"SELECT count(*) FROM read_parquet('s3://{bucket}/other/manifests/src/*')")
    _plant_temporary(s3_run, "emb")
    assert Catalog(s3_run, STAGES).query("SELECT count(*) AS n FROM emb").column("n")[0].as_py() == 12


@pytest.fixture(autouse=True)
def _probe_dir(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()


def _write(store: RunStorage, table: pa.Table, *parts: str) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_atomic(buf.getvalue(), *parts)


def test_the_runs_samples_table_is_the_samples_view_when_it_exists(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path / "run"))
    build_run(store, 1, 4)
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 5
    vec = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 6, pa.float32()), 3)
    table = pa.table({"sample_id": ["a", "b"], "emb__vec": vec, "emb__score": pa.array([0.25, None], pa.float32()),
                      "emb__status": ["ok", None]})
    _write(store, table, "tables", "samples", "000000.parquet")
    with store.fs.open(store.path("tables", "samples", "_tmp-0-000001.parquet"), "wb") as f:
        f.write(b"half")
    # Written but not committed (no tables.json): the manifests answer.
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 5
    store.write_atomic(b"{}", "tables", "tables.json")
    cat = Catalog(store, STAGES)
    got = cat.query("SELECT count(*) AS n, any_value(typeof(emb__vec)) AS t FROM samples").to_pylist()
    assert got == [{"n": 2, "t": "FLOAT[3]"}]
    assert cat.query("SELECT emb.score AS s FROM samples ORDER BY sample_id").column("s").to_pylist() == [0.25, None]
    # A field only the manifests have: the join view answers.
    assert cat.query("SELECT count(src.variant) AS n FROM samples").column("n")[0].as_py() == 5


def test_metrics_view_reads_committed_metric_files_only(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path / "run"))
    build_run(store, 1, 4)
    _write(store, pa.table({"step": [1, 2], "loss": [0.5, 0.4]}), "metrics", "train", "metrics.parquet")
    with store.fs.open(store.path("metrics", "train", "_tmp-0-more.parquet"), "wb") as f:
        f.write(b"half")
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 2


def test_the_one_join_and_two_join_sql_forms_agree(local_run: RunStorage) -> None:
    from manifests.reader import own_or_parent_sql

    cat = Catalog(local_run, STAGES)
    base = ("(SELECT sample_id, max(parent_id) AS parent_id, bit_or(CAST(1 AS HUGEINT) << stage_index) AS stages "
            "FROM decisions GROUP BY sample_id)")
    answers = []
    with cat.connect() as con:
        for has_own in ("(b.stages >> 0) & 1 = 1", None):
            join, exprs = own_or_parent_sql("b", "src", "x", ["variant", "shard"], has_own=has_own)
            sql = (f"SELECT b.sample_id, {exprs['sample_id']} AS used, {exprs['variant']} AS v, {exprs['shard']} AS s "
                   f"FROM {base} b {join} ORDER BY b.sample_id")
            answers.append(con.sql(sql).fetchall())
    assert answers[0] == answers[1]
    kids = [r for r in answers[0] if r[1] is not None and r[1] != r[0]]
    assert len(kids) == SHARDS * PER_SHARD // 4, "every crop child falls back to its parent's src row"


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_a_run_path_with_glob_characters_reads_and_removes_its_own_files_only(
        kind: str, s3_run: RunStorage, tmp_path: Path) -> None:
    """Beside the run sits the folder its path names as a glob, with other fragments: the views, the
    compacted copy and a recursive removal reach the run's own files only."""
    from manifests.compaction import compact_stage

    opts = s3_run.storage_options if kind == "s3" else {}
    base = {"local": str(tmp_path), "memory": f"memory://globs-{uuid.uuid4().hex}",
            "s3": f"s3://{s3_run.root.split('/')[0]}/globs-{uuid.uuid4().hex}"}[kind]
    hostile, neighbour = RunStorage(f"{base}/r[1]*?x'q", opts), RunStorage(f"{base}/r1zzx'q", opts)
    build_run(neighbour, 3, PER_SHARD)
    build_run(hostile, 2, PER_SHARD)
    assert Catalog(hostile, STAGES).query("SELECT count(*) AS n FROM src").column("n")[0].as_py() == 2 * PER_SHARD
    pointer = compact_stage(hostile, "src")
    assert pointer is not None and pointer["rows"] == 2 * PER_SHARD
    cat = Catalog(hostile, STAGES)
    assert cat.source("src").compacted is not None
    assert cat.query("SELECT count(*) AS n FROM src").column("n")[0].as_py() == 2 * PER_SHARD
    assert cat.query("SELECT count(*) AS n FROM identities").column("n")[0].as_py() == 50
    hostile.remove("manifests", "src", recursive=True)
    assert not hostile.exists("manifests", "src") and len(committed_tokens(neighbour, "src")) == 3


def test_a_temp_folder_of_a_dead_owner_is_swept_and_a_live_owners_kept(local_run: RunStorage, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"ff-catalog-{gone.pid}-killed"  # what a SIGKILLed query leaves
    (stale / "spill").mkdir(parents=True)
    live = tmp_path / f"ff-catalog-{os.getppid()}-running"
    live.mkdir()
    with Catalog(local_run, STAGES).connect() as con:
        assert con.execute("SELECT count(*) FROM src").fetchone() == (SHARDS * PER_SHARD,)
        own = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"ff-catalog-{os.getpid()}-")]
        assert len(own) == 1 and not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.glob("ff-catalog-*")) == [live.name]
