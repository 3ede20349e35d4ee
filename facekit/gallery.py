"""Reference galleries of identities a dataset must not contain, read and embedded once.

Three kinds of gallery, all named by a path or fsspec URL:
- ``photos``: a folder of photos (``root/<identity>/<file>``, or flat: the file stem is the identity) or
  WebDataset tars (a glob; the member key's first folder, else the key, is the identity). Each photo is
  one gallery item: its largest face, detected, aligned to the ArcFace template and embedded with the
  detector and embedder the run itself uses, so gallery and samples share one embedding space.
- ``bin``: an insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin...), read by the restricted
  unpickler of training.bin_pairs. Its images are already ArcFace 112 crops, embedded as they are (other
  sizes are detected first). A pair marked same-person is one identity, other images one each.
- ``embeddings``: a Parquet file with an ``embedding`` column (list of floats), an identity column
  (``identity_id``, ``identity``, ``label``), optionally ``item`` and ``embedding_space`` (checked against
  the run's space: a threshold only means something within one space).

The gallery's hash (``sha256``) covers every byte it was built from (a folder: each file's relative path
and content hash), so a cache keyed by it is rebuilt exactly when the gallery changes. Every read is
bounded: files larger than ``max_file_bytes`` are skipped, pixels go through ``decode_rgb``'s limits,
tar member names are checked, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from facekit.geometry import align_to_template, warp
from facekit.imaging import ImageError, decode_rgb
from manifests.names import IMAGE_EXTENSIONS, extension, name_text
from manifests.sql import has_glob

GalleryKind = Literal["photos", "bin", "embeddings"]
LABEL_COLUMNS = ("identity_id", "identity", "label", "labels")
MAX_FILE_BYTES = 64 << 20


@dataclass
class Gallery:
    """Embedded gallery items: one vector, one identity and one item name per row."""

    vectors: np.ndarray  # (n, d) float32; unit rows when the metric is cosine
    identities: list[str]
    items: list[str]
    space: str
    metric: str
    sha256: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> gallery entries that gave no vector


def guess_kind(path: str) -> GalleryKind:
    lower = path.lower().rstrip("/")
    if lower.endswith(".bin"):
        return "bin"
    if lower.endswith((".parquet", ".pq")):
        return "embeddings"
    return "photos"


def _fs(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def _read_bounded(fs: Any, path: str, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than ``limit`` (checked before reading)."""
    size = fs.size(path)
    if size is not None and size > limit:
        return None
    with fs.open(path, "rb") as fh:
        data = fh.read(limit + 1)
    return None if len(data) > limit else data


def _is_tar_source(path: str) -> bool:
    return path.lower().endswith(".tar") or has_glob(posixpath.basename(path))


def photo_files(path: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(full path, path relative to the root) of every visible image file under a folder, sorted; the
    relative path is its recorded text (manifests/names.py), the full path what the filesystem takes."""
    fs, root = _fs(path, storage_options)
    root = root.rstrip("/")
    out = []
    for full in sorted(fs.find(root)):
        rel = posixpath.relpath(full, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if extension(rel) in IMAGE_EXTENSIONS:
            out.append((full, name_text(rel)))
    return out


def tar_files(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    from manifests.storage import expand_user_glob

    fs, pattern = _fs(path, storage_options)
    return expand_user_glob(fs, pattern)


def gallery_sha256(path: str, kind: GalleryKind, storage_options: dict[str, Any] | None = None,
                   max_file_bytes: int = MAX_FILE_BYTES) -> str:
    """A hash of everything the gallery is built from; a folder hashes (relative path, content hash)."""
    fs, _ = _fs(path, storage_options)
    digest = hashlib.sha256()
    if kind == "photos" and not _is_tar_source(path):
        files = photo_files(path, storage_options)
        for full, rel in files:
            data = _read_bounded(fs, full, max_file_bytes)
            content = hashlib.sha256(data).hexdigest() if data is not None else "too-large"
            digest.update(f"{rel}\0{content}\n".encode())
        return digest.hexdigest()
    targets = tar_files(path, storage_options) if kind == "photos" else [_fs(path, storage_options)[1]]
    if not targets:
        raise FileNotFoundError(f"gallery {path}: no files")
    for target in targets:
        with fs.open(target, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(f"\0{name_text(posixpath.basename(target))}\n".encode())
    return digest.hexdigest()


def iter_photos(path: str, storage_options: dict[str, Any] | None = None,
                max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """(item name, identity, bytes or None, why not) per gallery photo, in a deterministic order."""
    from manifests.shards import iter_tar_members

    fs, _ = _fs(path, storage_options)
    if not _is_tar_source(path):
        for full, rel in photo_files(path, storage_options):
            parts = rel.split("/")
            identity = parts[0] if len(parts) > 1 else posixpath.splitext(parts[0])[0]
            data = _read_bounded(fs, full, max_file_bytes)
            yield rel, identity, data, None if data is not None else "file_too_large"
        return
    for tar in tar_files(path, storage_options):
        name = name_text(posixpath.basename(tar))  # item names are recorded text
        with fs.open(tar, "rb") as fh:
            for m in iter_tar_members(fh):
                if m.error is not None:
                    yield f"{name}:{m.name}", "", None, "unreadable_member"
                    continue
                if m.ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                identity = m.key.split("/", 1)[0] if "/" in m.key else m.key
                too_big = m.data is not None and len(m.data) > max_file_bytes
                yield f"{name}:{m.key}.{m.ext}", identity, None if too_big else m.data, (
                    "file_too_large" if too_big else None)


class GalleryEmbedder:
    """The run's detector and embedder applied to gallery images: largest face, ArcFace crop, vector."""

    def __init__(self, detector: Any, embedder: Any) -> None:
        self.detector = detector
        self.embedder = embedder

    def crop(self, data: bytes | None, aligned: bool = False) -> np.ndarray:
        rgb = decode_rgb(data)
        size = int(getattr(self.embedder, "input_size", 112))
        if aligned and rgb.shape[0] == rgb.shape[1]:
            return rgb
        faces = self.detector.detect(rgb)
        if not faces:
            raise ImageError("no face", "no_face")
        face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        return warp(rgb, align_to_template(face.landmarks5).for_size(size), size)

    def embed_all(self, entries: Iterator[tuple[str, str, bytes | None, str | None]], aligned: bool = False,
                  batch: int = 32) -> tuple[list[np.ndarray], list[str], list[str], dict[str, int]]:
        vectors: list[np.ndarray] = []
        identities: list[str] = []
        items: list[str] = []
        skipped: dict[str, int] = {}
        crops: list[np.ndarray] = []
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            if crops:
                vectors.extend(np.asarray(self.embedder.embed(crops), dtype=np.float32))
                items.extend(p[0] for p in pending)
                identities.extend(p[1] for p in pending)
                crops.clear()
                pending.clear()

        for item, identity, data, why in entries:
            if why is not None or data is None:
                skipped[why or "unreadable_image"] = skipped.get(why or "unreadable_image", 0) + 1
                continue
            try:
                crops.append(self.crop(data, aligned))
            except ImageError as exc:
                rule = exc.rule  # no_face, or the decode's own rule (unsupported_mode, corrupt_image...)
                skipped[rule] = skipped.get(rule, 0) + 1
                continue
            pending.append((item, identity))
            if len(crops) >= batch:
                flush()
        flush()
        return vectors, identities, items, skipped


def bin_entries(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, str, bytes, None]]:
    """An insightface pair file as gallery entries: same-person pairs share one identity."""
    from training.bin_pairs import read_pair_file

    pairs = read_pair_file(path, storage_options)
    for i, same in enumerate(pairs.issame):
        a, b = 2 * i, 2 * i + 1
        ida = f"{pairs.name}:pair{i}" if same else f"{pairs.name}:{a}"
        idb = f"{pairs.name}:pair{i}" if same else f"{pairs.name}:{b}"
        yield f"{pairs.name}[{a}]", ida, pairs.images[a], None
        yield f"{pairs.name}[{b}]", idb, pairs.images[b], None


def read_embeddings(path: str, space: str, dim: int, storage_options: dict[str, Any] | None = None,
                    max_file_bytes: int = 4 << 30) -> tuple[np.ndarray, list[str], list[str]]:
    """(vectors, identities, items) of a Parquet gallery; refuses another embedding space or width."""
    import pyarrow.parquet as pq

    fs, target = _fs(path, storage_options)
    data = _read_bounded(fs, target, max_file_bytes)
    if data is None:
        raise ValueError(f"gallery {path}: larger than {max_file_bytes} bytes")
    table = pq.read_table(io.BytesIO(data))
    names = table.column_names
    if "embedding" not in names:
        raise ValueError(f"gallery {path}: no 'embedding' column (columns: {', '.join(names)})")
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    if label is None:
        raise ValueError(f"gallery {path}: no identity column (looked for {', '.join(LABEL_COLUMNS)})")
    if "embedding_space" in names:
        spaces = {s for s in table.column("embedding_space").to_pylist() if s is not None}
        if spaces and spaces != {space}:
            raise ValueError(f"gallery {path}: embeddings in space(s) {sorted(spaces)}, but the run embeds in "
                             f"{space!r}; thresholds are only comparable within one space")
    x = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"gallery {path}: embeddings of shape {x.shape}, the run's embedder gives {dim}-d")
    if not np.isfinite(x).all():
        raise ValueError(f"gallery {path}: embeddings must be finite")
    identities = [str(v) for v in table.column(label).to_pylist()]
    items = ([str(v) for v in table.column("item").to_pylist()] if "item" in names
             else [f"row{i}" for i in range(len(identities))])
    return x, identities, items


def build_gallery(path: str, kind: GalleryKind, sha256: str, detector: Any, embedder: Any,
                  storage_options: dict[str, Any] | None = None,
                  max_file_bytes: int = MAX_FILE_BYTES) -> Gallery:
    """Read and embed a gallery (``detector`` may be None for an ``embeddings`` gallery)."""
    space, metric, dim = str(embedder.space), str(embedder.metric), int(embedder.dim)
    skipped: dict[str, int] = {}
    if kind == "embeddings":
        x, identities, items = read_embeddings(path, space, dim, storage_options)
    else:
        runner = GalleryEmbedder(detector, embedder)
        entries = bin_entries(path, storage_options) if kind == "bin" else iter_photos(
            path, storage_options, max_file_bytes)
        vectors, identities, items, skipped = runner.embed_all(entries, aligned=kind == "bin")
        x = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    if metric == "cosine" and len(x):
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return Gallery(np.ascontiguousarray(x, dtype=np.float32), identities, items, space, metric, sha256, skipped)
