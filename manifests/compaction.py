"""Compaction: per stage, a copy of its committed manifest fragments sorted by sample_id.

Why: a run has one fragment per shard per stage (tens of thousands); finding one sample in them
means opening every one. Sorted by ``sample_id`` with small row groups, a lookup reads one footer
and one row group per stage (Parquet min/max statistics), and scans read a few large files.

Design (the choice the issue left open):
- The per-shard fragments stay the source of truth. Resume, input assembly and commit verification
  keep working on them; the compacted copy is derived data that can always be rebuilt.
- A compaction is a generation folder ``manifests/<stage>/_compacted/<gen>/`` with the sorted files,
  committed by writing ``_compacted/current.json`` last (an atomic rename locally, a single PUT on
  object stores). The pointer records every fragment it copied with its version token (size and
  modification time or ETag), the per-file ``sample_id`` ranges, the columns and the vector casts.
- Readers use the copy only while its fragment list equals the committed one, token for token;
  otherwise they read the fragments (correct, slower). So a recomputed or added fragment can never
  be shadowed by a stale copy, and ``--force`` / ``--new`` (which remove the stage folder) remove
  the copy with it.
- Resume-safe: the generation name is a hash of the fragment tokens; a killed compaction leaves at
  most an unreferenced generation folder, removed by the next one; a compaction whose pointer is
  already valid returns at once.
- Bounded memory: DuckDB sorts with a memory limit and spills to a local temporary folder; the files
  are streamed to the store, never held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any

import duckdb
import pyarrow.parquet as pq

from manifests.commit import COMMITTED_GLOB, committed_tokens, scan_fragments, stage_totals
from manifests.layout import COMPACTED_DIR, COMPACTED_POINTER, MANIFEST_SUFFIX, MANIFESTS_DIR, compacted_dir
from manifests.sql import array_casts, lit, parquet_source, q, sandbox
from manifests.storage import TMP_PREFIX, RunStorage

# A lineage lookup reads one row group per stage: keep row groups near this many bytes.
ROW_GROUP_BYTES = 4 << 20
MAX_ROW_GROUP_ROWS = 16384
MIN_ROW_GROUP_ROWS = 2048  # DuckDB writes no smaller row groups
ROW_GROUPS_PER_FILE = 64  # files of <= 256 MiB / 1M rows: few footers to read, and the pointer indexes their ranges


def read_pointer(store: RunStorage, stage_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(*compacted_dir(stage_id), COMPACTED_POINTER))
    except (FileNotFoundError, ValueError):
        return None


def valid_compaction(store: RunStorage, stage_id: str, fragments: dict[str, str] | None = None
                     ) -> dict[str, Any] | None:
    """The stage's compaction pointer if it covers exactly the committed fragments, else None."""
    pointer = read_pointer(store, stage_id)
    if pointer is None:
        return None
    frags = committed_tokens(store, stage_id) if fragments is None else fragments
    return pointer if pointer.get("fragments") == frags else None


def _row_group_rows(store: RunStorage, first: str) -> int:
    with store.fs.open(first, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    if meta.num_rows == 0:
        return 65536
    width = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / meta.num_rows
    return int(min(max(ROW_GROUP_BYTES // max(width, 1), MIN_ROW_GROUP_ROWS), MAX_ROW_GROUP_ROWS))


def _put(store: RunStorage, local: str, final: str) -> None:
    """Stream a local file to the store under a temporary name, then move it into place."""
    folder = posixpath.dirname(final)
    store.fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
    store.fs.put_file(local, tmp)
    store.move(tmp, final)


def compact_stages(url: str, stage_ids: list[str], *,
                   storage_options: dict[str, Any] | None = None) -> dict[str, str | None]:
    """Compact several stages in one call (one Ray task for a phase: a task per stage made Ray start a
    worker process per stage at the end of the run). Returns, per stage, why it was not compacted, or
    None. A failure is reported, not raised: the copy is derived data and the catalog reads the
    fragments without it."""
    store = RunStorage(url, storage_options)
    out: dict[str, str | None] = {}
    for sid in stage_ids:
        try:
            compact_stage(store, sid)
            out[sid] = None
        except Exception as exc:  # any failure leaves the fragments, which stay readable
            out[sid] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[-1][:300]}"
    return out


def _sorted_copy(store: RunStorage, source: str, tmp: str, out_dir: str, rg_rows: int, memory_limit: str,
                 threads: int) -> None:
    """DuckDB's out-of-core sort of the fragments by (sample_id, shard) into Parquet parts under
    ``out_dir``, in a connection that may touch nothing but the run and ``tmp``."""
    url = (lambda p: p) if store.is_local else store.fs.unstrip_protocol
    con = duckdb.connect()
    try:
        if not store.is_local:
            con.register_filesystem(store.fs)
        con.execute(f"SET memory_limit={lit(memory_limit)}")
        con.execute(f"SET threads={int(threads)}")
        con.execute(f"SET temp_directory={lit(os.path.join(tmp, 'spill'))}")
        con.execute("SET preserve_insertion_order=true")
        roots = {url(store.root).rstrip("/") + "/", tmp.rstrip("/") + "/"}
        if store.is_local:
            roots.add(os.path.realpath(store.root).rstrip("/") + "/")
            roots.add(os.path.realpath(tmp).rstrip("/") + "/")
        sandbox(con, sorted(roots))
        # Stage columns are cast back to fixed-size arrays on read (the pointer keeps the casts).
        con.execute(
            f"COPY (SELECT * FROM {source} ORDER BY {q('sample_id')}, {q('shard')}) "
            f"TO {lit(out_dir)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {rg_rows}, "
            f"ROW_GROUPS_PER_FILE {ROW_GROUPS_PER_FILE}, FILENAME_PATTERN 'part-{{i}}')"
        )
    finally:
        con.close()


def _upload_parts(store: RunStorage, stage_id: str, gen: str, out_dir: str) -> list[dict[str, Any]]:
    """The sorted parts into the run's generation folder, each with its row count and sample-id range."""
    files = []
    local_files = sorted((n for n in os.listdir(out_dir) if n.endswith(MANIFEST_SUFFIX)),
                         key=lambda n: int(n[len("part-"):-len(MANIFEST_SUFFIX)]))
    for i, name in enumerate(local_files):
        path = os.path.join(out_dir, name)
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.to_arrow_schema().get_field_index("sample_id")
        lo = min(str(meta.row_group(g).column(col).statistics.min) for g in range(meta.num_row_groups))
        hi = max(str(meta.row_group(g).column(col).statistics.max) for g in range(meta.num_row_groups))
        final = f"part-{i:05d}{MANIFEST_SUFFIX}"
        _put(store, path, store.path(*compacted_dir(stage_id), gen, final))
        files.append({"name": final, "rows": meta.num_rows, "min": lo, "max": hi})
    return files


def compact_stage(store: RunStorage | str, stage_id: str, *, storage_options: dict[str, Any] | None = None,
                  memory_limit: str = "1GB", threads: int = 2) -> dict[str, Any] | None:
    """Write (or confirm) the sorted copy of a stage's committed fragments; returns its pointer.

    The runner calls it (as a Ray task: ``store`` may be the run URL) once every shard of the stage
    is committed; calling it again is cheap."""
    if isinstance(store, str):
        store = RunStorage(store, storage_options)
    frags = committed_tokens(store, stage_id)
    if not frags:
        return None
    current = read_pointer(store, stage_id)
    if current is not None and current.get("fragments") == frags:
        return current
    # The shard tars the fragments committed, by size: a reader of the copy lists the tar folder once and
    # falls back to the fragment check when one was truncated or removed since (the copy cannot tell).
    verified = scan_fragments(store, stage_id).fragments
    tars = {posixpath.basename(f.record.tar.path): f.record.tar.size for f in verified if f.record.tar is not None}
    totals = stage_totals(verified)  # what status reports while this copy is valid
    gen = hashlib.sha256(json.dumps(sorted(frags.items())).encode()).hexdigest()[:16]
    rel_dir = [COMPACTED_DIR, gen]
    url = (lambda p: p) if store.is_local else store.fs.unstrip_protocol
    first = store.path(MANIFESTS_DIR, stage_id, next(iter(frags)))
    with store.fs.open(first, "rb") as f:
        schema = pq.read_schema(f)
    casts = array_casts(schema)
    rg_rows = _row_group_rows(store, first)
    folder = store.path(MANIFESTS_DIR, stage_id)
    source = parquet_source(url(folder), COMMITTED_GLOB, [url(posixpath.join(folder, n)) for n in frags],
                            local=store.is_local)
    tmp = tempfile.mkdtemp(prefix="ff-compact-")
    try:
        out_dir = os.path.join(tmp, "out")
        _sorted_copy(store, source, tmp, out_dir, rg_rows, memory_limit, threads)
        files = _upload_parts(store, stage_id, gen, out_dir)
        pointer = {
            "stage": stage_id,
            "generation": gen,
            "dir": rel_dir,
            "fragments": frags,
            "tars": tars,
            "rows": sum(f["rows"] for f in files),
            "files": files,
            "columns": schema.names,
            "casts": casts,
        }
        if totals is not None:
            pointer["stats"] = totals
        store.write_atomic(json.dumps(pointer, indent=1, sort_keys=True).encode(),
                           *compacted_dir(stage_id), COMPACTED_POINTER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_old_generations(store, stage_id, keep={gen, (current or {}).get("generation")})
    return pointer


def _remove_old_generations(store: RunStorage, stage_id: str, keep: set[Any]) -> None:
    """Generations other than the current and the one before it (a reader may still be on that)."""
    folder = store.path(*compacted_dir(stage_id))
    try:
        entries = store.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return
    for e in entries:
        name = posixpath.basename(str(e).rstrip("/"))
        if name != COMPACTED_POINTER and name not in keep and not name.startswith(TMP_PREFIX):
            store.remove_path(e, recursive=True)


def compacted_files_for(pointer: dict[str, Any], sample_ids: list[str]) -> list[str]:
    """The compacted files (relative to the stage folder) whose sample_id range holds any of ids."""
    out = []
    for f in pointer["files"]:
        if any(f["min"] <= s <= f["max"] for s in sample_ids):
            out.append(posixpath.join(*pointer["dir"], f["name"]))
    return out
