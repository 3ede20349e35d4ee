"""The verified byte-range reader: a member of a source tar, read where it lies, is refused by the tar's
name once the tar no longer holds the bytes recorded for it."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import pytest

from manifests.ranges import ByteRange, CorruptSourceError, fetch_ranges
from manifests.shards import iter_tar_members
from manifests.storage import RunStorage


def _source(path: Path) -> list[ByteRange]:
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", b"\x89PNG-first" * 50), ("b.png", b"\x89PNG-second" * 70)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with path.open("rb") as f:
        members = [m for m in iter_tar_members(f) if m.data is not None]
    return [ByteRange(f"file://{path}", m.data_offset, m.size, zlib.crc32(m.data or b"")) for m in members]


def test_a_source_tar_changed_cut_or_gone_after_ingest_is_refused_by_its_name(tmp_path: Path) -> None:
    store = RunStorage(str(tmp_path / "run"))
    tar = tmp_path / "src" / "data.tar"
    tar.parent.mkdir()
    ranges = _source(tar)
    assert fetch_ranges(store, ranges) == [b"\x89PNG-first" * 50, b"\x89PNG-second" * 70]

    original = tar.read_bytes()
    changed = bytearray(original)
    changed[ranges[1].offset + 3] ^= 0xFF  # same size, other pixels
    tar.write_bytes(bytes(changed))
    with pytest.raises(CorruptSourceError, match=f"source tar file://{tar} changed after ingest: it holds"):
        fetch_ranges(store, ranges)
    assert fetch_ranges(store, ranges[:1]) == [b"\x89PNG-first" * 50]  # an unchanged member still reads

    tar.write_bytes(original[: ranges[1].offset + 10])
    with pytest.raises(CorruptSourceError, match="changed after ingest: it ends before"):
        fetch_ranges(store, ranges)

    tar.unlink()
    with pytest.raises(CorruptSourceError, match=f"source tar file://{tar} is gone"):
        fetch_ranges(store, ranges)
