"""The verified commit: what makes a manifest fragment (and the shard tar it points to) committed.

A fragment is committed when it can be proven whole, not when its file exists. The proof is written
into the fragment itself, so the rule "the manifest written last is the commit" holds unchanged and
no second file has to agree with the first:

- The Parquet footer carries a key-value entry ``facefoundry.commit`` (JSON): the number of bytes
  before the footer (the data pages), their SHA-256, the row count and, for a pixel-writing stage,
  the path, size and SHA-256 of the shard tar written just before it. The data pages are complete
  before the footer is written, so the footer can describe the bytes in front of it.
- The file size then follows from the footer alone: ``data_bytes + footer + 8``. A truncated file
  loses its trailing ``PAR1`` magic or its footer; a file cut or padded elsewhere no longer has that
  size.

Two levels of checking, chosen by cost:

- ``footer`` (listings, status, the catalog, the resume scan): one listing per folder gives every
  size, one ranged read of each fragment's tail gives its footer; the size must match and the commit
  record must be there. For a pixel stage the tar's listed size must match its record too. This is
  the same footer read DuckDB does for every query, so a CLI call costs no more than before.
- ``full`` (the engine reading a fragment as input, which reads the bytes anyway): the SHA-256 of the
  data pages and of the tar are recomputed.

A fragment that fails either check is not committed: it is reported (``BadFragment.reason``),
skipped by every reader, and the shard is recomputed on resume. On object stores a truncated object
cannot come from our own PUT (a PUT is atomic), but a local disk, a copy tool or a bucket sync can
leave one, and the check costs little.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.layout import MANIFEST_SUFFIX, MANIFESTS_DIR, SHARD_SUFFIX, SHARDS_DIR, manifest_path
from manifests.storage import RunStorage

COMMIT_KEY = b"facefoundry.commit"
COMMIT_VERSION = 1
_MAGIC = b"PAR1"
_TAIL_READ = 64 * 1024  # one ranged read holds a manifest's footer in practice; a larger one costs a second read
_MIN_PARQUET = 12
_CACHE_MAX = 200_000


@dataclass(frozen=True)
class TarRecord:
    """What the stage that wrote a shard tar recorded about it."""

    path: str  # relative to the run directory
    size: int
    sha256: str


@dataclass(frozen=True)
class ShardStats:
    """One fragment's decisions and timing, the same figures ``pipeline.status``'s SQL takes from its
    rows: status sums these from the footers it reads anyway instead of scanning every row of the run
    (29 s at 20,000 fragments). Written for fragments that have the manifest's common columns."""

    kept: int
    dropped: int
    errors: int
    busy_s: float  # sum of duration_ms / 1000
    done_s: float | None  # latest processed_at, seconds since the epoch
    workers: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kept": self.kept, "dropped": self.dropped, "errors": self.errors, "busy_s": self.busy_s,
                "done_s": self.done_s, "workers": list(self.workers)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ShardStats:
        done = doc.get("done_s")
        return cls(int(doc["kept"]), int(doc["dropped"]), int(doc["errors"]), float(doc["busy_s"]),
                   None if done is None else float(done), tuple(str(w) for w in doc.get("workers") or ()))


@dataclass(frozen=True)
class CommitRecord:
    data_bytes: int
    data_sha256: str
    rows: int
    tar: TarRecord | None
    stats: ShardStats | None = None  # None: written before fragments carried them (status reads the rows)


@dataclass(frozen=True)
class Fragment:
    """A verified manifest fragment of one stage."""

    stage_id: str
    shard: str
    path: str  # full path in the store's filesystem
    size: int
    record: CommitRecord


@dataclass(frozen=True)
class BadFragment:
    stage_id: str
    shard: str
    path: str
    reason: str

    def message(self) -> str:
        return f"{self.path}: {self.reason}; not committed, recomputed on resume"


@dataclass
class Scan:
    fragments: list[Fragment]
    bad: list[BadFragment]

    @property
    def shards(self) -> set[str]:
        return {f.shard for f in self.fragments}


class CorruptFragmentError(ValueError):
    """A fragment (or the tar it records) is not what its commit record says."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------- writing


def tar_record(path: str, data: bytes) -> TarRecord:
    return TarRecord(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


_STATS_COLUMNS = ("status", "keep", "duration_ms", "processed_at", "worker")


def shard_stats(table: pa.Table) -> ShardStats | None:
    """Counts as status's SQL makes them: kept = ok and keep, dropped = ok and not keep, errors = not
    ok (a null keep or status counts in neither, as SQL's three-valued FILTER does)."""
    if not set(_STATS_COLUMNS) <= set(table.column_names):
        return None
    ok = pc.equal(table["status"], "ok")
    keep = table["keep"]

    def count(mask: pa.ChunkedArray) -> int:
        return int(pc.sum(pc.fill_null(mask, False).cast(pa.int64())).as_py() or 0)

    done = pc.max(table["processed_at"]).as_py()
    busy = pc.sum(table["duration_ms"].cast(pa.float64())).as_py() or 0.0
    workers = sorted(str(w) for w in pc.unique(table["worker"].drop_null()).to_pylist())
    return ShardStats(kept=count(pc.and_(ok, keep)), dropped=count(pc.and_(ok, pc.invert(keep))),
                      errors=count(pc.invert(ok)), busy_s=float(busy) / 1000.0,
                      done_s=None if done is None else _epoch(done), workers=tuple(workers))


def _epoch(t: datetime) -> float:
    """Seconds since the epoch; a naive timestamp is UTC, as DuckDB's ``epoch()`` reads it."""
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def stage_totals(fragments: Iterable[Fragment]) -> dict[str, Any] | None:
    """A stage's counts summed from its fragments' records: rows, kept, dropped, errors, busy seconds,
    the distinct workers, and the span from the earliest shard's start (its commit time less its busy
    time) to the last commit. None when a fragment's record has no counts (written before they were)."""
    frags = list(fragments)
    if any(f.record.stats is None for f in frags):
        return None
    stats = [f.record.stats for f in frags if f.record.stats is not None]
    timed = [(s.done_s - s.busy_s, s.done_s) for s in stats if s.done_s is not None]
    return {"samples": sum(f.record.rows for f in frags), "kept": sum(s.kept for s in stats),
            "dropped": sum(s.dropped for s in stats), "errors": sum(s.errors for s in stats),
            "busy_s": float(sum(s.busy_s for s in stats)),
            "workers": sorted({w for s in stats for w in s.workers}),
            "start_s": min(t[0] for t in timed) if timed else None,
            "done_s": max(t[1] for t in timed) if timed else None}


def encode_manifest(table: pa.Table, tar: TarRecord | None = None) -> bytes:
    """Parquet bytes whose footer carries the commit record of the data pages before it."""
    buf = io.BytesIO()
    writer = pq.ParquetWriter(buf, table.schema, compression="zstd")
    try:
        writer.write_table(table)
        # write_table closes the row group: everything before the footer is in the buffer now.
        data = buf.getvalue()
        record = {"v": COMMIT_VERSION, "data_bytes": len(data), "data_sha256": hashlib.sha256(data).hexdigest(),
                  "rows": table.num_rows,
                  "tar": None if tar is None else {"path": tar.path, "size": tar.size, "sha256": tar.sha256}}
        stats = shard_stats(table)
        if stats is not None:
            record["stats"] = stats.to_json()
        writer.add_key_value_metadata({COMMIT_KEY.decode(): json.dumps(record, sort_keys=True)})
    finally:
        writer.close()
    out = buf.getvalue()
    if _footer_start(out) != len(data):  # a writer that buffers differently must never produce a wrong record
        raise RuntimeError("parquet writer did not flush the data pages before the footer")
    return out


# ---------------------------------------------------------------- reading and checking


def _footer_start(data: bytes) -> int:
    (length,) = struct.unpack("<I", data[-8:-4])
    return len(data) - 8 - length


def _parse_footer(tail: bytes, size: int, path: str) -> tuple[CommitRecord, int]:
    """The commit record from a file's tail; raises CorruptFragmentError on anything but a whole footer."""
    if size < _MIN_PARQUET or len(tail) < 8 or tail[-4:] != _MAGIC:
        raise CorruptFragmentError(path, f"truncated manifest (no Parquet footer; {size} bytes)")
    (length,) = struct.unpack("<I", tail[-8:-4])
    if length + 8 + 4 > size:
        raise CorruptFragmentError(path, f"truncated manifest (footer of {length} bytes in a {size}-byte file)")
    if length + 8 > len(tail):
        raise _NeedMore(length + 8)
    footer = tail[-8 - length:-8]
    raw = _commit_value(footer)
    if raw is None:  # not where our writer puts it: let the Thrift parser decide
        try:
            meta = pq.read_metadata(io.BytesIO(_MAGIC + footer + tail[-8:])).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise CorruptFragmentError(path, f"unreadable manifest footer ({exc})") from None
        raw = meta.get(COMMIT_KEY)
    if raw is None:
        raise CorruptFragmentError(path, "manifest has no commit record (not written by a verified commit)")
    try:
        doc = json.loads(raw.decode())  # str, not bytes: json's encoding sniffing was a tenth of status
        tar = doc.get("tar")
        stats = doc.get("stats")
        record = CommitRecord(int(doc["data_bytes"]), str(doc["data_sha256"]), int(doc["rows"]),
                              TarRecord(str(tar["path"]), int(tar["size"]), str(tar["sha256"])) if tar else None,
                              ShardStats.from_json(stats) if isinstance(stats, dict) else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFragmentError(path, f"malformed commit record ({exc})") from None
    expected = record.data_bytes + length + 8
    if size != expected:
        raise CorruptFragmentError(path, f"manifest size {size} != committed size {expected}")
    return record, length


def _commit_value(footer: bytes) -> bytes | None:
    """The commit record straight from the footer's Thrift bytes (compact protocol: the key string,
    then field 2 of type binary, 0x18, a varint length and the value). Parsing the whole footer costs
    ten times more, and the resume scan does this for every fragment of the run."""
    at = footer.rfind(COMMIT_KEY)
    if at < 0:
        return None
    i = at + len(COMMIT_KEY)
    if i >= len(footer) or footer[i] != 0x18:
        return None
    i, n, shift = i + 1, 0, 0
    while i < len(footer) and shift < 35:
        b = footer[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            break
    value = footer[i:i + n]
    return value if len(value) == n and value.startswith(b"{") else None


class _NeedMore(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


def _read_tail(store: RunStorage, path: str, size: int, n: int) -> bytes:
    if store.is_local:  # the resume scan reads 10,000s of tails: skip fsspec's per-call overhead
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, n, size - n)
        finally:
            os.close(fd)
    return bytes(store.fs.cat_file(path, start=size - n, end=size))


def read_record(store: RunStorage, path: str, size: int) -> CommitRecord:
    """Footer-level check of one fragment of known (listed) size: one ranged read, two for huge footers."""
    key = _cache_key(store, path, size)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    n = min(size, _TAIL_READ)
    tail = _read_tail(store, path, size, n) if size else b""
    try:
        record, _ = _parse_footer(tail, size, path)
    except _NeedMore as more:
        tail = _read_tail(store, path, size, more.n)
        record, _ = _parse_footer(tail, size, path)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = record
    return record


def decode_manifest(data: bytes, path: str) -> tuple[pa.Table, CommitRecord]:
    """Full check of fragment bytes (size, footer, SHA-256 of the data pages), then the table."""
    try:
        record, _ = _parse_footer(data, len(data), path)
    except _NeedMore:  # cannot happen with the whole file in hand; keeps the type checker honest
        raise CorruptFragmentError(path, "truncated manifest") from None
    digest = hashlib.sha256(memoryview(data)[: record.data_bytes]).hexdigest()
    if digest != record.data_sha256:
        raise CorruptFragmentError(path, "manifest checksum mismatch (sha256 of its data pages)")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowException) as exc:
        raise CorruptFragmentError(path, f"unreadable manifest ({exc})") from None
    if table.num_rows != record.rows:
        raise CorruptFragmentError(path, f"manifest has {table.num_rows} rows, its commit record {record.rows}")
    return table, record


def check_tar(data: bytes, record: TarRecord) -> None:
    if len(data) != record.size:
        raise CorruptFragmentError(record.path, f"shard tar is {len(data)} bytes, committed as {record.size}")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise CorruptFragmentError(record.path, "shard tar checksum mismatch (sha256)")


def read_manifest_verified(store: RunStorage, stage_id: str, shard: str) -> tuple[pa.Table, CommitRecord]:
    """Read and fully verify one fragment. FileNotFoundError if absent, CorruptFragmentError if bad."""
    path = store.path(*manifest_path(stage_id, shard))
    return decode_manifest(store.fs.cat_file(path), path)


# ---------------------------------------------------------------- listings


def scan_fragments(store: RunStorage, stage_id: str) -> Scan:
    """Every fragment of a stage, split into verified (footer level) and bad, with the reason."""
    listed = store.list_sizes(MANIFESTS_DIR, stage_id, suffix=MANIFEST_SUFFIX)
    names = sorted(listed)
    folder = store.path(MANIFESTS_DIR, stage_id)

    def check(name: str) -> Fragment | BadFragment:
        path, size = f"{folder}/{name}", listed[name]
        shard = name[: -len(MANIFEST_SUFFIX)]
        try:
            return Fragment(stage_id, shard, path, size, read_record(store, path, size))
        except CorruptFragmentError as exc:
            return BadFragment(stage_id, shard, path, exc.reason)

    if store.is_local or len(names) < 4:  # local: ~40 us of CPU per fragment, threads do not help
        results: Iterable[Fragment | BadFragment] = [check(n) for n in names]
    else:  # remote: latency-bound ranged GETs
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(check, names))
    good: list[Fragment] = []
    bad: list[BadFragment] = []
    tars: dict[str, int] | None = None
    for r in results:
        if isinstance(r, BadFragment):
            bad.append(r)
            continue
        t = r.record.tar
        if t is not None:
            if tars is None:
                tars = store.list_sizes(SHARDS_DIR, stage_id, suffix=SHARD_SUFFIX)
            listed_tar = tars.get(posixpath.basename(t.path))
            if listed_tar is None:
                bad.append(BadFragment(stage_id, r.shard, r.path, f"its shard tar {t.path} is missing"))
                continue
            if listed_tar != t.size:
                bad.append(BadFragment(stage_id, r.shard, r.path,
                                       f"its shard tar {t.path} is {listed_tar} bytes, committed as {t.size}"))
                continue
        good.append(r)
    return Scan(good, bad)


def committed_fragments(store: RunStorage, stage_id: str) -> list[Fragment]:
    """The verified fragments of a stage, sorted by shard: what every reader (catalog, status, export)
    may read. Costs one listing per folder and one tail read per fragment (cached per process)."""
    return scan_fragments(store, stage_id).fragments


def verify_fragment(store: RunStorage, stage_id: str, shard: str, full: bool = False) -> Fragment:
    """Check one fragment; raises FileNotFoundError or CorruptFragmentError. ``full`` also recomputes
    the checksums of the fragment and of its tar (reads both whole)."""
    path = store.path(*manifest_path(stage_id, shard))
    if full:
        data = store.fs.cat_file(path)
        _, record = decode_manifest(data, path)
        if record.tar is not None:
            check_tar(store.read_bytes(record.tar.path), record.tar)
        return Fragment(stage_id, shard, path, len(data), record)
    size = int(store.fs.size(path))
    record = read_record(store, path, size)
    if record.tar is not None:
        tar_path = store.path(record.tar.path)
        try:
            tar_size = int(store.fs.size(tar_path))
        except FileNotFoundError:
            raise CorruptFragmentError(path, f"its shard tar {record.tar.path} is missing") from None
        if tar_size != record.tar.size:
            raise CorruptFragmentError(path, f"its shard tar {record.tar.path} is {tar_size} bytes, "
                                             f"committed as {record.tar.size}")
    return Fragment(stage_id, shard, path, size, record)


def uncommit(store: RunStorage, path: str) -> None:
    """Remove a fragment proven bad, so that no reader and no resume counts it again."""
    with contextlib.suppress(FileNotFoundError):
        store.remove_path(path)
    _forget(path)


# ---------------------------------------------------------------- the per-process cache


_CACHE: dict[tuple[str, str, int], CommitRecord] = {}


def _cache_key(store: RunStorage, path: str, size: int) -> tuple[str, str, int]:
    proto = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return (proto, path, size)


def _forget(path: str) -> None:
    for key in [k for k in _CACHE if k[1] == path]:
        del _CACHE[key]


# Matches every committed Parquet file of a folder and no temporary (``_tmp-``) or hidden one.
COMMITTED_GLOB = "[!_.]*" + MANIFEST_SUFFIX


def committed_tokens(store: RunStorage, stage_id: str, *, tokens: bool = True) -> dict[str, str]:
    """Name -> version token (size and modification time or ETag) of each committed manifest
    fragment of a stage, from one listing.

    THE one place that decides which fragments are committed: status, the catalog, compaction and
    lineage all ask here, so commit verification (size and checksum) is swapped in at one spot.
    The token tells a compacted copy whether the fragment it copied is still the one on disk;
    ``tokens=False`` spares a local disk one stat per fragment when no copy needs checking.
    """
    folder = store.path(MANIFESTS_DIR, stage_id)
    out: dict[str, str] = {}
    if store.is_local:  # os.scandir: fsspec's local ls costs a Python info() per entry (20,000 of them)
        try:
            with os.scandir(folder) as it:
                for d in it:
                    if d.name.endswith(MANIFEST_SUFFIX) and not d.name.startswith((".", "_")) and d.is_file():
                        st = d.stat() if tokens else None
                        out[d.name] = f"{st.st_size}:{st.st_mtime_ns}" if st else ""
        except FileNotFoundError:
            return {}
        return dict(sorted(out.items()))
    # Object-store listings are cached per filesystem instance (and fsspec shares instances): a
    # fragment committed by another process must not be missed.
    store.fs.invalidate_cache(folder)
    try:
        entries = store.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        if e.get("type") != "file" or not name.endswith(MANIFEST_SUFFIX) or name.startswith((".", "_")):
            continue
        stamp = e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or e.get("created") or ""
        out[name] = f"{e.get('size')}:{stamp}"
    return dict(sorted(out.items()))
