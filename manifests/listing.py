"""A folder source's file listing as a sorted Parquet file in the run directory, written once, streamed.

A corpus of tens of millions of files cannot be a Python list in the driver, nor a JSON plan: the
walk streams relative paths (one directory in memory at a time) into an unsorted Parquet file on
local disk, DuckDB sorts it out of core under a small memory limit, and the sorted file is copied into
the run directory. The plan then holds row ranges of this file, and a worker reads only the row
groups of its range. The listing is frozen: a resumed run reuses it and so cuts the same shards.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from manifests.names import name_text
from manifests.storage import TMP_PREFIX, RunStorage

PATH = "path"
ROW_GROUP = 16_384
_BATCH = 50_000
_SCHEMA = pa.schema([pa.field(PATH, pa.string(), nullable=False)])


def walk_rel_paths(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """Every entry below ``root`` that is not a directory, relative to it, hidden parts skipped, each as
    its recorded text (manifests/names.py: names that are not UTF-8 are escaped, losslessly).

    Locally ``os.walk`` over bytes without following links: names are taken as the bytes they are, and
    a symlink (to a file, a device, a directory, or a loop) is listed as itself and never descended;
    the reader then refuses it with a row.
    """
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        top = os.fsencode(root)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            sub = os.path.relpath(dirpath, top).replace(os.sep.encode(), b"/")
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = [d for d in dirnames if not d.startswith(b".") and d not in links]
            for name in (*filenames, *links):
                if not name.startswith(b"."):
                    yield name_text(name if sub == b"." else sub + b"/" + name)
        return
    for dirpath, dirnames, filenames in fs.walk(root, detail=False, on_error="raise"):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # fsspec's walk honours pruning
        rel_dir = posixpath.relpath(dirpath.rstrip("/"), root) if dirpath.rstrip("/") != root else "."
        if any(part.startswith(".") for part in rel_dir.split("/") if part != "."):
            continue
        for name in filenames:
            if not name.startswith("."):
                yield name_text(name if rel_dir == "." else f"{rel_dir}/{name}")


def write_listing(
    store: RunStorage, parts: tuple[str, ...], paths: Iterator[str], check: Callable[[], None] = lambda: None
) -> int:
    """Sort the paths into ``parts`` of the run directory; returns the number of paths.

    ``check`` runs once the walk is done and before anything is written to the run directory: what it
    raises leaves no listing behind, so the next run walks again rather than reusing a bad one.
    """
    with tempfile.TemporaryDirectory(prefix="ff-listing-") as tmp:
        unsorted, ordered = Path(tmp) / "unsorted.parquet", Path(tmp) / "sorted.parquet"
        with pq.ParquetWriter(unsorted, _SCHEMA) as writer:
            batch: list[str] = []
            for rel in paths:
                batch.append(rel)
                if len(batch) >= _BATCH:
                    writer.write_table(pa.table({PATH: batch}, schema=_SCHEMA))
                    batch = []
            writer.write_table(pa.table({PATH: batch}, schema=_SCHEMA))
        check()
        con = duckdb.connect(config={"memory_limit": "64MB", "threads": 1, "temp_directory": tmp})
        try:
            con.execute(
                f"COPY (SELECT {PATH} FROM read_parquet(?) ORDER BY {PATH}) TO '{ordered}' "
                f"(FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP})",
                [str(unsorted)],
            )
        finally:
            con.close()
        count = pq.ParquetFile(ordered).metadata.num_rows
        final = store.path(*parts)
        folder = posixpath.dirname(final)
        store.fs.makedirs(folder, exist_ok=True)
        staged = posixpath.join(folder, f"{TMP_PREFIX}{posixpath.basename(final)}")
        with open(ordered, "rb") as src, store.fs.open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        store.move(staged, final)
    return count


def listing_size(store: RunStorage, parts: tuple[str, ...]) -> int:
    with store.fs.open(store.path(*parts), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_listing(store: RunStorage, rel_path: str, start: int, stop: int) -> list[str]:
    """Paths ``[start, stop)`` of a listing, reading only the row groups that hold them."""
    with store.fs.open(store.path(rel_path), "rb") as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return []
        table = pf.read_row_groups(groups, columns=[PATH])
    assert first is not None
    return table.column(PATH).slice(start - first, stop - start).to_pylist()
