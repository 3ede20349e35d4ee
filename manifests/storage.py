"""Run-directory storage through fsspec, and how a file gets into place whole.

On a local disk a file is written under a temporary name beside its target, flushed to disk
(fsync) and renamed over it: a reader sees the old file or the new one, never half of one, and a
crash after the rename cannot leave a file whose name is there but whose bytes are not. On an
object store a single PUT is already atomic (the object appears whole or not at all), so the bytes
go straight to the final key: a temporary key + copy + delete would cost three requests and open a
window where a copy is half done. Other filesystems (sftp, hdfs, ...) keep temporary name + move.

Either way the *manifest fragment is written last* and is the commit (manifests/commit.py says
how it is verified): a shard tar without a committed manifest fragment does not exist for any
reader, and resume recomputes it.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from manifests.sql import glob_escape, has_glob

TMP_PREFIX = "_tmp-"

# Filesystems where one PUT of the whole object is atomic.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


class StorageURLError(ValueError):
    """A run path fsspec cannot open: an unknown protocol (``a[link=file:///x]`` reads as one) or a
    backend that is not installed."""


class RunStorage:
    """A run directory: a local path or any fsspec URL (s3://, gs://, memory://)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ValueError, ImportError) as exc:
            raise StorageURLError(f"cannot open {url}: {exc}") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self.url = url

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def atomic_put(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        return any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        """A JSON object the run wrote; None when the file is missing, not JSON or not an object: a record
        that cannot be read counts as one never written."""
        if not self.exists(*parts):
            return None
        try:
            doc = json.loads(self.read_bytes(*parts))
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def read_range(self, rel_path: str, offset: int, size: int) -> bytes:
        return self.fs.cat_file(self.path(rel_path), start=offset, end=offset + size)

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the committed files in a folder, sorted."""
        folder = self.path(*parts)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e.rstrip("/")) for e in entries]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith((".", "_")))

    def list_sizes(self, *parts: str, suffix: str = "") -> dict[str, int]:
        """name -> size of the committed-looking files of a folder, from one listing."""
        if self.is_local:  # os.scandir: fsspec's local ls builds an info dict per entry (20,000 of them)
            out: dict[str, int] = {}
            try:
                with os.scandir(self.path(*parts)) as it:
                    for d in it:
                        if d.name.endswith(suffix) and not d.name.startswith((".", "_")) and d.is_file():
                            out[d.name] = d.stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return out
        try:
            entries = self.fs.ls(self.path(*parts), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            if e.get("type") != "directory" and name.endswith(suffix) and not name.startswith((".", "_")):
                out[name] = int(e.get("size") or 0)
        return out

    def write_atomic(self, data: bytes, *parts: str) -> str:
        """Put ``data`` at its final name so that no reader ever sees a partial file (see the module doc)."""
        final = self.path(*parts)
        folder = posixpath.dirname(final)
        if self.atomic_put:
            self.fs.pipe_file(final, data)
            return final
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        if self.is_local:
            _write_local_durable(tmp, final, data)
            return final
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.move(tmp, final)
        return final

    def move(self, src: str, dst: str) -> None:
        move_path(self.fs, src, dst)

    def remove_path(self, path: str, recursive: bool = False) -> None:
        remove_path(self.fs, path, recursive=recursive)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.remove_path(target, recursive=recursive)

    def clear_tmp(self, *parts: str) -> None:
        """Temporary files of a killed run are garbage: nothing refers to them."""
        folder = self.path(*parts)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(entry.rstrip("/")).startswith(TMP_PREFIX):
                self.remove_path(entry)


# fsspec's generic ``mv``, ``rm`` and ``copy`` expand a path holding ``*``, ``?`` or ``[`` as a glob (and
# expand what they found once more): ``run[1]/x`` would name ``run1/x``. The local filesystem's own
# ``mv`` and ``rm`` take the path as it is; elsewhere a path with a wildcard character goes by name
# (``cp_file``, ``rm_file``) or escaped, so it names itself only.


def move_path(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    if isinstance(fs, LocalFileSystem) or not (has_glob(src) or has_glob(dst)):
        fs.mv(src, dst)
        return
    fs.cp_file(src, dst)
    fs.rm_file(src)


def remove_path(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    if isinstance(fs, LocalFileSystem) or not has_glob(path):
        fs.rm(path, recursive=recursive)
        return
    found = fs.find(path, withdirs=True) if recursive else []
    fs.rm([glob_escape(p) for p in sorted({path, *found})])


def _write_local_durable(tmp: str, final: str, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: after a power cut the name never points at missing bytes."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(posixpath.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def expand_user_glob(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The files a user's path names when its LAST part alone may be a glob (``/data/c[1]/*.tar``):
    the folder part is literal, whatever characters it holds. A last part without a wildcard
    character is the one path itself."""
    folder, name = posixpath.split(path)
    if not has_glob(name):
        return [path]
    return sorted(fs.glob(posixpath.join(glob_escape(folder), name) if folder else name))

