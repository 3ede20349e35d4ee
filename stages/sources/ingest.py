"""Ingest: a folder of images (local or any fsspec URL) or existing WebDataset tars, as samples.

Folder mode walks ``root`` once (hidden files and folders skipped, links never followed) into a
sorted Parquet listing in the run directory (manifests/listing.py, written by ``prepare``, frozen on
first run); the plan is row ranges of that listing, so it stays a few bytes per shard however large
the folder, and a resumed run cuts the same shards. Every file is listed: one whose extension is not
in ``extensions`` gets its row too (``unsupported_extension``), so no file vanishes unseen. A root
that does not exist, or holds no file with a listed extension, is refused before any work
(InputError) and leaves no listing, so the next run walks it again. With ``labels_from_dirs``
the first folder under ``root`` is the sample's identity (``root/<identity>/.../<file>``). Keys are
the relative path made safe for a WebDataset key (letters, digits, ``_`` and ``-``; folders joined by
``__``) plus 12 hex digits of the path's hash, so two paths never share a key; the original path is
kept in ``source_path``. Names are recorded as manifests/names.py writes them: a name that is not
UTF-8 is escaped losslessly, and the file is re-read by its exact original bytes.

Tar mode reads WebDataset tars (globs allowed). Members that share a key and are adjacent are one
sample, as in WebDataset; keys are preserved when they are valid keys. By default one tar is one
shard (planning reads nothing); ``tar_split`` indexes the headers of each plain tar once at plan
time (no member data is read) and cuts it into byte ranges of ``shard_size`` samples, each read by
seeking to its offset. A compressed tar cannot be read by range and stays one shard.

A plain tar's images are not copied into the run: each sample's image is recorded as the byte range
of its member in the source tar (its URL, offset, size and CRC-32), which every reader fetches and
checks (manifests/ranges.py), so a tar changed after ingest is refused by name, never read as other
pixels. Only loose files (folder mode) and compressed tars, whose members have no byte range a
reader could seek to, are packed into the run's shard tars. Readers open a source tar with this
stage's ``storage_options``, kept in the run (``sources/storage.json``, never in a manifest), so
credentials belong in a profile or the environment, never in the config.

Nothing the input holds can crash the run, vanish, double or grow a process without bound. Every
read is bounded by ``max_file_mb`` (sizes are checked before reading, in folders and in tars) and
images by a pixel limit before decoding (facekit.imaging.decode). Each bad input is a row with
status "error", a rule in ``reason`` and the specifics in ``detail``: ``not_a_regular_file`` (a
symlink, device or fifo in a folder; a symlink, hard-link, device or fifo tar member: never followed
nor read), ``file_too_large``, ``unsafe_member_name`` (``../`` or absolute member names),
``duplicate_key`` (a key that already appeared earlier in the tar: its row gets its own sample id),
``truncated_tar`` / ``corrupt_tar`` / ``unreadable_tar``, ``no_image_in_sample``, ``unreadable_file``,
``unsupported_extension`` (a folder's file of an unlisted extension, never read),
and decode's ``empty_file``, ``not_an_image``, ``corrupt_image``, ``image_too_small``,
``image_too_large``, ``unsupported_mode``. A storage failure that says nothing about the file
(connection, timeout, 5xx, throttling: manifests/transient.py) raises TransientError so the engine
retries the shard instead.

Bytes are passed on as they are, never re-encoded; every stage decodes them as a viewer shows them
(EXIF orientation applied, any mode and bit depth to RGB), and ingest records what that took:
``width``/``height`` upright, ``pixel_mode`` as stored (``RGB``, ``I;16``, ``CMYK``, ``RGBA``...) and
``orientation`` the EXIF orientation applied (1: none; null: the EXIF block could not be read, the
image is used as stored). ``sample_id`` hashes the source URI and the key.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field, model_validator

from facekit.imaging import ImageError, decode, remembering
from manifests.layout import listing_path
from manifests.listing import listing_size, read_listing, walk_rel_paths, write_listing
from manifests.names import IMAGE_EXTENSIONS, extension, name_bytes, name_str, name_text
from manifests.ranges import record_source_options
from manifests.shards import TarMember, is_compressed, iter_tar_members
from manifests.storage import RunStorage, expand_user_glob
from manifests.transient import is_transient
from stages.base import (
    IDENTITY_ID,
    IMAGE,
    IMAGE_EXT,
    IMAGE_SOURCE,
    KEY,
    PARENT_ID,
    Batch,
    InputError,
    Params,
    Reason,
    Resources,
    Rows,
    SourceStage,
    TransientError,
    stable_hash,
)
from stages.mappers.fingerprint import sniff_format

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
KEY_STEM_MAX = 80
_OWN = ("source_uri", "source_path", "file_bytes", "width", "height", "pixel_mode", "orientation")


class IngestParams(Params):
    root: str | None = Field(None, description="a folder of images: a local path or fsspec URL (s3://bucket/prefix)")
    tars: tuple[str, ...] = Field(
        (), description="WebDataset tars: paths, URLs or globs (only the last part of a path is a pattern)")
    labels_from_dirs: bool = Field(False, description="root/<identity>/<file> gives each image its identity label")
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, description="file extensions read from a folder; other files are unsupported_extension rows")
    tar_split: bool = Field(
        False, description="index each plain tar's headers once and cut it into shards of shard_size members")
    max_file_mb: float = Field(
        64.0, gt=0, description="files and tar members larger than this are error rows, never read")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for root and tars (endpoint, credentials profile); kept in the run so that "
                    "every reader opens the source tars alike: name credentials by profile or environment")

    @model_validator(mode="after")
    def _one_source(self) -> IngestParams:
        if (self.root is None) == (not self.tars):
            raise ValueError("set exactly one of 'root' (a folder) or 'tars' (WebDataset tars)")
        return self


def folder_key(rel_path: str) -> str:
    """A valid, unique WebDataset key for a relative path: no dots, no '/', no '..'."""
    stem = rel_path.rsplit(".", 1)[0] if "." in posixpath.basename(rel_path) else rel_path
    safe = "__".join(p for p in (_UNSAFE_CHARS.sub("_", part).strip("_") for part in stem.split("/")) if p)
    return f"{safe[:KEY_STEM_MAX] or 'file'}-{stable_hash(rel_path, 12)}"


def sniff_ext(data: bytes, fallback: str) -> str:
    """The extension the bytes really are (decoders trust it), else the file's own."""
    fmt = sniff_format(data)
    ext = {"jpeg": "jpg", "webp-lossless": "webp"}.get(fmt or "", fmt) or fallback.lower()
    return "jpg" if ext == "jpeg" else ext


class _Bad(Exception):
    """This input's own problem: becomes its error row (a name quoted in the detail as its text)."""

    def __init__(self, rule: str, detail: object = None) -> None:
        super().__init__(rule)
        self.reason = Reason(rule, None if detail is None else name_text(str(detail)))


@dataclass
class _Row:
    """One output row before it is put into the batch."""

    sample_id: str
    key: str
    source_uri: str
    source_path: str
    identity: str | None = None
    ext: str = ""
    data: bytes | None = None
    source: dict[str, Any] | None = None  # where ``data`` lies in a plain source tar (manifests/ranges.py)
    reason: Reason | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _transient(exc: BaseException, what: str) -> TransientError:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return TransientError(f"transient storage error reading {what}: {type(root).__name__}: {root}")


class IngestStage(SourceStage):
    """Reads existing images into the run, byte for byte, with a row for every file, readable or not."""

    name: ClassVar[str] = "ingest"
    version: ClassVar[str] = "4"
    params_model: ClassVar[type[Params]] = IngestParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("source_uri", pa.string()),
        pa.field("source_path", pa.string()),
        pa.field("file_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pixel_mode", pa.string()),
        pa.field("orientation", pa.int8()),
    )

    params: IngestParams

    @property
    def limit(self) -> int:
        return int(self.params.max_file_mb * 1024 * 1024)

    def _exts(self) -> set[str]:
        return {e.lower().lstrip(".") for e in self.params.extensions}

    def _listed(self, rel: str) -> bool:
        return extension(rel) in self._exts()

    def _ext_list(self) -> str:
        return f"params.extensions: {', '.join(sorted(self._exts()))}"

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(url, **self.params.storage_options)

    # ------------------------------------------------------------------ planning

    def _listing_parts(self) -> tuple[str, ...]:
        digest = stable_hash([self.name, self.version, self.params.root, sorted(self._exts())], 16)
        return listing_path(self.context.stage_id, digest)

    def check_input(self) -> None:
        """A folder that exists and holds an image (the walk stops at the first one; skipped when this
        run's listing is already frozen: the run that froze it checked), or tars that exist."""
        if self.params.root is None:
            for i, pattern in enumerate(self.params.tars):
                fs, path = self._fs(pattern)
                if not any(fs.exists(m) for m in expand_user_glob(fs, path)):
                    raise InputError(f"params.tars[{i}]", f"no file matches {pattern!r}")
            return
        if self._run_store().exists(*self._listing_parts()):
            return
        fs, root = self._root_folder()
        others = 0
        for rel in walk_rel_paths(fs, root):
            if self._listed(rel):
                return
            others += 1
        raise self._no_image(others)

    def _root_folder(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The root's filesystem and path, once it is known to be a folder."""
        assert self.params.root is not None
        fs, root = self._fs(self.params.root)
        if not fs.isdir(root):
            what = "is a file, not a folder" if fs.isfile(root) else "does not exist"
            raise InputError("params.root", f"{self.params.root!r} {what} (expected a folder of images)")
        return fs, root

    def _no_image(self, others: int) -> InputError:
        seen = f"its {others} file(s) have other extensions" if others else "it is empty"
        return InputError("params.root", f"no image in {self.params.root!r}: {seen} ({self._ext_list()})")

    def prepare(self, store: Any) -> None:
        """Folder mode: walk the folder once into the run's listing; a resumed run reuses it as is. A walk
        that finds no image raises InputError before the listing is written."""
        self._store = store
        if self.params.root is None:
            record_source_options(store, self.params.tars, self.params.storage_options)
            return
        if store.exists(*self._listing_parts()):
            return
        fs, root = self._root_folder()
        images = others = 0

        def counted(paths: Iterator[str]) -> Iterator[str]:
            nonlocal images, others
            for rel in paths:
                if self._listed(rel):
                    images += 1
                else:
                    others += 1
                yield rel

        def refuse_no_image() -> None:
            if not images:
                raise self._no_image(others)

        try:
            write_listing(store, self._listing_parts(), counted(walk_rel_paths(fs, root)), refuse_no_image)
        except OSError as exc:
            if is_transient(exc):
                raise _transient(exc, f"the listing of {self.params.root}") from exc
            raise

    def _run_store(self) -> RunStorage:
        store = getattr(self, "_store", None)
        if store is None:
            store = RunStorage(self.context.run_dir, self.context.storage_options)
        return store

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if self.params.root is not None:
            store = self._run_store()
            if not store.exists(*self._listing_parts()):
                self.prepare(store)
            n = listing_size(store, self._listing_parts())
            rel = "/".join(self._listing_parts())
            return [
                {"root": name_text(self.params.root), "listing": rel, "start": a, "stop": min(a + shard_size, n)}
                for a in range(0, n, shard_size)
            ]
        shards: list[dict[str, Any]] = []
        for tar in self._list_tars():
            shards += self._plan_tar(tar, shard_size) if self.params.tar_split else [_tar_spec(tar, 0, None)]
        return shards

    def _plan_tar(self, tar: str, shard_size: int) -> list[dict[str, Any]]:
        """Byte ranges of whole samples, from the headers alone; keys already seen in an earlier range
        travel with the range so its reader marks them as duplicates."""
        try:
            fs, path = self._fs(name_str(tar))
            with fs.open(path, "rb") as f:
                if is_compressed(f):
                    return [_tar_spec(tar, 0, None)]
                cuts: list[tuple[int, list[str]]] = [(0, [])]
                earlier: set[str] = set()
                in_range: set[str] = set()
                rows, current = 0, None
                for m in iter_tar_members(f, with_data=False, is_transient=is_transient):
                    if not m.key:  # a bad member is its own row and never starts a range
                        rows += 1
                        continue
                    if m.key == current:
                        continue
                    current = m.key
                    if rows >= shard_size:
                        earlier |= in_range
                        in_range = set()
                        cuts.append((m.offset, []))
                        rows = 0
                    if m.key in earlier and m.key not in in_range:
                        cuts[-1][1].append(m.key)
                    in_range.add(m.key)
                    rows += 1
        except OSError as exc:
            if is_transient(exc):
                raise _transient(exc, tar) from exc
            return [_tar_spec(tar, 0, None)]  # the reader gives the tar its error row
        return [
            _tar_spec(tar, start, cuts[i + 1][0] if i + 1 < len(cuts) else None, seen)
            for i, (start, seen) in enumerate(cuts)
        ]

    def _list_tars(self) -> list[str]:
        """The tars the patterns match, as recorded texts (a tar's own name need not be UTF-8)."""
        found: set[str] = set()
        for pattern in self.params.tars:
            fs, path = self._fs(pattern)
            matches = expand_user_glob(fs, path)
            found.update(name_text(fs.unstrip_protocol(m) if "://" in pattern else m) for m in matches)
        return sorted(found)

    # ------------------------------------------------------------------ reading

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        rows = self._read_folder(shard) if "root" in shard else self._read_tar(shard)
        batch: list[_Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) == self.batch_size:
                yield self._to_batch(batch)
                batch = []
        if batch:
            yield self._to_batch(batch)

    def _to_batch(self, rows: list[_Row]) -> Batch:
        out = Rows([r.sample_id for r in rows], (KEY, IDENTITY_ID, PARENT_ID, IMAGE, IMAGE_EXT, IMAGE_SOURCE, *_OWN))
        for i, r in enumerate(rows):
            out.set(i, **{KEY: r.key, IDENTITY_ID: r.identity, "source_uri": r.source_uri,
                          "source_path": r.source_path, IMAGE_EXT: r.ext.lower() or None})
            if r.data is not None:
                out.set(i, file_bytes=len(r.data))
            if r.reason is None and r.data is not None:
                image = remembering(r.data)  # decoded here once; a fused detect reuses the pixels
                try:
                    decoded = decode(image)
                except ImageError as exc:
                    r.reason = Reason(exc.rule, exc.detail)
                else:
                    h, w = decoded.rgb.shape[:2]
                    out.set(i, **{IMAGE: image, IMAGE_EXT: sniff_ext(r.data, r.ext), IMAGE_SOURCE: r.source,
                                  "width": int(w), "height": int(h), "pixel_mode": decoded.mode,
                                  "orientation": decoded.orientation})
            if r.reason is not None:
                out.fail(i, r.reason.rule, r.reason.detail)
        return out.batch()

    # ------------------------------------------------------------------ folders

    def _read_folder(self, shard: dict[str, Any]) -> Iterator[_Row]:
        fs, root = self._fs(name_str(shard["root"]))
        root = root.rstrip("/")
        source_uri = name_text(fs.unstrip_protocol(root))
        try:
            paths = read_listing(self._run_store(), shard["listing"], int(shard["start"]), int(shard["stop"]))
        except OSError as exc:
            if is_transient(exc):
                raise _transient(exc, shard["listing"]) from exc
            raise
        for rel in paths:
            key = folder_key(rel)
            row = _Row(stable_hash([source_uri, key], 24), key, source_uri, rel)
            if self.params.labels_from_dirs and "/" in rel:
                row.identity = rel.split("/", 1)[0]
            if not self._listed(rel):
                ext = extension(rel)
                row.reason = Reason("unsupported_extension",
                                    f"{'.' + ext if ext else 'no extension'}: not read ({self._ext_list()})")
                yield row
                continue
            row.ext = rel.rsplit(".", 1)[1]
            try:
                row.data = self._read_file(fs, root, rel)
            except _Bad as bad:
                row.reason = bad.reason
            yield row

    def _read_file(self, fs: fsspec.AbstractFileSystem, root: str, rel: str) -> bytes:
        """At most ``max_file_mb`` of one regular file, found by the exact bytes of its name; links and
        special files are never opened."""
        limit = self.limit
        path = f"{root}/{name_str(rel)}"
        try:
            if isinstance(fs, LocalFileSystem):  # bytes: the name as it is on disk, whatever the locale
                return _read_local(os.fsencode(fs._strip_protocol(root)) + b"/" + name_bytes(rel), limit)
            info = fs.info(path)
            if info.get("islink") or info.get("type") != "file":
                raise _Bad("not_a_regular_file", f"{info.get('type')}")
            size = info.get("size")
            if size is not None and size > limit:
                raise _Bad("file_too_large", f"{size} bytes > {limit}")
            with fs.open(path, "rb") as f:
                data = f.read(limit + 1)
        except _Bad:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise _transient(exc, f"{root}/{rel}") from exc
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the row names the file
            raise _Bad("unreadable_file", f"{type(exc).__name__}: {said}") from exc
        return _checked(data, limit)

    # ------------------------------------------------------------------ tars

    def _read_tar(self, shard: dict[str, Any]) -> Iterator[_Row]:
        tar = shard["tar"]
        offset, stop = int(shard.get("offset", 0)), shard.get("stop")
        try:
            fs, path = self._fs(name_str(tar))
            source_uri = name_text(fs.unstrip_protocol(path))
            handle = fs.open(path, "rb")
        except Exception as exc:
            if is_transient(exc):
                raise _transient(exc, tar) from exc
            yield _Row(stable_hash([tar, "unreadable_tar"], 24), "tar-" + stable_hash(tar, 12), tar, "",
                       reason=Reason("unreadable_tar", f"{type(exc).__name__}: {exc}"))
            return
        with handle:
            if offset:
                handle.seek(offset)
            members = iter_tar_members(handle, self.limit, None if stop is None else int(stop),
                                       is_transient=is_transient)
            try:
                by_range = not is_compressed(handle)
                yield from self._group_members(source_uri, members, set(shard.get("seen", ())), by_range)
            except OSError as exc:
                if is_transient(exc):
                    raise _transient(exc, tar) from exc
                raise

    def _group_members(self, source_uri: str, members: Iterable[TarMember], seen: set[str],
                       by_range: bool) -> Iterator[_Row]:
        """Adjacent members with one key are one sample; a key that comes back later is a duplicate.
        ``by_range``: the tar is plain, so each image is referenced where it lies instead of copied."""
        group: list[TarMember] = []
        for m in members:
            if not m.key:  # no usable name, or a tar-level problem: a row of its own
                if not m.name and group:  # the tar ends or breaks here: what came before is complete
                    yield self._tar_row(source_uri, group, seen, by_range)
                    group = []
                detail = f"{m.name}: {m.detail}" if m.name and m.name not in (m.detail or "") else m.detail
                key = "bad-" + stable_hash([source_uri, m.name, m.offset, m.error], 12)
                yield _Row(stable_hash([source_uri, key], 24), key, source_uri, m.name,
                           reason=Reason(m.error or "corrupt_tar", detail))
                continue
            if group and m.key != group[0].key:
                yield self._tar_row(source_uri, group, seen, by_range)
                group = []
            group.append(m)
        if group:
            yield self._tar_row(source_uri, group, seen, by_range)

    def _tar_row(self, source_uri: str, group: list[TarMember], seen: set[str], by_range: bool) -> _Row:
        key, first = group[0].key, group[0]
        safe_key = key if _KEY_RE.match(key) else folder_key(key)
        if key in seen:
            dup_key = f"{safe_key}-dup-{first.offset}"
            return _Row(stable_hash([source_uri, key, "duplicate", first.offset], 24), dup_key, source_uri,
                        first.name, reason=Reason("duplicate_key", f"key {key!r} already appeared earlier in "
                                                  f"the tar (again at byte {first.offset})"))
        seen.add(key)
        files = {m.ext.lower(): m for m in group}
        row = _Row(stable_hash([source_uri, safe_key], 24), safe_key, source_uri, key)
        meta = files.get("json")
        if meta is not None and meta.data is not None:
            try:
                value = json.loads(meta.data)
                row.identity = value.get(IDENTITY_ID) if isinstance(value, dict) else None
                if row.identity is not None:
                    row.identity = str(row.identity)
            except (ValueError, UnicodeDecodeError):
                row.identity = None
        if row.identity is None and self.params.labels_from_dirs and "/" in key:
            row.identity = key.split("/", 1)[0]
        exts = self._exts()
        image_ext = next((e for e in sorted(files) if e.rsplit(".", 1)[-1] in exts), None)
        failed = next((m for m in group if m.error is not None), None)
        if image_ext is not None:
            row.source_path, row.ext = files[image_ext].name, image_ext.rsplit(".", 1)[-1]
        if failed is not None:
            row.reason = Reason(failed.error or "corrupt_tar", f"{failed.name}: {failed.detail}")
        elif image_ext is None:
            row.reason = Reason("no_image_in_sample", f"members: {', '.join(sorted(files))}")
        else:
            image = files[image_ext]
            row.data = image.data or b""
            if by_range:
                row.source = {"tar": source_uri, "offset": image.data_offset, "size": len(row.data),
                              "crc32": zlib.crc32(row.data)}
        return row


def _tar_spec(tar: str, offset: int, stop: int | None, seen: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"tar": tar, "offset": offset, "stop": stop}
    if seen:
        spec["seen"] = sorted(seen)
    return spec


def _checked(data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise _Bad("file_too_large", f"more than {limit} bytes")
    if not data:
        raise _Bad("empty_file", "0 bytes")
    return data


def _read_local(path: bytes, limit: int) -> bytes:
    """Refuse links and special files by what they are (lstat; O_NOFOLLOW at open, so a file swapped for
    a link in between is refused too), then read at most ``limit`` + 1 bytes."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _Bad("not_a_regular_file", f"symlink to {name_text(os.readlink(path))!r}")
    if not stat.S_ISREG(st.st_mode):
        raise _Bad("not_a_regular_file", _mode_name(st.st_mode))
    if st.st_size > limit:
        raise _Bad("file_too_large", f"{st.st_size} bytes > {limit}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Bad("not_a_regular_file", "symlink") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Bad("not_a_regular_file", _mode_name(st.st_mode))
        return _checked(f.read(limit + 1), limit)


def _mode_name(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
