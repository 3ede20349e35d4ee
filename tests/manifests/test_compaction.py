"""Compaction (a sorted copy per stage, committed by its pointer) and the indexed lineage lookup."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import compaction
from manifests.catalog import Catalog
from manifests.compaction import compact_stage, compact_stages, compacted_files_for, valid_compaction
from manifests.layout import compacted_dir
from manifests.lineage import trace
from manifests.storage import RunStorage
from tests.fixtures.s3_server import s3_server
from tests.fixtures.synthetic_run import STAGES, build_run, child_id, commit_fragment, sample_ids, stage_table

SHARDS, PER_SHARD = 4, 40
BIG = 1500  # per shard, for tests that need more rows than one of DuckDB's row groups


def _run(tmp_path: Path, per_shard: int = PER_SHARD) -> RunStorage:
    store = RunStorage(str(tmp_path / "run"))
    build_run(store, SHARDS, per_shard)
    return store


def _small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The smallest row groups DuckDB writes, one per file: the index then has several ranges."""
    monkeypatch.setattr(compaction, "ROW_GROUP_BYTES", 1)
    monkeypatch.setattr(compaction, "ROW_GROUPS_PER_FILE", 1)


def _answers(store: RunStorage) -> list:
    cat = Catalog(store, STAGES)
    q = ("SELECT sample_id, src.variant AS v, emb.score AS s, emb.vec AS vec, crop.face AS f FROM samples "
         "ORDER BY sample_id")
    return [cat.query(q).to_pylist(), cat.query("SELECT * FROM decisions ORDER BY stage, sample_id").to_pylist()]


def test_compaction_sorts_each_stage_and_queries_answer_the_same(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = _run(tmp_path, BIG)
    before = _answers(store)
    _small_files(monkeypatch)
    for sid in STAGES:
        pointer = compact_stage(store, sid)
        assert pointer is not None and pointer["rows"] == sum(
            stage_table(sid, i, BIG).num_rows for i in range(SHARDS))
    pointer = valid_compaction(store, "emb")
    assert pointer is not None and len(pointer["files"]) > 1
    ids = []
    for f in pointer["files"]:
        ids += pq.read_table(store.path(*compacted_dir("emb"), pointer["generation"], f["name"])).column(
            "sample_id").to_pylist()
    assert ids == sorted(ids) and len(ids) == SHARDS * BIG
    assert all(a["max"] < b["min"] for a, b in zip(pointer["files"], pointer["files"][1:], strict=False))
    cat = Catalog(store, STAGES)
    assert cat.source("emb").compacted is not None
    assert "_compacted" in cat._stage_view("emb")
    assert _answers(store) == before
    assert cat.query("SELECT typeof(vec) AS t FROM emb LIMIT 1").column("t")[0].as_py() == "FLOAT[8]"
    assert compact_stage(store, "emb") == pointer, "a second call finds the valid pointer"


def test_a_recomputed_fragment_is_never_shadowed_by_a_stale_copy(tmp_path: Path) -> None:
    store = _run(tmp_path)
    old = compact_stage(store, "src")
    assert old is not None
    changed = stage_table("src", 1, PER_SHARD)
    changed = changed.set_column(changed.schema.get_field_index("variant"), changed.schema.field("variant"),
                                 pa.array([99] * changed.num_rows, pa.int64()))
    commit_fragment(store, "src", 1, changed)
    assert valid_compaction(store, "src") is None
    cat = Catalog(store, STAGES)
    assert cat.source("src").compacted is None
    assert cat.query("SELECT count(*) AS n FROM src WHERE variant = 99").column("n")[0].as_py() == PER_SHARD
    new = compact_stage(store, "src")
    assert new is not None and new["generation"] != old["generation"]
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM src WHERE variant = 99").column(
        "n")[0].as_py() == PER_SHARD


def test_a_killed_compaction_leaves_nothing_visible_and_is_cleaned_up(tmp_path: Path) -> None:
    store = _run(tmp_path)
    # A compaction killed before its pointer: a generation folder nobody refers to.
    store.write_atomic(b"not parquet", *compacted_dir("emb"), "0123456789abcdef", "part-00000.parquet")
    assert valid_compaction(store, "emb") is None
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM emb").column("n")[0].as_py() == SHARDS * PER_SHARD
    pointer = compact_stage(store, "emb")
    assert pointer is not None
    assert not store.exists(*compacted_dir("emb"), "0123456789abcdef")
    assert Catalog(store, STAGES).query("SELECT count(*) AS n FROM emb").column("n")[0].as_py() == SHARDS * PER_SHARD


def test_lineage_is_the_same_before_and_after_compaction_and_reads_one_file_per_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _run(tmp_path, BIG)
    parent = sample_ids(2, BIG)[4]
    kid = child_id(parent)
    before = trace(store, STAGES, kid)
    assert [r["stage"] for r in before] == STAGES
    assert before[0]["sample_id"] == parent and before[2]["sample_id"] == kid
    _small_files(monkeypatch)
    for sid in STAGES:
        compact_stage(store, sid)
    after = trace(store, STAGES, kid)
    assert after == before
    pointer = valid_compaction(store, "emb")
    assert pointer is not None and len(pointer["files"]) > 1
    assert len(compacted_files_for(pointer, [parent])) == 1
    assert trace(store, STAGES, "no-such-sample") == []


def test_compaction_and_lineage_on_an_object_store() -> None:
    with s3_server() as opts:
        bucket = opts.pop("bucket")
        store = RunStorage(f"s3://{bucket}/run-{uuid.uuid4().hex[:6]}", opts)
        build_run(store, 2, 8)
        sid = sample_ids(1, 8)[3]
        before = trace(store, STAGES, sid)
        for stage in STAGES:
            assert compact_stage(store, stage) is not None
        assert Catalog(store, STAGES).source("src").compacted is not None
        assert trace(store, STAGES, sid) == before
        assert [r["stage"] for r in before] == STAGES


def test_one_call_compacts_every_stage_and_reports_a_failed_one_without_stopping(tmp_path: Path) -> None:
    store = _run(tmp_path)
    blocked = Path(store.path(*compacted_dir("emb")))
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the copy's folder goes")
    errors = compact_stages(store.url, [*STAGES, "never_ran"])
    assert errors["emb"] is not None and "NotADirectoryError" in errors["emb"]
    assert {sid: note for sid, note in errors.items() if sid != "emb"} == dict.fromkeys(
        [s for s in STAGES if s != "emb"] + ["never_ran"])
    assert all(valid_compaction(store, sid) is not None for sid in STAGES if sid != "emb")
    blocked.unlink()
    assert compact_stages(store.url, ["emb"]) == {"emb": None}, "the next call compacts it"
    assert valid_compaction(store, "emb") is not None
