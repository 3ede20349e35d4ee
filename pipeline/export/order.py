"""The export's one deterministic order: a sample's or identity's place in [0, 1) from a hash of a
tagged id. Splits, shard assignment, identity ranking and image picks all draw from it, each with its
own tag, so a rerun (or a run on another partition count) makes the same choices."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa

SCALE = float(1 << 48)
# Below this many ids a Python loop beats opening a DuckDB connection.
BATCH_IN_SQL_FROM = 2_000


def unit(text: str) -> float:
    """The first 48 bits of the text's SHA-256 as a fraction of 1."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / SCALE


def units(tag: str, ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """``unit(tag + id)`` of every id (no nulls), as float64, in the ids' order. A large batch is hashed
    by DuckDB's ``sha256`` (the same digest of the same UTF-8 bytes, so the same values)."""
    if not isinstance(ids, pa.Array | pa.ChunkedArray):
        ids = pa.array(list(ids), pa.string())
    if len(ids) < BATCH_IN_SQL_FROM:
        return np.array([unit(tag + s) for s in ids.to_pylist()], dtype=np.float64)
    batch = pa.table({"id": ids.cast(pa.string())})  # noqa: F841 (read by name in the query)
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false; SET preserve_insertion_order = true")
        literal = "'" + tag.replace("'", "''") + "'"
        bits = con.sql(f"SELECT ('0x' || substr(sha256({literal} || id), 1, 12))::UBIGINT AS h FROM batch"
                       ).to_arrow_table().column("h")
    return bits.to_numpy().astype(np.float64) / SCALE
