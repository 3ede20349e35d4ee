"""Writer tasks: one hash range of one split's training shards each.

A writer reads only its range of the plan fragments (row-group statistics on the hash skip the
rest), joins the per-identity table for split and label, and for each training shard fetches the
images as byte ranges grouped by source tar (one ``cat_ranges`` call per shard: no tar is parsed
or read whole), then writes the tar with the deterministic writer. It returns shard names and
counts; its rows of the export manifest go to a part file.
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
    t = t.filter(pc.and_(pc.greater_equal(t.column("shard_index"), lo), pc.less(t.column("shard_index"), hi)))
    ids = identities.filter(pc.equal(identities.column("split"), split)).select(["identity_id", "split", "label"])
    t = t.join(ids, "identity_id", join_type="inner")
    return t.sort_by([("shard_index", "ascending"), ("unit", "ascending"), ("sample_id", "ascending")])


def fetch_images(store: Any, rows: list[dict[str, Any]]) -> list[bytes]:
    """Every row's image bytes, read as byte ranges grouped by source tar (sorted by offset; one open
    per tar on a local disk, one concurrent ``cat_ranges`` on object stores), verified by length."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["src_shard"], int(rows[i]["src_offset"])))
    out: list[bytes] = [b""] * len(rows)
    if store.is_local:
        current: str | None = None
        f: Any = None
        try:
            for i in order:
                if rows[i]["src_shard"] != current:
                    if f is not None:
                        f.close()
                    current = rows[i]["src_shard"]
                    f = open(store.path(current), "rb")  # noqa: SIM115 - closed when the tar changes
                f.seek(int(rows[i]["src_offset"]))
                out[i] = f.read(int(rows[i]["src_size"]))
        finally:
            if f is not None:
                f.close()
    elif order:
        paths = [store.path(rows[i]["src_shard"]) for i in order]
        starts = [int(rows[i]["src_offset"]) for i in order]
        ends = [s + int(rows[i]["src_size"]) for s, i in zip(starts, order, strict=True)]
        for i, chunk in zip(order, store.fs.cat_ranges(paths, starts, ends, on_error="raise"), strict=True):
            if isinstance(chunk, BaseException):
                raise chunk
            out[i] = chunk
    for i in order:
        if len(out[i]) != int(rows[i]["src_size"]):
            raise OSError(f"short read of {rows[i]['src_shard']} at {rows[i]['src_offset']}: "
                          f"{len(out[i])} of {rows[i]['src_size']} bytes")
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
                if r.get(f"member_{i}") is not None:
                    record[member] = r[f"member_{i}"]
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
