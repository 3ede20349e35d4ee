"""The export, end to end: plan per partition, split and label from the per-identity table, write
training shards in parallel, then commit beside the previous export and switch.

Commit protocol: a new export writes everything under ``export/v-<fingerprint>/`` (shards, its
manifest), then the top-level ``manifest.parquet`` and ``README.md`` (the dataset card), and
``export.json`` LAST. ``export.json`` is the commit: until it is replaced, readers (training,
``datasets``, lineage) see the previous export whole; a failed export leaves it untouched. Only
after the switch are older version folders removed.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from manifests.layout import (
    DECISIONS_TABLE,
    EXPORT_CARD,
    EXPORT_CARD_LEGACY,
    EXPORT_DIR,
    EXPORT_DONE,
    EXPORT_MANIFEST,
    EXPORT_VERSION_PREFIX,
    MANIFEST_SUFFIX,
    SAMPLES_TABLE,
    export_version_dir,
)
from manifests.storage import RunStorage
from pipeline.engine.tasks import TaskFailedError, run_tasks, task_options
from pipeline.export.card import dataset_card
from pipeline.export.choose import ChosenPart, choose_range, hash_ranges, merge_drops
from pipeline.export.config import ExportConfig
from pipeline.export.identities import COUNTS_SCHEMA, Selection, select_identities
from pipeline.export.plan import (
    IdentityPlan,
    PartitionPlan,
    SelectionSpec,
    label_identities,
    merge_reasons,
    plan_partition,
    selection_spec,
    writer_ranges,
)
from pipeline.export.shards import write_range
from pipeline.export.splits import LeakReport, assign_units, leak_report, lookalike_pairs
from pipeline.refill import read_summary
from pipeline.summaries import grouping_figures

MAX_LISTED = 10  # look-alike pairs across splits listed by name (flag mode)
LEGACY_DIRS = ("train", "val")  # shard folders of exports written before versioned folders


class ExportFailed(TaskFailedError):
    """The export could not complete; the message names the step and what failed."""


def read_committed(store: RunStorage) -> dict[str, Any] | None:
    if not store.exists(EXPORT_DIR, EXPORT_DONE):
        return None
    try:
        doc = json.loads(store.read_bytes(EXPORT_DIR, EXPORT_DONE))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _gather(calls: list[tuple[Any, tuple[Any, ...]]], opts: dict[str, Any], what: str) -> list[Any]:
    """Run remote calls in parallel through pipeline.engine.tasks (lost or transient failures retried,
    a permanent one ends the export with ExportFailed)."""
    def submit(i: int, _fresh: bool) -> Any:
        fn, args = calls[i]
        return ray.remote(fn).options(**opts).remote(*args)

    return run_tasks(f"export: {what}", len(calls), submit, error=ExportFailed)


def _plan_call(url: str, opts: dict[str, Any], samples: list[tuple[str, ...]], decisions: list[tuple[str, ...]],
               spec: SelectionSpec, out: tuple[str, ...]) -> PartitionPlan:
    return plan_partition(RunStorage(url, opts), samples, decisions, spec, out)


def _choose_call(url: str, opts: dict[str, Any], cand: list[tuple[str, ...]], decisions: pa.Table, lo: float,
                 hi: float, cfg: ExportConfig, out_plan: tuple[str, ...], out_emb: tuple[str, ...] | None
                 ) -> ChosenPart:
    return choose_range(RunStorage(url, opts), cand, decisions, lo, hi, cfg.identities, out_plan, out_emb)


def _lookalike_call(url: str, opts: dict[str, Any], emb: list[tuple[str, ...]], metric: str, cfg: ExportConfig,
                    space: str) -> tuple[list[tuple[str, str, float]], dict[str, Any]]:
    return lookalike_pairs(RunStorage(url, opts), emb, metric, cfg, space)


def _leak_call(url: str, opts: dict[str, Any], emb: list[tuple[str, ...]], splits: dict[str, str], metric: str,
               image_check: int) -> LeakReport:
    return leak_report(RunStorage(url, opts), emb, splits, metric, image_check)


def _write_call(url: str, opts: dict[str, Any], version: str, plan_files: list[tuple[str, ...]],
                identities: pa.Table, split: str, lo: int, hi: int, e: int, spec: SelectionSpec,
                image_format: str | None, part: str) -> dict[str, Any]:
    return write_range(RunStorage(url, opts), version, plan_files, identities, split, lo, hi, e, spec,
                       image_format, part)


def _copy_atomic(store: RunStorage, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
    final = store.path(*dst)
    tmp = posixpath.join(posixpath.dirname(final), f"_tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")
    store.fs.cp_file(store.path(*src), tmp)
    store.move(tmp, final)


def balance_columns(schema: pa.Schema, stages: list[dict[str, Any]]) -> list[str]:
    """String and bool columns of `labels` stages: the attributes of the card's balance tables."""
    labels = [s["id"] for s in stages if s["name"] == "labels"]
    out = []
    for f in schema:
        stage, sep, col = f.name.partition("__")
        if sep and stage in labels and col not in ("status", "keep", "reason", "detail") and (
                pa.types.is_string(f.type) or pa.types.is_boolean(f.type)):
            out.append(f.name)
    return out


def _balance_markdown(counts: Counter[tuple[str, str, str]], max_bins: int = 20) -> str:
    from pipeline.balance import balance_report_from_counts

    return balance_report_from_counts(counts, max_bins)


@dataclass
class ExportPlan:
    """Everything the writers and the card need, decided before any shard is written."""

    spec: SelectionSpec
    plan_files: list[tuple[str, ...]]
    identities: IdentityPlan
    selection: Selection
    stats: dict[str, Any]
    exts: Counter[str]
    splits: dict[str, Any]  # the leak checks: units, look-alikes, cross-split similarities


def plan_export(store: RunStorage, stages: list[dict[str, Any]], cfg: ExportConfig, version: str,
                rows_per_file: int, opts: dict[str, Any]) -> ExportPlan:
    """Select (row decisions, then identities), split with the leak checks: Ray tasks over
    partitions of samples, then over identity-hash ranges; the driver holds one row per identity."""
    spec, plans, cand_files = _plan_partitions(store, stages, cfg, version, rows_per_file, opts)
    counts = [p.identities for p in plans if p.identities is not None and p.identities.num_rows]
    selection = select_identities(pa.concat_tables(counts) if counts else COUNTS_SCHEMA.empty_table(), cfg)
    decided = ray.put(selection.table.select(["identity_id", "rule"]))
    labelled = sum(p.candidates - p.no_identity for p in plans)
    url, storage_options = store.url, store.storage_options
    choose_calls = []
    for k, (lo, hi) in enumerate(hash_ranges(labelled, cfg.rows_per_task)):
        emb_out = (EXPORT_DIR, version, "_emb", f"part-{k:06d}.parquet") if spec.embedding else None
        choose_calls.append((_choose_call, (url, storage_options, cand_files, decided, lo, hi, cfg,
                                            (EXPORT_DIR, version, "_plan", f"part-{k:06d}.parquet"), emb_out)))
    chosen: list[ChosenPart] = _gather(choose_calls, opts, "selection")
    store.remove(EXPORT_DIR, version, "_cand", recursive=True)
    plan_files: list[tuple[str, ...]] = [tuple(c[1][7]) for c in choose_calls]
    emb_files: list[tuple[str, ...]] = [tuple(c[1][8]) for c in choose_calls if c[1][8] is not None]
    kept = pa.concat_tables([c.kept for c in chosen]) if chosen else pa.table(
        {"identity_id": pa.array([], pa.string()), "n": pa.array([], pa.int64()), "strat": pa.array([], pa.string())})
    splits, split_doc = _split(store, chosen, kept, emb_files, cfg, opts)
    store.remove(EXPORT_DIR, version, "_emb", recursive=True)
    ids = label_identities(kept, splits, cfg)
    reasons = [p.reasons for p in plans] + [merge_drops([c.drops for c in chosen], len(stages))]
    stats = {
        "candidates": sum(p.candidates for p in plans),
        "total_samples": sum(p.rows for p in plans),
        "dropped_no_identity": sum(p.no_identity for p in plans),
        "dropped_small_identity": selection.drops.get("identity_too_small", 0),
        "small_identities": selection.dropped_identities.get("identity_too_small", 0),
        "selection": selection.summary(),
        "reasons": merge_reasons(reasons),
    }
    exts: Counter[str] = Counter()
    for p in plans:
        exts.update(p.exts)
    return ExportPlan(spec, plan_files, ids, selection, stats, exts, split_doc)


def _plan_partitions(store: RunStorage, stages: list[dict[str, Any]], cfg: ExportConfig, version: str,
                     rows_per_file: int, opts: dict[str, Any]
                     ) -> tuple[SelectionSpec, list[PartitionPlan], list[tuple[str, ...]]]:
    """The row decisions, one Ray task per group of samples files: each writes its candidates (a
    ``_cand`` file, returned in task order) and returns its (identity, bin) counts."""
    order = [s["id"] for s in stages]
    samples_files = store.list_files(*SAMPLES_TABLE, suffix=MANIFEST_SUFFIX)
    if not samples_files:
        raise ExportFailed(f"export: no {'/'.join(SAMPLES_TABLE)} files: the run's tables were not written")
    with store.fs.open(store.path(*SAMPLES_TABLE, samples_files[0]), "rb") as f:
        schema = pq.read_schema(f)
    spec = selection_spec(cfg, order, balance_columns(schema, stages), schema)
    group = max(1, cfg.rows_per_task // max(rows_per_file, 1))
    decisions = set(store.list_files(*DECISIONS_TABLE, suffix=MANIFEST_SUFFIX))
    plan_calls = []
    for i in range(0, len(samples_files), group):
        names = samples_files[i : i + group]
        plan_calls.append((_plan_call, (
            store.url, store.storage_options, [(*SAMPLES_TABLE, n) for n in names],
            [(*DECISIONS_TABLE, n) for n in names if n in decisions], spec,
            (EXPORT_DIR, version, "_cand", f"part-{i // group:06d}.parquet"))))
    plans: list[PartitionPlan] = _gather(plan_calls, opts, "plan")
    return spec, plans, [tuple(c[1][5]) for c in plan_calls]


def _split(store: RunStorage, chosen: list[ChosenPart], kept: pa.Table, emb_files: list[tuple[str, ...]],
           cfg: ExportConfig, opts: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Each kept identity's split, and the leak checks the card reports. Split units: dedup groups
    always; look-alike identities when ``together``."""
    by_group: dict[str, str] = {}
    links: list[tuple[str, str]] = []
    for part in chosen:
        for g, ident in part.dup_links:
            if g in by_group and by_group[g] != ident:
                links.append((by_group[g], ident))
            by_group.setdefault(g, ident)
    spaces = {c.space for c in chosen if c.space is not None}
    if len(spaces) > 1:
        raise ExportFailed(f"export.splits: more than one embedding space ({sorted(spaces)})")
    split_doc: dict[str, Any] = {"stratify": cfg.splits.stratify, "lookalikes": cfg.splits.lookalikes,
                                 "dedup_links": len(links)}
    pairs: list[tuple[str, str, float]] = []
    space = spaces.pop() if spaces else None
    url, storage_options = store.url, store.storage_options
    if space is not None:
        pairs, fit = _gather([(_lookalike_call, (url, storage_options, emb_files, space[1], cfg, space[0]))], opts,
                             "look-alike")[0]
        split_doc.update({"space": space[0], "metric": space[1], **fit, "lookalike_pairs": len(pairs)})
        if cfg.splits.lookalikes == "together":
            links += [(a, b) for a, b, _ in pairs]
    splits = assign_units(kept, links, cfg.val_fraction, cfg.splits.stratify is not None)
    crossing = [(a, b, sc) for a, b, sc in pairs if splits.get(a) != splits.get(b)]
    split_doc["cross_split_lookalikes"] = len(crossing)
    split_doc["cross_split_examples"] = [{"a": a, "b": b, "score": sc} for a, b, sc in crossing[:MAX_LISTED]]
    if space is not None:
        leaks: LeakReport = _gather([(_leak_call, (url, storage_options, emb_files, splits, space[1],
                                                   cfg.splits.image_check))], opts, "leak check")[0]
        split_doc["max_identity_similarity"] = leaks.max_identity
        split_doc["max_image_similarity"] = leaks.max_image
    return splits, split_doc


def export_task(url: str, storage_options: dict[str, Any], stages: list[dict[str, Any]], cfg: ExportConfig,
                fingerprint: str, cfg_hash: str, rows_per_file: int = 1000, cpus_per_task: float = 0.25
                ) -> dict[str, Any]:
    """Plan, write and commit one export version. Runs inside a Ray task; fans out plan and writer tasks."""
    store = RunStorage(url, storage_options)
    version = export_version_dir(fingerprint)
    committed = read_committed(store) or {}
    if committed.get("version") != version:
        store.remove(EXPORT_DIR, version, recursive=True)  # a failed attempt's leftovers
    task_mem = int(cfg.task_memory_gb * 1024**3)
    opts = task_options(cpus_per_task, task_mem)
    plan = plan_export(store, stages, cfg, version, rows_per_file, opts)
    spec, plan_files, ids, stats = plan.spec, plan.plan_files, plan.identities, plan.stats

    ident_ref = ray.put(ids.table)
    write_calls = []
    for split, lo, hi, e in writer_ranges(ids.per_split, cfg.rows_per_task):
        write_calls.append((_write_call, (url, storage_options, version, plan_files, ident_ref, split, lo, hi, e,
                                          spec, cfg.image_format, f"{split}-{lo:06d}.parquet")))
    written: list[dict[str, Any]] = _gather(write_calls, opts, "shard writer")

    # The version's manifest, streamed part by part (never all rows in memory).
    parts = sorted(w["part"] for w in written if w["part"])
    out_path = store.path(EXPORT_DIR, version, EXPORT_MANIFEST)
    manifest_schema = pa.schema([("sample_id", pa.string()), ("export_key", pa.string()), ("key", pa.string()),
                                 ("identity_id", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                                 ("export_shard", pa.string()), ("src_shard", pa.string())])
    with store.fs.open(out_path, "wb") as f, pq.ParquetWriter(f, manifest_schema, compression="zstd") as w:
        for name in parts:
            with store.fs.open(store.path(EXPORT_DIR, version, "_manifest", name), "rb") as pf:
                w.write_table(pq.read_table(pf).cast(manifest_schema))
    store.remove(EXPORT_DIR, version, "_manifest", recursive=True)
    # The plan's schema names the metadata columns' types for the card: read it before the plan goes.
    meta_types: dict[str, str] = {name: str(_meta_type(store, plan_files, f"meta_{i}"))
                                  for i, name in enumerate(spec.meta_names)}
    store.remove(EXPORT_DIR, version, "_plan", recursive=True)

    splits: dict[str, Any] = {}
    for split in ("train", "val"):
        mine = [s for w in written for s in w["shards"] if s["path"].split("/")[2] == split]
        splits[split] = {"samples": sum(s["samples"] for s in mine), "identities": ids.per_split[split]["identities"],
                         "shards": sorted(s["path"] for s in mine)}
    balance: Counter[tuple[str, str, str]] = Counter()
    for w in written:
        balance.update(w["balance"])
    image_exts: list[str] = [cfg.image_format] if cfg.image_format else sorted(plan.exts) or ["png"]
    labelled = ids.table.sort_by("label")
    class_names = labelled.column("identity_id").to_pylist()
    card = dataset_card(cfg=cfg, version=version, splits=splits, stats=stats, class_names=class_names,
                        image_exts=image_exts, meta_types=meta_types, config_hash=cfg_hash,
                        fingerprint=fingerprint, balance=_balance_markdown(balance), stages=stages,
                        leaks=plan.splits, grouping=grouping_figures(store, [(s["id"], s["name"]) for s in stages]),
                        refill=read_summary(store))
    n_train = ids.per_split["train"]["identities"]
    done = {
        "fingerprint": fingerprint, "config_hash": cfg_hash, "version": version, "splits": splits,
        "labels": {"space": "shared", "classes": len(class_names), "train": [0, n_train],
                   "val": [n_train, len(class_names)]},
        "excluded": {k: v for k, v in stats.items() if k not in ("reasons", "selection")},
        "selection": stats["selection"],
        "leak_check": plan.splits,
    }
    # The switch: everything above is beside the committed export; these three, then the commit.
    _copy_atomic(store, (EXPORT_DIR, version, EXPORT_MANIFEST), (EXPORT_DIR, EXPORT_MANIFEST))
    from pipeline.export.card import with_leakage_gates

    card = with_leakage_gates(card, store, stages)  # the run's leakage summaries, written before the export
    store.write_atomic(card.encode(), EXPORT_DIR, EXPORT_CARD)
    store.write_atomic(card.encode(), EXPORT_DIR, EXPORT_CARD_LEGACY)
    store.write_atomic(json.dumps(done, indent=2, sort_keys=True).encode(), EXPORT_DIR, EXPORT_DONE)
    clean_old_versions(store, version)
    return done


def _meta_type(store: RunStorage, plan_files: list[tuple[str, ...]], column: str) -> pa.DataType:
    with store.fs.open(store.path(*plan_files[0]), "rb") as f:
        return pq.read_schema(f).field(column).type


def clean_old_versions(store: RunStorage, keep: str) -> None:
    for name in store.fs.ls(store.path(EXPORT_DIR), detail=False):
        base = posixpath.basename(name.rstrip("/"))
        if (base.startswith(EXPORT_VERSION_PREFIX) and base != keep) or base in LEGACY_DIRS:
            store.remove_path(name, recursive=True)


def run_export(store: RunStorage, stages: list[dict[str, Any]], cfg: ExportConfig, fingerprint: str,
               cfg_hash: str, rows_per_file: int = 1000) -> tuple[dict[str, Any], bool]:
    """The runner's one call: skip an up-to-date export, else run the export task (declared memory;
    lost or transient failures retried). Raises ExportFailed."""
    done = read_committed(store)
    if done and done.get("fingerprint") == fingerprint:
        return done, False
    opts = task_options(0.25, int(cfg.task_memory_gb * 1024**3))
    result = _gather([(export_task, (store.url, store.storage_options, stages, cfg, fingerprint, cfg_hash,
                                     rows_per_file))], opts, "export")
    return result[0], True


def export_fingerprint_dirs(store: RunStorage) -> list[str]:
    """Version folders present under export/ (for tests and `status`)."""
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(store.path(EXPORT_DIR), detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(EXPORT_VERSION_PREFIX))


__all__ = ["ExportFailed", "export_task", "run_export"]
