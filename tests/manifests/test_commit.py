"""A commit is verified: size and checksum of the fragment and of its tar, checked on read."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from manifests.catalog import Catalog
from manifests.commit import (
    CorruptFragmentError,
    check_tar,
    committed_fragments,
    decode_manifest,
    encode_manifest,
    scan_fragments,
    tar_record,
    verify_fragment,
)
from manifests.schema import COMMON_FIELDS
from manifests.shards import write_tar
from manifests.storage import TMP_PREFIX, RunStorage


def _table(ids: list[str], shard: str = "000000") -> pa.Table:
    rows = {f.name: [None] * len(ids) for f in COMMON_FIELDS}
    rows.update(sample_id=ids, stage=["s"] * len(ids), stage_name=["s"] * len(ids), stage_version=["1"] * len(ids),
                shard=[shard] * len(ids), status=["ok"] * len(ids), keep=[True] * len(ids),
                params_hash=["p"] * len(ids), fingerprint=["f"] * len(ids))
    return pa.Table.from_pydict(rows, schema=pa.schema(list(COMMON_FIELDS)))


def _commit(store: RunStorage, shard: str, ids: list[str], with_tar: bool = False) -> bytes:
    tar = None
    if with_tar:
        data, _ = write_tar([{"__key__": i, "png": f"px-{i}".encode()} for i in ids])
        rel = f"shards/s/{shard}.tar"
        store.write_atomic(data, rel)
        tar = tar_record(rel, data)
    blob = encode_manifest(_table(ids, shard), tar)
    store.write_atomic(blob, "manifests", "s", f"{shard}.parquet")
    return blob


def test_a_fragment_round_trips_and_its_record_describes_its_own_bytes() -> None:
    blob = encode_manifest(_table(["a", "b", "c"]))
    table, record = decode_manifest(blob, "x.parquet")
    assert table.column("sample_id").to_pylist() == ["a", "b", "c"]
    assert record.rows == 3 and record.tar is None and 0 < record.data_bytes < len(blob)


@pytest.mark.parametrize("cut", [1, 7, 100, 1000])
def test_a_truncated_fragment_is_refused_with_a_reason(cut: int) -> None:
    blob = encode_manifest(_table(["a", "b"]))
    bad = blob[: max(len(blob) - cut, 0)]
    with pytest.raises(CorruptFragmentError, match=r"truncated manifest|size"):
        decode_manifest(bad, "x.parquet")


def test_a_flipped_byte_in_the_data_pages_fails_the_full_check_but_not_the_footer() -> None:
    store = RunStorage(f"memory://c-{uuid.uuid4().hex}")
    blob = bytearray(_commit(store, "000000", ["a", "b"]))
    blob[10] ^= 0xFF
    store.fs.pipe_file(store.path("manifests", "s", "000000.parquet"), bytes(blob))
    assert verify_fragment(store, "s", "000000").shard == "000000"  # same size, whole footer
    with pytest.raises(CorruptFragmentError, match="checksum mismatch"):
        verify_fragment(store, "s", "000000", full=True)


def test_the_scan_reports_truncated_foreign_and_tarless_fragments_and_keeps_the_good_one(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path / "run"))
    _commit(store, "000000", ["a", "b"], with_tar=True)
    blob = _commit(store, "000001", ["c"], with_tar=True)
    _commit(store, "000002", ["d"], with_tar=True)
    _commit(store, "000003", ["e"], with_tar=True)
    (tmp_path / "run/manifests/s/000001.parquet").write_bytes(blob[: len(blob) // 2])
    tar = tmp_path / "run/shards/s/000002.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    (tmp_path / "run/shards/s/000003.tar").unlink()
    (tmp_path / "run/manifests/s/000004.parquet").write_bytes(b"")  # zero bytes: a crash before any write
    scan = scan_fragments(store, "s")
    assert scan.shards == {"000000"}
    reasons = {b.shard: b.reason for b in scan.bad}
    assert set(reasons) == {"000001", "000002", "000003", "000004"}
    assert "truncated manifest" in reasons["000001"]
    assert "bytes, committed as" in reasons["000002"]
    assert "missing" in reasons["000003"]
    assert all("recomputed on resume" in b.message() for b in scan.bad)
    # Readers see only what is verified: a corrupt fragment never breaks a catalog query.
    got = Catalog(store, ["s"]).query("SELECT sample_id FROM s ORDER BY 1").column("sample_id").to_pylist()
    assert got == ["a", "b"]
    assert [f.shard for f in committed_fragments(store, "s")] == ["000000"]


def test_a_tar_is_checked_against_its_size_and_checksum() -> None:
    data, _ = write_tar([{"__key__": "k", "png": b"\x89PNG-pixels"}])
    rec = tar_record("shards/s/000000.tar", data)
    check_tar(data, rec)
    with pytest.raises(CorruptFragmentError, match="committed as"):
        check_tar(data[:-1], rec)
    with pytest.raises(CorruptFragmentError, match="checksum"):
        check_tar(data[:-1] + b"\x01", rec)


def test_object_stores_get_one_put_per_file_and_local_disks_leave_no_temporary_file(tmp_path: Path) -> None:
    remote = RunStorage(f"memory://c-{uuid.uuid4().hex}")
    assert remote.atomic_put
    calls: list[str] = []
    real_mv = remote.fs.mv
    remote.fs.mv = lambda *a, **k: calls.append("mv") or real_mv(*a, **k)  # type: ignore[method-assign]
    remote.write_atomic(b"abc", "manifests", "s", "000000.parquet")
    assert calls == [] and remote.read_bytes("manifests", "s", "000000.parquet") == b"abc"
    local = RunStorage(str(tmp_path / "run"))
    assert not local.atomic_put
    local.write_atomic(b"abc", "manifests", "s", "000000.parquet")
    assert [p.name for p in (tmp_path / "run/manifests/s").iterdir()] == ["000000.parquet"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "run/manifests/s").iterdir())
