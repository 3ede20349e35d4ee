"""WebDataset shard I/O: deterministic tar writing, safe member names, byte offsets for random access.

Tars are written as webdataset's TarWriter writes them, with a fixed mtime, owner and member order, so
the same samples always give the same bytes (resume is byte-identical). Each member's data offset is
recorded in the manifest, so an export can read one image by byte range without scanning the tar.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from manifests.names import name_text

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


class UnsafeMemberError(ValueError):
    """A member name that could escape a folder (or is no sample member at all); ``rule`` names which."""

    def __init__(self, message: str, rule: str = "unsafe_member_name") -> None:
        super().__init__(message)
        self.rule = rule


def check_member_name(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) after refusing anything that could escape a folder.

    ``name`` is as tarfile gives it (undecodable bytes as surrogate escapes), so that a backslash in
    the name is told apart from the escapes of its recorded text (manifests/names.py)."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeMemberError(f"unsafe member name {name_text(name)!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeMemberError(f"unsafe member name {name_text(name)!r}")
    base = parts[-1]
    if "." not in base:
        raise UnsafeMemberError(f"member name without extension {name_text(name)!r}", "member_without_extension")
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
    crc32: int  # of the member's bytes: whoever reads the slice alone (the export) can check it


def write_tar(samples: list[dict[str, Any]]) -> tuple[bytes, dict[str, dict[str, MemberLocation]]]:
    """Write samples ({'__key__': key, 'png': bytes, 'json': dict|bytes, ...}) to tar bytes.

    Returns the bytes and, per key and extension, where that member's data lies in the tar.
    """
    buf = io.BytesIO()
    index: dict[str, dict[str, MemberLocation]] = {}
    # Plain tarfile, member by member, so each member's data offset is read off the stream as it is
    # written (no second parse of the tar). The members and their headers are the ones webdataset's
    # TarWriter writes (sorted extensions, mode 0444, mtime 0.0), so shards stay byte-identical.
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            key = check_key(sample["__key__"])
            for ext in sorted(sample):
                if ext.startswith("_"):
                    continue
                value = sample[ext]
                if isinstance(value, dict | list):
                    value = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
                elif isinstance(value, str):
                    value = value.encode()
                elif not isinstance(value, bytes | bytearray | memoryview):
                    raise ValueError(f"{key}.{ext}: expected bytes, str, dict or list, got {type(value).__name__}")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(value), 0.0, 0o444
                info.uname = info.gname = "facefoundry"
                tar.addfile(info, io.BytesIO(value))
                start = tar.offset - -(-info.size // BLOCK) * BLOCK
                index.setdefault(key, {})[ext] = MemberLocation(start, info.size, zlib.crc32(value))
    return buf.getvalue(), index


def index_tar(data: bytes) -> dict[str, dict[str, MemberLocation]]:
    index: dict[str, dict[str, MemberLocation]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = check_member_name(info.name)
            start = info.offset_data
            crc = zlib.crc32(data[start : start + info.size])
            index.setdefault(key, {})[ext] = MemberLocation(start, info.size, crc)
    return index


COMPRESSED_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
BLOCK = tarfile.BLOCKSIZE


def compression(fileobj: BinaryIO) -> str | None:
    """The tar's compression by its magic bytes (``gz``, ``bz2``, ``xz``), None for a plain tar."""
    pos = fileobj.tell()
    head = fileobj.read(6)
    fileobj.seek(pos)
    return next((kind for magic, kind in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def is_compressed(fileobj: BinaryIO) -> bool:
    """A compressed tar can only be read from its start; a plain tar can be read by byte range."""
    return compression(fileobj) is not None


@dataclass
class TarMember:
    """One tar member, or one problem found while reading the tar.

    ``name``, ``key`` and ``ext`` are recorded texts (manifests/names.py): a name that is not UTF-8
    is escaped losslessly, never a reason to fail. ``error`` is a stable rule name
    (``unsafe_member_name``, ``not_a_regular_file``, ``file_too_large``, ``truncated_tar``,
    ``corrupt_tar``, ``unreadable_tar``) and ``detail`` says what exactly; ``key`` and ``ext`` are set
    whenever the name itself is safe, so a bad member still belongs to its sample. ``offset`` is where
    the member's header starts: stable, unique within the tar, and where a byte range read resumes;
    ``data_offset`` where its bytes start (in a plain tar, the byte range a reader fetches them by).
    """

    key: str
    ext: str
    data: bytes | None
    error: str | None = None
    name: str = ""
    detail: str | None = None
    offset: int = 0
    size: int = 0
    data_offset: int = 0


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symlink to {name_text(info.linkname)!r}"
    if info.islnk():
        return f"hard link to {name_text(info.linkname)!r}"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return f"member type {info.type!r}"


def iter_tar_members(
    fileobj: BinaryIO,
    max_bytes: int | None = None,
    stop: int | None = None,
    with_data: bool = True,
    is_transient: Callable[[BaseException], bool] = lambda exc: False,
) -> Iterator[TarMember]:
    """Stream the members of a tar from the file's current position, with bounded reads.

    No member is read before its size is checked against ``max_bytes``; links, devices and fifos are
    error members (never followed, never read); unsafe names, a truncated or corrupt tail become
    error members, never crashes. A plain tar is read in seek mode (``stop``: the byte offset where
    this range ends; headers only when ``with_data`` is false, member data is skipped by seeking);
    a compressed one is decompressed forward from its start. Member objects are not accumulated, so
    memory does not grow with the tar. Errors for which ``is_transient`` says yes propagate (the caller retries).
    """
    kind = compression(fileobj)
    compressed = kind is not None
    try:
        # Compressed: tarfile over the stdlib's buffered decompressing reader (its forward seeks skip a
        # member in constant memory; tarfile's own stream mode re-slices its buffer and is quadratic).
        raw: BinaryIO = _DECOMPRESSORS[kind](fileobj) if kind else fileobj
        # No single read may exceed the member limit: tarfile reads a pax or GNU long-name header
        # whole, at whatever size the header claims (a small .tar.gz can claim a gigabyte).
        capped = _CappedReader(raw, (max_bytes or _HEADER_CAP) + _HEADER_CAP)
        # Names as bytes decoded with surrogate escapes, whatever the locale: none fails to decode.
        tar = tarfile.open(fileobj=capped, mode="r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, zlib.error, _ReadTooLarge) as exc:
        if isinstance(exc, OSError) and is_transient(exc):
            raise
        yield TarMember("", "", None, "unreadable_tar", "", f"{type(exc).__name__}: {exc}")
        return
    last = TarMember("", "", None)
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError, zlib.error, _ReadTooLarge) as exc:
                if isinstance(exc, OSError) and is_transient(exc):
                    raise
                rule = "truncated_tar" if "unexpected end" in str(exc) or isinstance(exc, EOFError) else "corrupt_tar"
                yield TarMember("", "", None, rule, "", _after(last, exc), tar.offset)
                return
            if info is None:
                break
            tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every TarInfo
            if stop is not None and info.offset >= stop:
                return
            if info.isdir():
                continue
            name = name_text(info.name)
            try:
                key, ext = (name_text(part) for part in check_member_name(info.name))
            except UnsafeMemberError as exc:
                yield TarMember("", "", None, exc.rule, name, str(exc), info.offset, info.size)
                last = TarMember("", "", None, name=name, offset=info.offset)
                continue
            last = TarMember(key, ext, None, name=name, offset=info.offset, size=info.size)
            if not info.isreg():
                yield TarMember(key, ext, None, "not_a_regular_file", name, _kind(info), info.offset)
                continue
            if max_bytes is not None and info.size > max_bytes:
                detail = f"{info.size} bytes > {max_bytes}"
                yield TarMember(key, ext, None, "file_too_large", name, detail, info.offset, info.size)
                continue
            if not with_data:
                yield TarMember(key, ext, None, None, name, None, info.offset, info.size)
                continue
            member = _read_member(tar, info, key, ext, name, is_transient)
            yield member
            if member.error is not None:
                return
        if compressed or stop is not None:
            return  # a compressed stream checks its own end; a range ends before the archive does
        cut = _missing_end(fileobj, tar.offset, last, is_transient)
        if cut is not None:
            yield cut


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, key: str, ext: str, name: str,
                 is_transient: Callable[[BaseException], bool]) -> TarMember:
    """A regular member's bytes, or a ``truncated_tar`` error member where the archive ends inside it."""
    try:
        f = tar.extractfile(info)
        data = f.read(info.size) if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and is_transient(exc):
            raise
        detail = f"tar ends inside member {name!r} ({type(exc).__name__}: {exc})"
        return TarMember(key, ext, None, "truncated_tar", name, detail, info.offset, info.size)
    if len(data) != info.size:
        detail = f"tar ends inside member {name!r} ({len(data)} of {info.size} bytes)"
        return TarMember(key, ext, None, "truncated_tar", name, detail, info.offset, info.size)
    return TarMember(key, ext, data, None, name, None, info.offset, info.size, info.offset_data)


def _missing_end(fileobj: BinaryIO, end: int, last: TarMember,
                 is_transient: Callable[[BaseException], bool]) -> TarMember | None:
    """tarfile stops quietly at a cut header; a complete tar has a zero block where it stopped."""
    try:
        fileobj.seek(end)
        block = fileobj.read(BLOCK)
    except OSError as exc:
        if is_transient(exc):
            raise
        block = b""
    if len(block) < BLOCK or block.strip(b"\0"):
        detail = f"no end-of-archive block at byte {end}" + (f" (after {last.name!r})" if last.name else "")
        return TarMember("", "", None, "truncated_tar", "", detail, end)
    return None


_HEADER_CAP = 1 << 20
_DECOMPRESSORS: dict[str, Callable[[BinaryIO], Any]] = {
    "gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bz2": lambda f: bz2.BZ2File(f, mode="rb"),
    "xz": lambda f: lzma.LZMAFile(f, mode="rb"),  # noqa: SIM115 (tarfile closes it)
}


class _ReadTooLarge(ValueError):
    pass


class _CappedReader(io.RawIOBase):
    """A file whose single reads are refused above ``cap`` bytes (seek and tell pass through)."""

    def __init__(self, raw: BinaryIO, cap: int) -> None:
        self.raw, self.cap = raw, cap

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.cap:
            raise _ReadTooLarge(f"a tar header asks for {size} bytes at once (limit {self.cap})")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _after(last: TarMember, exc: BaseException) -> str:
    where = f" after {last.name!r}" if last.name else ""
    return f"tar ends or breaks{where}: {type(exc).__name__}: {exc}"


def read_tar_bytes(data: bytes) -> dict[str, dict[str, bytes]]:
    """All members of a tar we wrote ourselves, grouped by key."""
    out: dict[str, dict[str, bytes]] = {}
    for m in iter_tar_members(io.BytesIO(data)):
        if m.error is not None:
            raise ValueError(f"{m.error}: {m.detail}")
        assert m.data is not None
        out.setdefault(m.key, {})[m.ext] = m.data
    return out
