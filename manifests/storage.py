"""Run-directory storage through fsspec, and the commit protocol.

Every file a stage produces is first written under a temporary name and then moved to its final
name. On a local disk the move is an atomic rename. On object stores a move is copy + delete and
not atomic, which is why the *manifest fragment is written last*: a shard tar without a committed
manifest fragment does not exist for any reader, and resume recomputes it.
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = "_tmp-"


class RunStorage:
    """A run directory: a local path or any fsspec URL (s3://, gs://, memory://)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self.url = url

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

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

    def write_atomic(self, data: bytes, *parts: str) -> str:
        """Write to a temporary name beside the target, then move it into place."""
        final = self.path(*parts)
        folder = posixpath.dirname(final)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)
        return final

    def remove(self, *parts: str, recursive: bool = False) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)

    def clear_tmp(self, *parts: str) -> None:
        """Temporary files of a killed run are garbage: nothing refers to them."""
        folder = self.path(*parts)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(entry.rstrip("/")).startswith(TMP_PREFIX):
                self.fs.rm(entry)
