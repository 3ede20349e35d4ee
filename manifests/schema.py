"""Manifest schemas: the common lineage and decision columns, plus each stage's own columns.

One fragment per stage per shard, one row per sample the stage saw. Columns in VOLATILE differ
between two executions of the same work (who ran it, when, how long) and are the only ones a
resumed run may differ in.
"""

from __future__ import annotations

import pyarrow as pa

from manifests.vocabulary import IDENTITY_ID, KEY, PARENT_ID, SAMPLE_ID

COMMON_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("identity_id", pa.string()),
    pa.field("parent_id", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("stage_name", pa.string(), nullable=False),
    pa.field("stage_version", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("keep", pa.bool_(), nullable=False),
    pa.field("reason", pa.string()),  # a stable rule name
    pa.field("detail", pa.string()),  # that rule's detail for this row
    pa.field("model_name", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string(), nullable=False),
    pa.field("input_shard", pa.string()),
    pa.field("output_shard", pa.string()),
    pa.field("image_ext", pa.string()),
    pa.field("tar_offset", pa.int64()),
    pa.field("tar_size", pa.int64()),
    pa.field("tar_crc32", pa.int64()),  # CRC-32 of the member's bytes: a byte-range reader checks its slice
    pa.field("worker", pa.string()),
    pa.field("processed_at", pa.timestamp("ms", tz="UTC")),
    pa.field("duration_ms", pa.float64()),
)
COMMON_NAMES: frozenset[str] = frozenset(f.name for f in COMMON_FIELDS)
VOLATILE: frozenset[str] = frozenset({"worker", "processed_at", "duration_ms"})
# Columns that describe a sample rather than one stage's view of it: they flow between stages.
CARRIED: tuple[str, ...] = (SAMPLE_ID, KEY, IDENTITY_ID, PARENT_ID)

IDENTITY_FIELDS_BASE: tuple[pa.Field, ...] = (
    pa.field("identity_id", pa.string(), nullable=False),
    pa.field("index", pa.int64(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),
    pa.field("sampler_params", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("max_cosine_to_kept", pa.float32()),
    pa.field("candidates_tried", pa.int64()),
    pa.field("reference_sha256", pa.string()),
)


# A pixel member: an image a stage writes besides its main one (align's larger crop, degrade's degraded
# copy). Its bytes go into the stage's shard tar as ``<key>.<column>.<ext>``; the manifest column holds
# where they lie, so no manifest carries pixels and a reader fetches one member by byte range.
MEMBER_TYPE = pa.struct([
    pa.field("tar", pa.string()),  # the shard tar, relative to the run directory
    pa.field("offset", pa.int64()),
    pa.field("size", pa.int64()),
    pa.field("crc32", pa.int64()),
])
MEMBER_KEY = b"facefoundry.member"


def member_field(name: str, ext: str = "png") -> pa.Field:
    """A stage column whose values are encoded image bytes written as tar members (see MEMBER_TYPE).
    The stage puts bytes in the column; the engine writes them and commits their location."""
    return pa.field(name, MEMBER_TYPE, metadata={MEMBER_KEY: ext.encode()})


def member_ext(f: pa.Field) -> str | None:
    """The tar extension of a pixel-member column, None for any other column."""
    meta = f.metadata or {}
    return meta[MEMBER_KEY].decode() if MEMBER_KEY in meta else None


def identity_schema(dim: int) -> pa.Schema:
    return pa.schema([*IDENTITY_FIELDS_BASE, pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


def manifest_schema(stage_fields: tuple[pa.Field, ...] | list[pa.Field]) -> pa.Schema:
    clash = [f.name for f in stage_fields if f.name in COMMON_NAMES]
    if clash:
        raise ValueError(f"stage columns {clash} clash with common manifest columns")
    return pa.schema([*COMMON_FIELDS, *stage_fields])
