"""Image bytes by byte range, verified: the one reader of pixels for stage input, the export writer
and the report's thumbnails.

A location names a tar, an offset, a size and the CRC-32 committed for the slice. The tar is either
relative to the run directory (a stage's shard tar) or an absolute URL (``file:///...``,
``s3://bucket/...``): a member of a WebDataset tar the user gave to ingest, referenced where it lies
instead of copied into the run. Every slice is checked against its size and checksum before use, so
a tar changed after its commit is refused, naming the tar, and never serves other pixels.

A source tar is opened with the fsspec options ingest was given for its location, which the run
keeps in ``sources/storage.json`` (one entry per ``scheme://bucket``), so every reader (a Ray worker,
the export, the report) opens it as ingest did. Manifests hold only the URL. The options are stored
as the config gives them: a config names credentials by profile or environment (``profile``,
``AWS_*`` variables, an instance role), never by value.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from manifests.commit import uncommit
from manifests.layout import SOURCE_STORAGE_FILE, manifest_path, tar_owner
from manifests.names import name_str
from manifests.storage import RunStorage


class CorruptSourceError(RuntimeError):
    """A slice does not match the checksum committed for it, or its source tar is gone: not
    transient, never retried."""


@dataclass(frozen=True)
class ByteRange:
    """Where one member's bytes lie: a tar (relative to the run, or a source tar's absolute URL),
    offset, size, CRC-32 (None for fragments written before per-member checksums)."""

    tar: str
    offset: int
    size: int
    crc32: int | None = None


def is_source_tar(tar: str) -> bool:
    """A tar outside the run (an absolute URL); run paths are relative and never hold a scheme."""
    return "://" in tar


def _location(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def record_source_options(store: RunStorage, urls: Iterable[str], options: dict[str, Any]) -> None:
    """Keep the fsspec options of these source locations for the run's readers (merged with any other
    source's entries; local files need none)."""
    wanted = {_location(u): options for u in urls if options and is_source_tar(u) and not u.startswith("file://")}
    if not wanted:
        return
    known = source_options(store)
    if all(known.get(k) == v for k, v in wanted.items()):
        return
    store.write_atomic(json.dumps({**known, **wanted}, sort_keys=True).encode(), *SOURCE_STORAGE_FILE)


def source_options(store: RunStorage) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(store.read_bytes(*SOURCE_STORAGE_FILE))
    except FileNotFoundError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _opener(store: RunStorage) -> Any:
    """tar -> (filesystem, path, is local), the run's own tars through the run's storage."""
    options: dict[str, dict[str, Any]] | None = None

    def open_tar(tar: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
        nonlocal options
        if not is_source_tar(tar):
            return store.fs, store.path(tar), store.is_local
        url = name_str(tar)
        if options is None:
            options = source_options(store) if not url.startswith("file://") else {}
        fs, path = fsspec.core.url_to_fs(url, **options.get(_location(url), {}))
        return fs, path, isinstance(fs, LocalFileSystem)

    return open_tar


def fetch_ranges(store: RunStorage, ranges: list[ByteRange]) -> list[bytes]:
    """Every range's bytes, read grouped by tar (sorted by offset; one open per tar on a local disk,
    one concurrent ``cat_ranges`` per filesystem otherwise), verified by length and checksum."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].tar, ranges[i].offset))
    out: list[bytes] = [b""] * len(ranges)
    open_tar = _opener(store)
    remote: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    current: str | None = None
    f: Any = None
    try:
        for i in order:
            r = ranges[i]
            fs, path, local = open_tar(r.tar)
            if not local:
                remote.setdefault(id(fs), (fs, []))[1].append((i, path))
                continue
            if r.tar != current:
                if f is not None:
                    f.close()
                current, f = r.tar, None
                f = _open_local(path, r.tar)
            f.seek(r.offset)
            out[i] = f.read(r.size)
    finally:
        if f is not None:
            f.close()
    for fs, items in remote.values():
        try:
            chunks = fs.cat_ranges([p for _, p in items], [ranges[i].offset for i, _ in items],
                                   [ranges[i].offset + ranges[i].size for i, _ in items], on_error="raise")
        except FileNotFoundError as exc:
            raise _gone(ranges[items[0][0]].tar, exc) from None
        for (i, _), chunk in zip(items, chunks, strict=True):
            if isinstance(chunk, BaseException):
                raise chunk
            out[i] = chunk
    for i in order:
        _verify(store, ranges[i], out[i])
    return out


def _open_local(path: str, tar: str) -> Any:
    try:
        return open(path, "rb")  # the caller closes it when the tar changes
    except FileNotFoundError as exc:
        if is_source_tar(tar):
            raise _gone(tar, exc) from None
        raise


def _gone(tar: str, exc: BaseException) -> CorruptSourceError:
    return CorruptSourceError(f"source tar {tar} is gone ({type(exc).__name__}): its images were referenced "
                              "there at ingest, not copied; restore it, or ingest again in a new run (--new)")


def _verify(store: RunStorage, r: ByteRange, data: bytes) -> None:
    short = len(data) != r.size
    if not short and (r.crc32 is None or zlib.crc32(data) == r.crc32):
        return
    if is_source_tar(r.tar):
        what = (f"ends before {r.offset + r.size}" if short
                else f"holds {r.size} bytes at offset {r.offset} that do not match the CRC-32 recorded at ingest")
        raise CorruptSourceError(
            f"source tar {r.tar} changed after ingest: it {what}; its images are not used. Restore the tar as it "
            "was, or ingest it again in a new run (--new)")
    if short:
        raise OSError(f"short read of {r.tar} at {r.offset}: {len(data)} of {r.size} bytes")
    owner = tar_owner(r.tar)
    if owner is not None:
        uncommit(store, store.path(*manifest_path(*owner)))
    raise CorruptSourceError(
        f"{r.tar} at offset {r.offset}: {r.size} bytes that do not match the CRC-32 committed for them "
        f"(the tar was damaged after its commit); nothing was exported from it"
        + (f". Stage {owner[0]!r}, shard {owner[1]!r} is uncommitted: run again to recompute it"
           if owner else ""))
