"""Writer tasks: one hash range of one split's training shards each.

A writer reads only its range of the plan fragments (row-group statistics on the hash skip the
rest), joins the per-identity table for split and label, and for each training shard fetches the
images as byte ranges grouped by source tar (one ``cat_ranges`` call per shard: no tar is parsed
or read whole), checks each slice against the CRC-32 its stage committed for it, then writes the
tar with the deterministic writer. It returns shard names and counts; its rows of the export
manifest go to a part file.

A slice that does not match its checksum (a source tar damaged after its commit) is never copied
into an export: its stage's fragment is uncommitted, so that the next ``facefoundry run``
recomputes that shard, and the export fails naming the tar.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from facekit.imaging import decode_rgb, encode_jpeg, encode_png
from manifests.layout import EXPORT_DIR
from manifests.ranges import ByteRange, fetch_ranges
from manifests.shards import UnsafeMemberError, check_key, write_tar
from pipeline.export.plan import SelectionSpec

MANIFEST_COLUMNS = ("sample_id", "export_key", "key", "identity_id", "split", "label", "export_shard", "src_shard")


def read_range_rows(store: Any, plan_files: list[tuple[str, ...]], identities: pa.Table, split: str,
                    lo: int, hi: int, n_shards: int) -> pa.Table:
    """This writer's rows: hash in [lo/E, hi/E), identity in ``split``; with split, label and shard index."""
    eps = 1e-9
    ds = pads.dataset([store.path(*p) for p in plan_files], filesystem=store.fs, format="parquet")
    t = ds.to_table(filter=(pads.field("unit") >= lo / n_shards - eps) & (pads.field("unit") < hi / n_shards + eps))
    idx = pc.min_element_wise(pc.floor(pc.multiply(t.column("unit"), float(n_shards))).cast(pa.int64()),
                              n_shards - 1)
    t = t.append_column("shard_index", idx)
    for name in [c for c in t.column_names if c.startswith("member_") and pa.types.is_struct(t.schema.field(c).type)]:
        # a pixel member's location as plain columns (Arrow's join carries no struct): member_0.tar, ...
        column, kind = t.column(name), t.schema.field(name).type
        t = t.remove_column(t.column_names.index(name))
        for j, part in enumerate(column.flatten()):
            t = t.append_column(f"{name}.{kind.field(j).name}", part)
    t = t.filter(pc.and_(pc.greater_equal(t.column("shard_index"), lo), pc.less(t.column("shard_index"), hi)))
    ids = identities.filter(pc.equal(identities.column("split"), split)).select(["identity_id", "split", "label"])
    t = t.join(ids, "identity_id", join_type="inner")
    return t.sort_by([("shard_index", "ascending"), ("unit", "ascending"), ("sample_id", "ascending")])


def image_range(row: dict[str, Any]) -> ByteRange:
    crc = row.get("src_crc32")
    return ByteRange(row["src_shard"], int(row["src_offset"]), int(row["src_size"]), None if crc is None else int(crc))


def member_range(value: dict[str, Any]) -> ByteRange:
    crc = value.get("crc32")
    return ByteRange(value["tar"], int(value["offset"]), int(value["size"]), None if crc is None else int(crc))


def fetch_images(store: Any, rows: list[dict[str, Any]]) -> list[bytes]:
    """Every row's image bytes (see ``fetch_ranges``)."""
    return fetch_ranges(store, [image_range(r) for r in rows])


def _fetch_members(store: Any, rows: list[dict[str, Any]], count: int) -> list[dict[str, bytes]]:
    """Per extra member, sample id -> bytes: a pixel member (a location) is fetched by byte range and
    checked like the image; a plain binary column is taken as it is."""
    out: list[dict[str, bytes]] = []
    for i in range(count):
        col = f"member_{i}"
        plain = {r["sample_id"]: r[col] for r in rows if isinstance(r.get(col), bytes)}
        located = [r for r in rows if r.get(f"{col}.tar")]
        fetched = fetch_ranges(store, [member_range({k: r[f"{col}.{k}"] for k in ("tar", "offset", "size", "crc32")})
                                       for r in located])
        plain.update({r["sample_id"]: data for r, data in zip(located, fetched, strict=True)})
        out.append(plain)
    return out


def _export_key(row: dict[str, Any], dup: Counter[str]) -> str:
    key = row["key"]
    if key and dup[key] == 1:
        try:
            return check_key(key)
        except UnsafeMemberError:
            pass
    return str(row["sample_id"])


def write_range(store: Any, version: str, plan_files: list[tuple[str, ...]], identities: pa.Table, split: str,
                lo: int, hi: int, n_shards: int, spec: SelectionSpec, image_format: str | None,
                part_name: str) -> dict[str, Any]:
    table = read_range_rows(store, plan_files, identities, split, lo, hi, n_shards)
    width = max(6, len(str(n_shards - 1)))
    shards: list[dict[str, Any]] = []
    manifest_parts: list[pa.Table] = []
    balance: Counter[tuple[str, str, str]] = Counter()
    bal_cols = [f"bal_{i}" for i in range(len(spec.balance_columns))]
    indices = table.column("shard_index").to_pylist()
    bounds: dict[int, list[int]] = {}
    for i, k in enumerate(indices):
        bounds.setdefault(k, [i, i])[1] = i + 1
    for k in sorted(bounds):
        a, b = bounds[k]
        part = table.slice(a, b - a)
        rows = part.to_pylist()
        images = fetch_images(store, rows)
        members = _fetch_members(store, rows, len(spec.member_exts))
        dup = Counter(r["key"] for r in rows if r["key"])
        rel = f"{EXPORT_DIR}/{version}/{split}/shard-{k:0{width}d}.tar"
        samples, keys = [], []
        for r, data in zip(rows, images, strict=True):
            ext = r["src_ext"] or "png"
            if image_format and image_format != ext:
                rgb = decode_rgb(data)
                data, ext = (encode_png(rgb), "png") if image_format == "png" else (encode_jpeg(rgb), "jpg")
            meta = {"sample_id": r["sample_id"], "identity_id": r["identity_id"], "label": int(r["label"]),
                    "split": split, "source_key": r["key"]}
            for i, name in enumerate(spec.meta_names):
                meta[name] = r.get(f"meta_{i}")
            key = _export_key(r, dup)
            keys.append(key)
            record: dict[str, Any] = {"__key__": key, ext: data, "cls": str(int(r["label"])), "json": meta}
            for i, member in enumerate(spec.member_exts):
                value = members[i].get(r["sample_id"])
                if value is not None:
                    record[member] = value
            samples.append(record)
            for name, col in zip(spec.balance_columns, bal_cols, strict=True):
                v = r.get(col)
                balance[(name, "(none)" if v is None else str(v), split)] += 1
        data, _ = write_tar(samples)
        store.write_atomic(data, rel)
        shards.append({"path": rel, "samples": len(samples)})
        manifest_parts.append(pa.table({
            "sample_id": part.column("sample_id"), "export_key": pa.array(keys, pa.string()),
            "key": part.column("key"), "identity_id": part.column("identity_id"),
            "split": pa.array([split] * len(rows), pa.string()), "label": part.column("label"),
            "export_shard": pa.array([rel] * len(rows), pa.string()), "src_shard": part.column("src_shard"),
        }))
    if manifest_parts:
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(manifest_parts), buf, compression="zstd")
        store.write_atomic(buf.getvalue(), EXPORT_DIR, version, "_manifest", part_name)
    return {"shards": shards, "samples": table.num_rows, "balance": dict(balance),
            "part": part_name if manifest_parts else None}
