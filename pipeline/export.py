"""Export sink: a DuckDB selection over the manifests -> WebDataset training shards + a dataset card.

What is exported is a *view*: every stage's status must be ok, and each stage's own keep decision
applies unless the export names thresholds for that stage, which then replace it. Changing a
threshold re-runs only this, never a model stage. Splits are by identity (no identity in two
splits); samples are ordered by a hash of their id so each training shard mixes identities.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from facekit.imaging import decode_rgb, encode_jpeg, encode_png
from manifests.catalog import Catalog
from manifests.layout import EXPORT_DIR, EXPORT_DONE
from manifests.shards import write_tar
from manifests.storage import RunStorage


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None
    max_abs: float | None = None


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    shard_size: int = Field(1000, ge=1, description="samples per training shard")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of identities held out")
    min_images_per_identity: int = Field(2, ge=1)
    thresholds: dict[str, Threshold] = Field(
        default_factory=dict, description="'stage.column': {min, max, max_abs}; replaces that stage's own decision"
    )
    where: str | None = Field(None, description="extra SQL predicate over the samples view")
    ignore_decisions: tuple[str, ...] = Field((), description="stages whose own keep decision is ignored")
    image_format: Literal["png", "jpg"] | None = Field(None, description="None keeps the bytes as they are")
    metadata_columns: tuple[str, ...] = Field(
        (), description="'stage.column' values copied into each sample's .json (e.g. labels.pose_bin)"
    )
    extra_members: dict[str, str] = Field(
        default_factory=dict,
        description="tar extension -> 'stage.column' of bytes written beside the image, e.g. "
        "{'degraded.png': 'degrade.degraded'} for (degraded, clean) enhancement pairs",
    )


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def threshold_predicates(thresholds: dict[str, Threshold], stage_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for target, th in thresholds.items():
        stage, _, column = target.partition(".")
        if stage not in stage_ids or not column:
            raise ValueError(f"export.thresholds: {target!r} must be 'stage.column' with a stage of this run "
                             f"({', '.join(stage_ids)})")
        ref = f"{_q(stage)}.{_q(column)}"
        preds = out.setdefault(stage, [])
        if th.min is not None:
            preds.append(f"{ref} >= {th.min!r}")
        if th.max is not None:
            preds.append(f"{ref} <= {th.max!r}")
        if th.max_abs is not None:
            preds.append(f"abs({ref}) <= {th.max_abs!r}")
    return out


def selection_sql(cfg: ExportConfig, stage_ids: list[str], pixel_stage: str) -> str:
    overridden = threshold_predicates(cfg.thresholds, stage_ids)
    conds = [f"{_q(s)}.status = 'ok'" for s in stage_ids]
    for s in stage_ids:
        if s in overridden:
            conds.extend(overridden[s])
        elif s not in cfg.ignore_decisions:
            conds.append(f"{_q(s)}.keep")
    if cfg.where:
        conds.append(f"({cfg.where})")
    extra = ""
    for i, target in enumerate(cfg.metadata_columns):
        stage, _, column = target.partition(".")
        extra += f", {_q(stage)}.{_q(column)} AS meta_{i}"
    for i, target in enumerate(cfg.extra_members.values()):
        stage, _, column = target.partition(".")
        extra += f", {_q(stage)}.{_q(column)} AS member_{i}"
    p = _q(pixel_stage)
    return (
        f"SELECT sample_id, key, identity_id, {p}.output_shard AS src_shard, {p}.tar_offset AS src_offset, "
        f"{p}.tar_size AS src_size, {p}.image_ext AS src_ext{extra} FROM samples WHERE "
        + " AND ".join(conds)
    )


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def assign_splits(identities: list[str], val_fraction: float) -> dict[str, str]:
    """Exact, deterministic: the round(f * n) identities with the smallest hash are validation."""
    ranked = sorted(identities, key=lambda i: (_unit("split:" + i), i))
    n_val = round(val_fraction * len(ranked)) if len(ranked) > 1 else 0
    if val_fraction > 0 and n_val == 0 and len(ranked) > 1:
        n_val = 1
    return {ident: ("val" if r < n_val else "train") for r, ident in enumerate(ranked)}


def plan_export(store: RunStorage, stage_ids: list[str], pixel_stage: str, cfg: ExportConfig
                ) -> tuple[pa.Table, dict[str, Any]]:
    """The selected samples with split, label, export key and target shard; plus counts for the card."""
    catalog = Catalog(store, stage_ids)
    with catalog.connect(read_only=True) as con:
        selected = con.sql(selection_sql(cfg, stage_ids, pixel_stage)).to_arrow_table()
        reasons = con.execute(
            "SELECT stage, status, reason, count(*) AS n FROM decisions WHERE status <> 'ok' OR NOT keep "
            "GROUP BY ALL ORDER BY stage, n DESC"
        ).fetchall()
        total = con.execute("SELECT count(DISTINCT sample_id) FROM decisions").fetchall()[0]
    rows = selected.to_pylist()
    no_identity = sum(1 for r in rows if not r["identity_id"])
    per_ident = Counter(r["identity_id"] for r in rows if r["identity_id"])
    small = {i for i, n in per_ident.items() if n < cfg.min_images_per_identity}
    rows = [r for r in rows if r["identity_id"] and r["identity_id"] not in small]
    splits = assign_splits(sorted({r["identity_id"] for r in rows}), cfg.val_fraction)
    labels: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        idents = sorted(i for i, s in splits.items() if s == split)
        labels[split] = {ident: n for n, ident in enumerate(idents)}
    key_counts = Counter(r["key"] for r in rows)
    for r in rows:
        r["split"] = splits[r["identity_id"]]
        r["label"] = labels[r["split"]][r["identity_id"]]
        r["export_key"] = r["key"] if key_counts[r["key"]] == 1 and r["key"] else r["sample_id"]
    rows.sort(key=lambda r: (r["split"], _unit("order:" + r["sample_id"]), r["sample_id"]))
    counters: Counter[str] = Counter()
    for r in rows:
        n = counters[r["split"]]
        r["export_shard"] = f"{EXPORT_DIR}/{r['split']}/shard-{n // cfg.shard_size:06d}.tar"
        counters[r["split"]] += 1
    stats = {
        "candidates": selected.num_rows,
        "total_samples": int(total[0]) if total else 0,
        "dropped_no_identity": no_identity,
        "dropped_small_identity": sum(per_ident[i] for i in small),
        "small_identities": len(small),
        "reasons": [{"stage": s, "status": st, "reason": r, "count": n} for s, st, r, n in reasons],
    }
    return pa.Table.from_pylist(rows) if rows else pa.table({"sample_id": pa.array([], pa.string())}), stats


def balance_section(store: RunStorage, stage_ids: list[str], selected: pa.Table) -> str:
    """Counts per attribute bin per split for the exported samples, from every `labels` stage."""
    from manifests.schema import COMMON_NAMES
    from pipeline.balance import balance_report

    if "split" not in selected.column_names or selected.num_rows == 0:
        return ""
    catalog = Catalog(store, stage_ids)
    parts = []
    with catalog.connect(read_only=True) as con:
        kinds = dict(con.execute("SELECT DISTINCT stage, stage_name FROM decisions").fetchall())
        for sid in stage_ids:
            if kinds.get(sid) != "labels":
                continue
            rows = con.sql(f"SELECT * FROM {_q(sid)}").to_arrow_table()
            own = [c for c in rows.column_names if c not in COMMON_NAMES]
            joined = selected.select(["sample_id", "split"]).join(rows.select(["sample_id", *own]), "sample_id")
            if own:
                parts.append(balance_report(joined.select(["split", *own])))
    return "\n".join(p for p in parts if p)


def write_export_shard(store: RunStorage, shard_path: str, rows: list[dict[str, Any]],
                       image_format: str | None, meta_names: list[str], member_exts: list[str] | None = None) -> int:
    samples = []
    for r in rows:
        data = store.read_range(r["src_shard"], int(r["src_offset"]), int(r["src_size"]))
        ext = r["src_ext"] or "png"
        if image_format and image_format != ext:
            rgb = decode_rgb(data)
            data, ext = (encode_png(rgb), "png") if image_format == "png" else (encode_jpeg(rgb), "jpg")
        meta = {"sample_id": r["sample_id"], "identity_id": r["identity_id"], "label": r["label"],
                "split": r["split"], "source_key": r["key"]}
        for i, name in enumerate(meta_names):
            meta[name] = r.get(f"meta_{i}")
        record = {"__key__": r["export_key"], ext: data, "cls": str(r["label"]), "json": meta}
        for i, member in enumerate(member_exts or []):
            if r.get(f"member_{i}") is not None:
                record[member] = r[f"member_{i}"]
        samples.append(record)
    data, _ = write_tar(samples)
    store.write_atomic(data, shard_path)
    return len(samples)


def write_manifest_and_card(store: RunStorage, table: pa.Table, stats: dict[str, Any], fingerprint: str,
                            cfg: ExportConfig, config_hash: str, balance: str = "") -> dict[str, Any]:
    rows = table.to_pylist() if "split" in table.column_names else []
    splits: dict[str, Any] = {}
    for split in ("train", "val"):
        mine = [r for r in rows if r["split"] == split]
        splits[split] = {
            "samples": len(mine),
            "identities": len({r["identity_id"] for r in mine}),
            "shards": sorted({r["export_shard"] for r in mine}),
        }
    keep_cols = [c for c in ("sample_id", "export_key", "key", "identity_id", "split", "label", "export_shard",
                             "src_shard") if c in table.column_names]
    buf = io.BytesIO()
    pq.write_table(table.select(keep_cols) if rows else table, buf)
    store.write_atomic(buf.getvalue(), EXPORT_DIR, "manifest.parquet")
    card = dataset_card(splits, stats, cfg, config_hash, fingerprint, balance)
    store.write_atomic(card.encode(), EXPORT_DIR, "dataset_card.md")
    done = {"fingerprint": fingerprint, "config_hash": config_hash, "splits": splits,
            "excluded": {k: v for k, v in stats.items() if k != "reasons"}}
    store.write_atomic(json.dumps(done, indent=2, sort_keys=True).encode(), EXPORT_DIR, EXPORT_DONE)
    return done


def dataset_card(splits: dict[str, Any], stats: dict[str, Any], cfg: ExportConfig, config_hash: str,
                 fingerprint: str, balance: str) -> str:
    lines = [
        "# Dataset card", "",
        f"- config hash: `{config_hash}`",
        f"- export fingerprint: `{fingerprint}`",
        f"- samples seen by the run: {stats['total_samples']}",
        f"- selected by the decisions view: {stats['candidates']}",
        f"- excluded for lack of an identity label: {stats['dropped_no_identity']}",
        f"- excluded with identities under {cfg.min_images_per_identity} images: "
        f"{stats['dropped_small_identity']} samples of {stats['small_identities']} identities", "",
        "## Splits (by identity)", "", "| split | samples | identities | shards |", "|---|---|---|---|",
    ]
    for split, s in splits.items():
        lines.append(f"| {split} | {s['samples']} | {s['identities']} | {len(s['shards'])} |")
    lines += ["", "## Drops and errors per stage", "", "| stage | status | reason | samples |", "|---|---|---|---|"]
    for r in stats["reasons"]:
        lines.append(f"| {r['stage']} | {r['status']} | {r['reason']} | {r['count']} |")
    if cfg.thresholds or cfg.where:
        lines += ["", "## Export thresholds", ""]
        lines += [f"- `{k}`: {v.model_dump(exclude_none=True)}" for k, v in cfg.thresholds.items()]
        if cfg.where:
            lines.append(f"- where: `{cfg.where}`")
    if balance:
        lines += ["", "## Balance", "", balance]
    return "\n".join(lines) + "\n"
