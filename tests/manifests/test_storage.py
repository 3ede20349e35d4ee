"""Run storage through fsspec (an object-store-like filesystem) and tar member safety."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from manifests.catalog import Catalog
from manifests.commit import encode_manifest
from manifests.schema import COMMON_FIELDS
from manifests.shards import UnsafeMemberError, check_member_name, iter_tar_members, write_tar
from manifests.storage import RunStorage


def _fragment(ids: list[str], keep: list[bool]) -> bytes:
    rows = {f.name: [None] * len(ids) for f in COMMON_FIELDS}
    rows.update(sample_id=ids, stage=["s"] * len(ids), stage_name=["s"] * len(ids), stage_version=["1"] * len(ids),
                shard=["000000"] * len(ids), status=["ok"] * len(ids), keep=keep, params_hash=["p"] * len(ids),
                fingerprint=["f"] * len(ids))
    return encode_manifest(pa.Table.from_pydict(rows, schema=pa.schema(list(COMMON_FIELDS))))


def test_a_non_local_run_directory_commits_lists_and_queries_through_fsspec() -> None:
    store = RunStorage(f"memory://run-{uuid.uuid4().hex}")
    assert not store.is_local
    store.write_atomic(_fragment(["a", "b"], [True, False]), "manifests", "s", "000000.parquet")
    # A half-written temporary file is not a committed fragment.
    with store.fs.open(store.path("manifests", "s", "_tmp-deadbeef-000001.parquet"), "wb") as f:
        f.write(b"partial")
    assert store.list_files("manifests", "s", suffix=".parquet") == ["000000.parquet"]
    got = Catalog(store, ["s"]).query("SELECT sample_id, s.keep AS keep FROM samples ORDER BY 1").to_pylist()
    assert got == [{"sample_id": "a", "keep": True}, {"sample_id": "b", "keep": False}]
    store.clear_tmp("manifests", "s")
    assert store.fs.ls(store.path("manifests", "s"), detail=False) == [store.path("manifests", "s", "000000.parquet")]


def test_member_offsets_allow_reading_one_image_by_byte_range() -> None:
    store = RunStorage(f"memory://run-{uuid.uuid4().hex}")
    data, index = write_tar([{"__key__": "k1", "png": b"\x89PNG-one", "json": {"a": 1}},
                             {"__key__": "dir/k2", "png": b"\x89PNG-two"}])
    store.write_atomic(data, "shards", "x.tar")
    loc = index["dir/k2"]["png"]
    assert store.read_range("shards/x.tar", loc.offset, loc.size) == b"\x89PNG-two"
    again, _ = write_tar([{"__key__": "k1", "png": b"\x89PNG-one", "json": {"a": 1}},
                          {"__key__": "dir/k2", "png": b"\x89PNG-two"}])
    assert again == data, "tar bytes must not depend on when they were written"


@pytest.mark.parametrize("name", ["../evil.png", "/etc/passwd.txt", "a/../../b.png", "ok/./x.png", "noext", ""])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeMemberError):
        check_member_name(name)


def test_a_tar_with_an_escaping_member_yields_an_error_member_and_keeps_the_rest() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in (("good.png", b"g"), ("../escape.png", b"e"), ("also/fine.jpg", b"f")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    buf.seek(0)
    members = list(iter_tar_members(buf))
    assert [(m.key, m.error is None) for m in members] == [("good", True), ("", False), ("also/fine", True)]
    assert members[1].error == "unsafe_member_name" and "../escape.png" in (members[1].detail or "")


def test_a_user_pattern_globs_its_last_part_only(tmp_path: Path) -> None:
    """``c[1]/*.tar`` lists the tars of the folder named ``c[1]``, never those of ``c1``; a last part
    without a wildcard is the path itself."""
    from manifests.storage import expand_user_glob

    fs = fsspec.filesystem("file")
    for folder in ("c[1]", "c1", "c*?", "cab"):
        (tmp_path / folder).mkdir()
        for name in ("a.tar", "b.tar", "n.txt"):
            (tmp_path / folder / name).write_bytes(b"x")
    for folder in ("c[1]", "c*?"):
        got = expand_user_glob(fs, f"{tmp_path}/{folder}/*.tar")
        assert got == [f"{tmp_path}/{folder}/a.tar", f"{tmp_path}/{folder}/b.tar"]
    assert expand_user_glob(fs, f"{tmp_path}/c[1]/a.tar") == [f"{tmp_path}/c[1]/a.tar"]

