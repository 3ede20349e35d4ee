"""What a training job knows about the export it reads: splits, shard URLs, counts, and its hash.

The hash is the sha256 of ``export.json``'s bytes. A checkpoint stores it, so a model points back
to exactly the data it was trained on (and through the export's lineage, to every sample's seed).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from manifests.sql import glob_escape

EXPORT_MANIFEST = "export.json"


class ExportError(ValueError):
    """The export folder is missing, incomplete or does not have the asked split."""


@dataclass(frozen=True)
class SplitInfo:
    name: str
    shards: tuple[str, ...]  # full URLs or paths, in export order
    samples: int
    identities: int


@dataclass(frozen=True)
class ExportIndex:
    export_dir: str
    manifest: dict[str, Any]
    sha256: str
    storage_options: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint", ""))

    @property
    def run_dir(self) -> str:
        """The run that holds this export (``<run>/export``), where metrics and checkpoints go."""
        return posixpath.dirname(self.export_dir.rstrip("/")) or "."

    @property
    def split_names(self) -> list[str]:
        return sorted(self.manifest.get("splits", {}))

    def split(self, name: str) -> SplitInfo:
        splits = self.manifest.get("splits", {})
        if name not in splits:
            raise ExportError(f"export {self.export_dir} has no split {name!r} (has: {sorted(splits)})")
        info = splits[name]
        shards = tuple(self._shard_url(name, s) for s in info.get("shards", []))
        if not shards:
            shards = tuple(self._glob_shards(name))
        if not shards:
            raise ExportError(f"export {self.export_dir}: split {name!r} lists no shards")
        return SplitInfo(
            name=name,
            shards=shards,
            samples=int(info.get("samples", 0)),
            identities=int(info.get("identities", 0)),
        )

    def lineage(self) -> dict[str, Any]:
        """What a checkpoint records about its data."""
        return {"export_dir": self.export_dir, "export_sha256": self.sha256, "fingerprint": self.fingerprint}

    def _shard_url(self, split: str, entry: Any) -> str:
        """Shard entries may be absolute URLs, or relative to the export folder, the split folder, or the
        run folder (the export sink lists ``export/<split>/shard-*.tar``)."""
        name = entry.get("path", entry.get("url")) if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            raise ExportError(f"export {self.export_dir}: cannot read shard entry {entry!r} of {split!r}")
        if "://" in name or name.startswith("/"):
            return name
        fs, root = fsspec.core.url_to_fs(self.export_dir, **self.storage_options)
        bases = [
            (self.export_dir, root),
            (f"{self.export_dir}/{split}", posixpath.join(root, split)),
            (self.run_dir, posixpath.dirname(root)),
        ]
        for url_base, fs_base in bases:
            if fs.exists(posixpath.join(fs_base, name)):
                return _join(url_base, name)
        raise ExportError(f"export {self.export_dir}: shard {name!r} of split {split!r} is missing")

    def _glob_shards(self, split: str) -> list[str]:
        fs, root = fsspec.core.url_to_fs(self.export_dir, **self.storage_options)
        found = sorted(fs.glob(posixpath.join(glob_escape(root), glob_escape(split), "*.tar")))
        return [_join(self.export_dir, posixpath.relpath(p, root)) for p in found]


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def load_export(path: str, storage_options: dict[str, Any] | None = None) -> ExportIndex:
    """``path`` is a run directory or its ``export`` folder (local path or fsspec URL)."""
    opts = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(path, **opts)
    base = path.rstrip("/")
    if not fs.exists(posixpath.join(root, EXPORT_MANIFEST)) and fs.exists(
        posixpath.join(root, "export", EXPORT_MANIFEST)
    ):
        base, root = base + "/export", posixpath.join(root, "export")
    manifest_path = posixpath.join(root, EXPORT_MANIFEST)
    if not fs.exists(manifest_path):
        raise ExportError(f"no {EXPORT_MANIFEST} under {path} or {path}/export: run the export first")
    data = fs.cat_file(manifest_path)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise ExportError(f"{manifest_path}: expected an object with a 'splits' key")
    return ExportIndex(
        export_dir=base, manifest=manifest, sha256=hashlib.sha256(data).hexdigest(), storage_options=opts
    )
