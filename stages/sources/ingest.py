"""Ingest: a folder of images (local or any fsspec URL) or existing WebDataset tars, as samples.

Folder mode lists ``root`` recursively (sorted, hidden files and folders skipped, image extensions
only) and cuts the sorted list into shards of relative paths, so a resumed run plans the same shards.
With ``labels_from_dirs`` the first folder under ``root`` is the sample's identity
(``root/<identity>/.../<file>``). Keys are the relative path made safe for a WebDataset key (letters,
digits, ``_`` and ``-``; folders joined by ``__``) plus 12 hex digits of the path's hash, so two paths
never share a key (``a/b.jpg`` vs ``a__b.jpg``, ``x.jpg`` vs ``x.png``); the original path is kept in
``source_path``.

Tar mode reads WebDataset tars (globs allowed). Members that share a key are one sample, as in
WebDataset; keys are preserved when they are valid keys, a member named with ``../`` or an absolute
path becomes an error row "unsafe member name" and its bytes go nowhere. By default one tar is one
shard (tars are usually shard-sized already, and planning then reads nothing); ``tar_split`` counts
samples at plan time and cuts each tar into member ranges of ``shard_size``.

Bytes are passed on as they are, never re-encoded. Every file is decode-checked with
facekit.imaging.decode_rgb: an unreadable, empty, truncated, too small or too large file is still a
row, with status "error" and the reason. ``sample_id`` hashes the source URI and the key.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
from pydantic import Field, model_validator

from facekit.imaging import ImageError, decode_rgb
from stages.base import (
    IDENTITY_ID,
    IMAGE,
    IMAGE_EXT,
    KEEP,
    KEY,
    PARENT_ID,
    REASON,
    SAMPLE_ID,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    Batch,
    Params,
    Resources,
    SourceStage,
    stable_hash,
)
from stages.mappers.fingerprint import sniff_format

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
KEY_STEM_MAX = 80


class IngestParams(Params):
    root: str | None = None  # folder: local path or fsspec URL
    tars: tuple[str, ...] = ()  # WebDataset tars: paths, URLs or globs
    labels_from_dirs: bool = False
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    tar_split: bool = False
    max_file_mb: float = Field(64.0, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)

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


def _visible(rel_path: str) -> bool:
    return not any(part.startswith(".") for part in rel_path.split("/"))


class IngestStage(SourceStage):
    """Reads existing images into the run, byte for byte, with a row for every file, readable or not."""

    name: ClassVar[str] = "ingest"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = IngestParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    batch_size: ClassVar[int] = 64
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("source_uri", pa.string()),
        pa.field("source_path", pa.string()),
        pa.field("file_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    )

    params: IngestParams

    # ------------------------------------------------------------------ planning

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if self.params.root is not None:
            paths = self._list_folder()
            return [
                {"root": self.params.root, "paths": paths[a : a + shard_size]}
                for a in range(0, len(paths), shard_size)
            ]
        shards: list[dict[str, Any]] = []
        for tar in self._list_tars():
            if not self.params.tar_split:
                shards.append({"tar": tar, "start": 0, "stop": None})
                continue
            count = sum(1 for _ in self._tar_samples(tar, with_data=False))
            starts = list(range(0, max(count, 1), shard_size))
            for n, a in enumerate(starts):  # the last range is open so a bad tail still gets its row
                shards.append(
                    {"tar": tar, "start": a, "stop": None if n == len(starts) - 1 else a + shard_size}
                )
        return shards

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(url, **self.params.storage_options)

    def _list_folder(self) -> list[str]:
        assert self.params.root is not None
        fs, root = self._fs(self.params.root)
        root = root.rstrip("/")
        exts = {e.lower().lstrip(".") for e in self.params.extensions}
        rel_paths = []
        for path in fs.find(root):
            rel = posixpath.relpath(path, root) if path.startswith(root) else path
            if _visible(rel) and "." in posixpath.basename(rel) and rel.rsplit(".", 1)[1].lower() in exts:
                rel_paths.append(rel)
        return sorted(rel_paths)

    def _list_tars(self) -> list[str]:
        found: set[str] = set()
        for pattern in self.params.tars:
            fs, path = self._fs(pattern)
            matches = fs.glob(path) if any(c in path for c in "*?[") else [path]
            found.update(fs.unstrip_protocol(m) if "://" in pattern else m for m in matches)
        return sorted(found)

    # ------------------------------------------------------------------ reading

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        rows = self._read_folder(shard) if "paths" in shard else self._read_tar(shard)
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == self.batch_size:
                yield _to_batch(batch)
                batch = []
        if batch:
            yield _to_batch(batch)

    def _read_folder(self, shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
        fs, root = self._fs(shard["root"])
        root = root.rstrip("/")
        source_uri = fs.unstrip_protocol(root)
        limit = int(self.params.max_file_mb * 1024 * 1024)
        for rel in shard["paths"]:
            key = folder_key(rel)
            identity = rel.split("/", 1)[0] if self.params.labels_from_dirs and "/" in rel else None
            ext = rel.rsplit(".", 1)[1]
            try:
                size = fs.size(f"{root}/{rel}")
                if size is not None and size > limit:
                    raise ImageError(f"file too large: {size} bytes > {limit}")
                data = fs.cat_file(f"{root}/{rel}")
            except ImageError as exc:
                yield _error_row(source_uri, key, rel, identity, ext, str(exc))
                continue
            except Exception as exc:  # any storage error is this file's problem, not the run's
                yield _error_row(
                    source_uri, key, rel, identity, ext, f"unreadable file: {type(exc).__name__}: {exc}"
                )
                continue
            yield _image_row(source_uri, key, rel, identity, ext, data)

    def _read_tar(self, shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
        tar = shard["tar"]
        start, stop = int(shard["start"]), shard["stop"]
        for index, sample in enumerate(self._tar_samples(tar, with_data=True)):
            if index < start:
                continue
            if stop is not None and index >= int(stop):
                return
            yield sample

    def _tar_samples(self, tar: str, with_data: bool) -> Iterator[dict[str, Any]]:
        """One row per WebDataset sample of a tar, error rows included, in tar order."""
        from manifests.shards import iter_tar_members

        try:
            fs, path = self._fs(tar)
            source_uri = fs.unstrip_protocol(path)
            handle = fs.open(path, "rb")
        except Exception as exc:
            yield _error_row(tar, "tar-" + stable_hash(tar, 12), "", None, "", f"unreadable tar: {exc}")
            return
        with handle:
            yield from self._group_members(source_uri, iter_tar_members(handle), with_data)

    def _group_members(
        self, source_uri: str, members: Iterable[Any], with_data: bool
    ) -> Iterator[dict[str, Any]]:
        current: str | None = None
        files: dict[str, tuple[str, bytes]] = {}
        for m in members:
            if m.error is not None or m.key != current:
                if current is not None:
                    yield self._tar_row(source_uri, current, files, with_data)
                current, files = None, {}
            if m.error is not None:
                name = m.name or source_uri
                key = "bad-" + stable_hash([source_uri, name], 12)
                reason = "unsafe member name" if "unsafe member name" in m.error else m.error
                yield _error_row(source_uri, key, m.name, None, "", reason)
                continue
            current = m.key
            files[m.ext.lower()] = (m.name, m.data or b"")
        if current is not None:
            yield self._tar_row(source_uri, current, files, with_data)

    def _tar_row(
        self, source_uri: str, key: str, files: dict[str, tuple[str, bytes]], with_data: bool
    ) -> dict[str, Any]:
        identity = None
        if "json" in files:
            try:
                meta = json.loads(files["json"][1])
                identity = meta.get(IDENTITY_ID) if isinstance(meta, dict) else None
            except (ValueError, UnicodeDecodeError):
                identity = None
        if identity is None and self.params.labels_from_dirs and "/" in key:
            identity = key.split("/", 1)[0]
        safe_key = key if _KEY_RE.match(key) else folder_key(key)
        exts = {e.lower().lstrip(".") for e in self.params.extensions}
        image_ext = next((e for e in sorted(files) if e.rsplit(".", 1)[-1] in exts), None)
        if image_ext is None:
            names = ", ".join(sorted(files))
            return _error_row(
                source_uri, safe_key, key, identity, "", f"no image in sample (members: {names})"
            )
        name, data = files[image_ext]
        if not with_data:
            return {SAMPLE_ID: None}
        return _image_row(source_uri, safe_key, name, identity, image_ext.rsplit(".", 1)[-1], data)


def _base_row(source_uri: str, key: str, source_path: str, identity: str | None, ext: str) -> dict[str, Any]:
    return {
        SAMPLE_ID: stable_hash([source_uri, key], 24),
        KEY: key,
        IDENTITY_ID: identity,
        PARENT_ID: None,
        IMAGE: None,
        IMAGE_EXT: ext.lower() or None,
        "source_uri": source_uri,
        "source_path": source_path,
        "file_bytes": None,
        "width": None,
        "height": None,
    }


def _error_row(
    source_uri: str, key: str, source_path: str, identity: str | None, ext: str, reason: str
) -> dict[str, Any]:
    row = _base_row(source_uri, key, source_path, identity, ext)
    row.update({STATUS: STATUS_ERROR, KEEP: False, REASON: reason})
    return row


def _image_row(
    source_uri: str, key: str, source_path: str, identity: str | None, ext: str, data: bytes
) -> dict[str, Any]:
    row = _base_row(source_uri, key, source_path, identity, ext)
    row["file_bytes"] = len(data)
    try:
        rgb = decode_rgb(data)
    except ImageError as exc:
        row.update({STATUS: STATUS_ERROR, KEEP: False, REASON: str(exc)})
        return row
    row.update(
        {
            IMAGE: data,
            IMAGE_EXT: sniff_ext(data, ext),
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            STATUS: STATUS_OK,
            KEEP: True,
            REASON: None,
        }
    )
    return row


def _to_batch(rows: list[dict[str, Any]]) -> Batch:
    return {col: [r[col] for r in rows] for col in rows[0]}
