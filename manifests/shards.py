"""WebDataset shard I/O: deterministic tar writing, safe member names, byte offsets for random access.

Tars are written with webdataset's TarWriter with a fixed mtime, owner and member order, so the same
samples always give the same bytes (resume is byte-identical). Each member's data offset is
recorded in the manifest, so an export can read one image by byte range without scanning the tar.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import webdataset as wds

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


class UnsafeMemberError(ValueError):
    pass


def check_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) after refusing anything that could escape a folder."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeMemberError(f"unsafe member name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeMemberError(f"unsafe member name {name!r}")
    base = parts[-1]
    if "." not in base:
        raise UnsafeMemberError(f"member name without extension {name!r}")
    stem, ext = base.split(".", 1)
    key = posixpath.join(*parts[:-1], stem) if len(parts) > 1 else stem
    return key, ext


def check_key(key: str) -> str:
    """Keys we write: letters, digits, '_' and '-', optionally in '/'-separated folders; no dots."""
    if not _KEY_RE.match(key):
        raise UnsafeMemberError(f"invalid sample key {key!r}")
    return key


@dataclass(frozen=True)
class MemberLocation:
    offset: int
    size: int


def write_tar(samples: list[dict[str, Any]]) -> tuple[bytes, dict[str, dict[str, MemberLocation]]]:
    """Write samples ({'__key__': key, 'png': bytes, 'json': dict|bytes, ...}) to tar bytes.

    Returns the bytes and, per key and extension, where that member's data lies in the tar.
    """
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, user="facefoundry", group="facefoundry", mtime=0.0, encoder=False)
    for sample in samples:
        key = check_key(sample["__key__"])
        record: dict[str, Any] = {"__key__": key}
        for ext, value in sample.items():
            if ext == "__key__":
                continue
            if isinstance(value, dict | list):
                value = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
            elif isinstance(value, str):
                value = value.encode()
            record[ext] = value
        writer.write(record)
    writer.close()
    data = buf.getvalue()
    return data, index_tar(data)


def index_tar(data: bytes) -> dict[str, dict[str, MemberLocation]]:
    index: dict[str, dict[str, MemberLocation]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = check_member_name(info.name)
            index.setdefault(key, {})[ext] = MemberLocation(info.offset_data, info.size)
    return index


@dataclass
class TarMember:
    key: str
    ext: str
    data: bytes | None
    error: str | None = None
    name: str = ""


def iter_tar_members(fileobj: BinaryIO) -> Iterator[TarMember]:
    """Stream members of a tar; unsafe names and a truncated tail become error members, not crashes."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                try:
                    key, ext = check_member_name(info.name)
                except UnsafeMemberError as exc:
                    yield TarMember(key="", ext="", data=None, error=str(exc), name=info.name)
                    continue
                f = tar.extractfile(info)
                try:
                    data = f.read() if f is not None else b""
                except (tarfile.TarError, OSError, EOFError) as exc:
                    yield TarMember(key, ext, None, f"truncated tar member: {exc}", info.name)
                    return
                if len(data) != info.size:
                    yield TarMember(key, ext, None, "truncated tar member", info.name)
                    return
                yield TarMember(key, ext, data, None, info.name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield TarMember(key="", ext="", data=None, error=f"unreadable tar: {exc}", name="")


def read_tar_bytes(data: bytes) -> dict[str, dict[str, bytes]]:
    """All members of a tar we wrote ourselves, grouped by key."""
    out: dict[str, dict[str, bytes]] = {}
    for m in iter_tar_members(io.BytesIO(data)):
        if m.error is not None:
            raise ValueError(m.error)
        assert m.data is not None
        out.setdefault(m.key, {})[m.ext] = m.data
    return out
