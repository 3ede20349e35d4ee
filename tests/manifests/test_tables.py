"""The run's tables: one schema per table, the truth about each sample, readable by every tool."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.commit import encode_manifest
from manifests.layout import DECISIONS_TABLE, SAMPLES_TABLE, manifest_path, table_file
from manifests.schema import manifest_schema
from manifests.storage import RunStorage
from manifests.tables import (
    NO_ROW,
    StageColumns,
    file_stamp,
    resolve_stage_columns,
    samples_schema,
    stamp,
    write_shard_tables,
)

SRC = StageColumns("src", (pa.field("variant", pa.int64()),), writes_pixels=True)
DETECT = StageColumns("detect", (pa.field("det_score", pa.float32()), pa.field("face_box", pa.list_(pa.float32(), 4)),
                                 pa.field("landmarks68", pa.list_(pa.float32()))), writes_pixels=True)
CONSISTENCY = StageColumns("consistency", (pa.field("centroid_cosine", pa.float32()),), writes_pixels=False)
LABELS = StageColumns("labels", (pa.field("pose_bin", pa.string()),), writes_pixels=False)
STAGES = [SRC, DETECT, CONSISTENCY, LABELS]


def _frag(store: RunStorage, stage: StageColumns, shard: str, rows: list[dict[str, Any]]) -> None:
    schema = manifest_schema(list(stage.fields))
    full = []
    for r in rows:
        row = {f.name: None for f in schema}
        row.update({"stage": stage.stage_id, "stage_name": stage.stage_id, "stage_version": "1", "shard": shard,
                    "status": "ok", "keep": True, "params_hash": "p", "fingerprint": "f"})
        row.update(r)
        full.append(row)
    table = pa.Table.from_pylist(full, schema=schema)
    store.write_atomic(encode_manifest(table), *manifest_path(stage.stage_id, shard))


def _shard(store: RunStorage, shard: str, n_images: int, with_landmarks: bool) -> None:
    """n source images, one face each (face f_i derived from image p_i), the last face dropped by
    consistency; labels (a later stage that does not prune) still keeps it."""
    images = [f"{shard}p{i}" for i in range(n_images)]
    faces = [f"{shard}f{i}" for i in range(n_images)]
    _frag(store, SRC, shard, [
        {"sample_id": p, "key": p, "identity_id": f"id{i % 2}", "variant": i, "output_shard": f"shards/src/{shard}.tar",
         "tar_offset": 512 * (i + 1), "tar_size": 100, "image_ext": "png"} for i, p in enumerate(images)])
    _frag(store, DETECT, shard, [
        {"sample_id": f, "key": f"{p}_face0", "identity_id": f"id{i % 2}", "parent_id": p, "det_score": 0.5 + i,
         "face_box": [0.0, 0.0, 10.0, 10.0], "landmarks68": [float(i)] * 136 if with_landmarks else None,
         "output_shard": f"shards/detect/{shard}.tar", "tar_offset": 1024 * (i + 1), "tar_size": 50,
         "image_ext": "png"} for i, (p, f) in enumerate(zip(images, faces, strict=True))])
    last = len(faces) - 1
    _frag(store, CONSISTENCY, shard, [
        {"sample_id": f, "identity_id": f"id{i % 2}", "parent_id": images[i],
         "centroid_cosine": 0.9 if i != last else 0.1,
         "keep": i != last, "reason": None if i != last else "far_from_centroid",
         "detail": None if i != last else "0.10 < 0.40"} for i, f in enumerate(faces)])
    _frag(store, LABELS, shard, [
        {"sample_id": f, "identity_id": f"id{i % 2}", "parent_id": images[i], "pose_bin": "frontal"}
        for i, f in enumerate(faces)])


@pytest.fixture
def run(tmp_path: Path) -> tuple[RunStorage, list[StageColumns], pa.Schema, str]:
    store = RunStorage(str(tmp_path / "run"))
    # Shard 000001 has no landmarks at all: its manifest's column is all null (a reader inferring the
    # schema from one file would see a different type there).
    for shard, n, lm in (("000000", 4, True), ("000001", 3, False), ("000002", 5, True)):
        _shard(store, shard, n, lm)
    shards = ["000000", "000001", "000002"]
    stages = resolve_stage_columns(store, STAGES, shards)
    schema = samples_schema(stages)
    value = stamp(stages, {s.stage_id: "fp-" + s.stage_id for s in stages}, schema)
    for shard in shards:
        write_shard_tables(store, stages, shard, schema, value)
    return store, stages, schema, value


def _samples(store: RunStorage) -> list[dict[str, Any]]:
    return pq.read_table(store.path(*SAMPLES_TABLE)).to_pylist()


def test_final_keep_says_the_truth_when_a_later_stage_kept_a_dropped_sample(run: Any) -> None:
    store, *_ = run
    rows = {r["sample_id"]: r for r in _samples(store)}
    dropped = rows["000000f3"]
    assert dropped["labels__keep"] is True  # the trap: the later stage's own row says keep
    assert dropped["keep"] is False
    assert (dropped["dropped_by"], dropped["drop_reason"], dropped["drop_detail"]) == (
        "consistency", "far_from_centroid", "0.10 < 0.40")
    assert rows["000000f0"]["keep"] is True and rows["000000f0"]["dropped_by"] is None


def test_derived_samples_carry_their_parents_rows_and_the_latest_pixels(run: Any) -> None:
    store, *_ = run
    rows = {r["sample_id"]: r for r in _samples(store)}
    face = rows["000002f2"]
    assert face["src__variant"] == 2 and face["parent_id"] == "000002p2"  # joined by parent id
    assert face["detect__det_score"] == pytest.approx(2.5)
    assert (face["image_shard"], face["image_offset"], face["image_size"]) == ("shards/detect/000002.tar", 3072, 50)
    parent = rows["000002p2"]  # replaced by its face from detect on: no row there, so not kept
    assert parent["keep"] is False and parent["dropped_by"] == "detect" and parent["drop_reason"] == NO_ROW
    assert len(rows) == 2 * (4 + 3 + 5)


def test_vectors_are_fixed_size_float32_lists_even_when_declared_variable(run: Any) -> None:
    _, _, schema, _ = run
    assert schema.field("detect__face_box").type == pa.list_(pa.float32(), 4)
    assert schema.field("detect__landmarks68").type == pa.list_(pa.float32(), 136)  # measured from the data


def test_decisions_table_has_one_row_per_sample_per_stage_with_rule_and_detail(run: Any) -> None:
    store, *_ = run
    t = pq.read_table(store.path(*DECISIONS_TABLE))
    assert t.num_rows == 12 + 12 + 12 + 12
    drops = [r for r in t.to_pylist() if not r["keep"]]
    assert {(r["stage"], r["reason"], r["detail"]) for r in drops} == {
        ("consistency", "far_from_centroid", "0.10 < 0.40")}
    assert len(drops) == 3


def test_every_reader_opens_every_row_and_every_column_with_its_plainest_call(run: Any, tmp_path: Path,
                                                                              ray_session: Any) -> None:
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads
    import ray.data

    store, _, schema, _ = run
    folder = store.path(*SAMPLES_TABLE)
    pattern = folder + "/*.parquet"
    n = 2 * (4 + 3 + 5)
    columns = set(schema.names)
    frames = {
        "pandas": pd.read_parquet(folder),
        "pyarrow": pads.dataset(folder).to_table(),
        "polars": pl.scan_parquet(pattern).collect(),
        "datasets": datasets.load_dataset("parquet", data_files=pattern, split="train",
                                          cache_dir=str(tmp_path / "hf")),
        "duckdb": duckdb.sql(f"SELECT * FROM '{pattern}'").to_arrow_table(),
        "ray": ray.data.read_parquet(folder),
    }
    for name, frame in frames.items():
        if name == "ray":
            got_rows, got_cols = frame.count(), set(frame.schema().names)
        elif name in ("datasets", "pyarrow", "duckdb"):
            got_rows, got_cols = frame.num_rows, set(frame.column_names)
        else:
            got_rows, got_cols = len(frame), set(frame.columns)
        assert (name, got_rows) == (name, n)
        assert (name, sorted(columns - got_cols)) == (name, [])
    assert frames["pyarrow"].schema.field("detect__face_box").type == pa.list_(pa.float32(), 4)
    # Parquet has no fixed-size list; Arrow readers restore it from the stored Arrow schema, DuckDB
    # reads FLOAT[] of length 4.
    assert duckdb.sql(f"SELECT DISTINCT len(detect__face_box) FROM '{pattern}' "
                      "WHERE detect__face_box IS NOT NULL").fetchall() == [(4,)]
    assert len(glob.glob(pattern)) == 3


def test_a_table_file_is_rebuilt_only_when_its_stamp_changes(run: Any) -> None:
    store, stages, schema, value = run
    before = Path(store.path(*table_file(SAMPLES_TABLE, "000001"))).stat().st_mtime_ns
    assert write_shard_tables(store, stages, "000001", schema, value)["written"] == 0
    assert Path(store.path(*table_file(SAMPLES_TABLE, "000001"))).stat().st_mtime_ns == before
    assert write_shard_tables(store, stages, "000001", schema, "other-stamp")["written"] == 1
    assert file_stamp(store, table_file(SAMPLES_TABLE, "000001")) == "other-stamp"
