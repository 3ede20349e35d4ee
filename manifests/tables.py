"""The run's output tables as files: ``tables/samples`` (one row per sample, every stage's columns) and
``tables/decisions`` (one row per sample per stage: status, keep, rule, detail). Their schema and how
one shard's rows are built, with no Ray; ``pipeline.run_tables`` runs this over a run's shards.

Why: the per-stage manifests are the lineage, one schema per stage, and readers that infer one
schema from the first file they see (pandas, pyarrow.dataset, Ray Data, polars, ``datasets``,
DuckDB without ``union_by_name``) silently drop or refuse the others. These tables are written
with ONE schema per table, declared before any fragment is written, so every reader's plainest
call returns every row and every column.

Naming (documented in the README): a stage's columns are ``<stage_id>__<column>`` (two
underscores; letters, digits and ``_`` only, so SQL, pandas attribute access, polars and
``datasets`` features all take them unquoted). Each stage also contributes ``<stage_id>__status``,
``__keep``, ``__reason`` (a rule name) and ``__detail``. A sample derived after a stage ran (a face
crop of an image) carries its parent's row for that stage: joined by sample id, else by parent id,
the rule the engine uses to assemble a stage's input. Vectors are ``FixedSizeList<float32>[d]``.

The final ``keep`` is the truth about a sample: true only if every stage has an ok row for it that
kept it. ``dropped_by`` / ``drop_reason`` / ``drop_detail`` name the first stage that did not (a
sample dropped by a global stage is still ``keep`` in later stages' own rows when that stage does not
prune; the final flag is not).

One file per source shard, built from that shard's fragments only: no process sees the run. Each
file records the stamp (a hash of the stage ids, their fingerprints and the schema) it was built
from, so a resumed or re-run commit rebuilds only files whose inputs changed.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.layout import DECISIONS_TABLE, MANIFEST_SUFFIX, SAMPLES_TABLE, table_file
from manifests.reader import ShardReader, own_or_parent_rows
from manifests.schema import CARRIED
from manifests.sql import glob_escape
from manifests.storage import RunStorage
from manifests.vocabulary import (
    DECISION_COLUMNS,
    DETAIL,
    IMAGE_EXT,
    KEEP,
    OUTPUT_SHARD,
    PARENT_ID,
    REASON,
    SAMPLE_ID,
    STATUS,
    STATUS_OK,
    TAR_CRC32,
    TAR_OFFSET,
    TAR_SIZE,
)

SEP = "__"
STAMP_KEY = b"facefoundry.tables.stamp"
# Columns of a pixel-writing stage's rows that say where the sample's image lies.
PIXEL_COLUMNS = (OUTPUT_SHARD, TAR_OFFSET, TAR_SIZE, TAR_CRC32, IMAGE_EXT)

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("identity_id", pa.string()),
    pa.field("parent_id", pa.string()),
    pa.field("shard", pa.string(), nullable=False),  # the source shard: the unit of work and of this file
    pa.field("keep", pa.bool_(), nullable=False),  # the final decision: every stage ok and kept
    pa.field("dropped_by", pa.string()),  # the first stage that failed or dropped the sample
    pa.field("drop_reason", pa.string()),  # that stage's rule
    pa.field("drop_detail", pa.string()),
    # Where the sample's current pixels lie: the latest pixel-writing stage's tar and byte range.
    pa.field("image_shard", pa.string()),
    pa.field("image_offset", pa.int64()),
    pa.field("image_size", pa.int64()),
    pa.field("image_crc32", pa.int64()),  # CRC-32 of those bytes: a byte-range reader checks its slice
    pa.field("image_ext", pa.string()),
)

DECISIONS_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("stage_index", pa.int32(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("keep", pa.bool_(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])

NO_ROW = "no_row"  # a stage wrote no row for a sample (a parent replaced by its derived samples)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def column_name(stage_id: str, column: str) -> str:
    return f"{stage_id}{SEP}{column}"


@dataclass(frozen=True)
class StageColumns:
    """What the tables need to know about one stage: its id, its own declared fields, whether it
    writes pixels. Small and picklable (built in the driver from the stage instances)."""

    stage_id: str
    fields: tuple[pa.Field, ...]
    writes_pixels: bool


def fixed_size(field: pa.Field, dim: int | None) -> pa.Field:
    """A float list becomes ``FixedSizeList<float32>[dim]`` when its size is known."""
    t = field.type
    if pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type):
        return field.with_type(pa.list_(pa.float32(), t.list_size))
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type) and dim:
        return field.with_type(pa.list_(pa.float32(), dim))
    return field


def samples_schema(stages: list[StageColumns]) -> pa.Schema:
    fields = list(BASE_FIELDS)
    for s in stages:
        fields += [
            pa.field(column_name(s.stage_id, "status"), pa.string()),
            pa.field(column_name(s.stage_id, "keep"), pa.bool_()),
            pa.field(column_name(s.stage_id, "reason"), pa.string()),
            pa.field(column_name(s.stage_id, "detail"), pa.string()),
        ]
        for f in s.fields:
            if not _NAME_RE.match(f.name):
                raise ValueError(f"stage {s.stage_id!r}: column {f.name!r} is not a plain identifier")
            fields.append(pa.field(column_name(s.stage_id, f.name), f.type, nullable=True, metadata=f.metadata))
    return pa.schema(fields)


def stamp(stages: list[StageColumns], fingerprints: dict[str, str], schema: pa.Schema) -> str:
    import hashlib

    doc = json.dumps([[s.stage_id, fingerprints.get(s.stage_id, "")] for s in stages]) + schema.to_string()
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def file_stamp(store: RunStorage, parts: tuple[str, ...]) -> str | None:
    """The stamp a committed table file was built from (its footer only), or None."""
    path = store.path(*parts)
    try:
        with store.fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    value = meta.get(STAMP_KEY)
    return value.decode() if value else None


def _stage_read(s: StageColumns) -> list[str]:
    """The columns of a stage's fragment the tables use."""
    cols = [*CARRIED, *DECISION_COLUMNS, *(f.name for f in s.fields)]
    return cols + list(PIXEL_COLUMNS) if s.writes_pixels else cols


def _universe(frags: list[pa.Table]) -> dict[str, list[Any]]:
    """Every sample id any stage wrote, in stage order then row order (deterministic), with its carried
    columns: the latest stage's non-null value, as the catalog's view."""
    order: dict[str, int] = {}
    out: dict[str, list[Any]] = {c: [] for c in CARRIED}
    for t in frags:
        for row in zip(*(t.column(c).to_pylist() for c in CARRIED), strict=True):
            j = order.get(row[0])
            if j is None:
                order[row[0]] = len(out[SAMPLE_ID])
                for c, v in zip(CARRIED, row, strict=True):
                    out[c].append(v)
                continue
            for c, v in zip(CARRIED[1:], row[1:], strict=True):
                if v is not None:
                    out[c][j] = v
    return out


@dataclass
class _Final:
    """The final decision of each sample, folded over the stages in order: the first stage that did not
    pass it on names the drop; the latest pixel-writing stage's row says where its image lies."""

    n: int

    def __post_init__(self) -> None:
        self.keep: list[bool] = [True] * self.n
        self.by: list[str | None] = [None] * self.n
        self.reason: list[str | None] = [None] * self.n
        self.detail: list[str | None] = [None] * self.n
        self.image: dict[str, list[Any]] = {c: [None] * self.n for c in PIXEL_COLUMNS}

    def fold(self, s: StageColumns, t: pa.Table, rows: list[int | None], reason: list[Any], detail: list[Any]) -> None:
        status = t.column(STATUS).to_pylist()
        kept = t.column(KEEP).to_pylist()
        for j, r in enumerate(rows):
            if not self.keep[j]:
                continue
            if r is None:
                self.keep[j], self.by[j], self.reason[j] = False, s.stage_id, NO_ROW
                self.detail[j] = f"stage {s.stage_id!r} wrote no row for this sample"
            elif status[r] != STATUS_OK or not kept[r]:
                self.keep[j], self.by[j], self.reason[j], self.detail[j] = False, s.stage_id, reason[r], detail[r]
        if not s.writes_pixels:
            return
        offs = t.column(TAR_OFFSET).to_pylist()
        pix = {c: t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows for c in PIXEL_COLUMNS}
        for j, r in enumerate(rows):
            if r is not None and offs[r] is not None:
                for c in PIXEL_COLUMNS:
                    self.image[c][j] = pix[c][r]

    def columns(self) -> dict[str, pa.Array]:
        img = self.image
        return {
            "keep": pa.array(self.keep, pa.bool_()), "dropped_by": pa.array(self.by, pa.string()),
            "drop_reason": pa.array(self.reason, pa.string()), "drop_detail": pa.array(self.detail, pa.string()),
            "image_shard": pa.array(img[OUTPUT_SHARD], pa.string()),
            "image_offset": pa.array(img[TAR_OFFSET], pa.int64()),
            "image_size": pa.array(img[TAR_SIZE], pa.int64()),
            "image_crc32": pa.array(img[TAR_CRC32], pa.int64()),
            "image_ext": pa.array(img[IMAGE_EXT], pa.string()),
        }


def _optional(t: pa.Table, column: str) -> list[Any]:
    return t.column(column).to_pylist() if column in t.column_names else [None] * t.num_rows


def _stage_columns(s: StageColumns, t: pa.Table, idx: pa.Array, schema: pa.Schema) -> dict[str, pa.ChunkedArray]:
    """The stage's decision and own columns, one value per sample of the universe (own or parent row)."""
    out: dict[str, pa.ChunkedArray] = {}
    for c in DECISION_COLUMNS:
        name = column_name(s.stage_id, c)
        src = t.column(c) if c in t.column_names else pa.nulls(t.num_rows, schema.field(name).type)
        out[name] = pc.take(src, idx)
    for f in s.fields:
        name = column_name(s.stage_id, f.name)
        target = schema.field(name).type
        src = t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, target)
        out[name] = _cast(pc.take(src, idx), target, name)
    return out


def build_shard_tables(store: RunStorage, stages: list[StageColumns], shard: str,
                       schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    """The samples rows and decision rows of one source shard, from its committed fragments (each read
    verified, once, by the one reader; a stage's row of a sample by the own-or-parent rule)."""
    reader = ShardReader(store, shard)
    frags = [reader.fragment(s.stage_id, _stage_read(s)) for s in stages]
    ids = _universe(frags)
    n = len(ids[SAMPLE_ID])
    sids, parents = pa.array(ids[SAMPLE_ID], pa.string()), pa.array(ids[PARENT_ID], pa.string())
    final = _Final(n)
    out: dict[str, Any] = {}
    decisions: list[pa.Table] = []
    for index, (s, t) in enumerate(zip(stages, frags, strict=True)):
        idx = own_or_parent_rows(sids, parents, t.column(SAMPLE_ID))
        reason, detail = _optional(t, REASON), _optional(t, DETAIL)
        final.fold(s, t, idx.to_pylist(), reason, detail)
        out.update(_stage_columns(s, t, idx, schema))
        decisions.append(pa.table({
            "sample_id": t.column(SAMPLE_ID),
            "stage": pa.array([s.stage_id] * t.num_rows, pa.string()),
            "stage_index": pa.array([index] * t.num_rows, pa.int32()),
            "shard": pa.array([shard] * t.num_rows, pa.string()),
            "status": t.column(STATUS),
            "keep": t.column(KEEP),
            "reason": pa.array(reason, pa.string()),
            "detail": pa.array(detail, pa.string()),
        }, schema=DECISIONS_SCHEMA))
    base: dict[str, Any] = {c: pa.array(ids[c], pa.string()) for c in CARRIED}
    base["shard"] = pa.array([shard] * n, pa.string())
    base.update(final.columns())
    base.update(out)
    samples = pa.table([base[f.name] for f in schema], schema=schema)
    dec = pa.concat_tables(decisions) if decisions else DECISIONS_SCHEMA.empty_table()
    return samples, dec


def _cast(arr: pa.Array | pa.ChunkedArray, target: pa.DataType, name: str) -> pa.Array | pa.ChunkedArray:
    if arr.type == target:
        return arr
    try:
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeError(f"samples table: column {name!r} ({arr.type}) does not fit {target}: {exc}") from exc


def _parquet_bytes(table: pa.Table, stamp_value: str) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[STAMP_KEY] = stamp_value.encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    return buf.getvalue()


def write_shard_tables(store: RunStorage, stages: list[StageColumns], shard: str, schema: pa.Schema,
                       stamp_value: str) -> dict[str, int]:
    """Build and commit one shard's two table files, unless both already hold this stamp. The
    decisions file is written first and the samples file last: the samples file is the commit."""
    samples_parts, decisions_parts = table_file(SAMPLES_TABLE, shard), table_file(DECISIONS_TABLE, shard)
    if file_stamp(store, samples_parts) == stamp_value and file_stamp(store, decisions_parts) == stamp_value:
        return {"rows": -1, "written": 0}
    samples, decisions = build_shard_tables(store, stages, shard, schema)
    store.write_atomic(_parquet_bytes(decisions, stamp_value), *decisions_parts)
    store.write_atomic(_parquet_bytes(samples, stamp_value), *samples_parts)
    return {"rows": samples.num_rows, "written": 1}


def probe_vector_dims(store: RunStorage, stage: StageColumns, shards: list[str], max_fragments: int = 16
                      ) -> dict[str, int]:
    """Sizes of a stage's variable-length float list columns, from the first non-null value found in
    at most ``max_fragments`` fragments (a stage's embedding size is fixed by its model)."""
    wanted = [f.name for f in stage.fields
              if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))
              and pa.types.is_floating(f.type.value_type)]
    dims: dict[str, int] = {}
    for shard in shards[:max_fragments]:
        if len(dims) == len(wanted):
            break
        t = ShardReader(store, shard).fragment(stage.stage_id, [c for c in wanted if c not in dims])
        for c in t.column_names:
            lengths = pc.drop_null(pc.list_value_length(t.column(c)))
            if len(lengths):
                dims[c] = int(lengths[0].as_py())
    return dims


def resolve_stage_columns(store: RunStorage, stages: list[StageColumns], shards: list[str]) -> list[StageColumns]:
    """Declared fields, with variable float lists given their measured fixed size."""
    out = []
    for s in stages:
        dims = probe_vector_dims(store, s, shards)
        out.append(StageColumns(s.stage_id, tuple(fixed_size(f, dims.get(f.name)) for f in s.fields),
                                s.writes_pixels))
    return out


def table_glob(store: RunStorage, table: tuple[str, ...]) -> str:
    """The glob a reader (DuckDB ``read_parquet``, polars) opens one run table with: every file of
    the table shares one schema, so no ``union_by_name`` is needed."""
    path = glob_escape(store.path(*table)) + "/*" + MANIFEST_SUFFIX
    return path if store.is_local else store.fs.unstrip_protocol(path)
