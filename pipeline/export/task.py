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
from pipeline.export.card import dataset_card
from pipeline.export.config import ExportConfig
from pipeline.export.plan import (
    PartitionPlan,
    SelectionSpec,
    merge_reasons,
    plan_identities,
    plan_partition,
    selection_spec,
    writer_ranges,
)
from pipeline.export.retry import DRIVER_ATTEMPTS, RETRYABLE, remote_options
from pipeline.export.shards import CorruptSourceError, write_range
from pipeline.refill import read_summary

LEGACY_DIRS = ("train", "val")  # shard folders of exports written before versioned folders


class ExportFailed(RuntimeError):
    pass


def read_committed(store: RunStorage) -> dict[str, Any] | None:
    if not store.exists(EXPORT_DIR, EXPORT_DONE):
        return None
    try:
        doc = json.loads(store.read_bytes(EXPORT_DIR, EXPORT_DONE))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _gather(calls: list[tuple[Any, tuple[Any, ...]]], opts: dict[str, Any], what: str) -> list[Any]:
    """Run remote calls in parallel; any Ray failure (task error, worker crash, OOM kill, node death)
    is retried up to DRIVER_ATTEMPTS times beyond Ray's own system retries."""
    results: list[Any] = [None] * len(calls)
    pending = {ray.remote(fn).options(**opts).remote(*args): (i, 1) for i, (fn, args) in enumerate(calls)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ref = done[0]
        i, attempt = pending.pop(ref)
        try:
            results[i] = ray.get(ref)
        except RETRYABLE as exc:
            if isinstance(getattr(exc, "cause", None), ExportFailed | CorruptSourceError):
                attempt = DRIVER_ATTEMPTS  # already retried inside: do not run the whole export again
            if attempt >= DRIVER_ATTEMPTS:
                for other in pending:
                    ray.cancel(other)
                raise ExportFailed(f"export: {what} task {i} failed {attempt} times: "
                                   f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from exc
            fn, args = calls[i]
            pending[ray.remote(fn).options(**opts).remote(*args)] = (i, attempt + 1)
    return results


def _plan_call(url: str, opts: dict[str, Any], samples: list[tuple[str, ...]], decisions: list[tuple[str, ...]],
               spec: SelectionSpec, out: tuple[str, ...]) -> PartitionPlan:
    return plan_partition(RunStorage(url, opts), samples, decisions, spec, out)


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


def export_task(url: str, storage_options: dict[str, Any], stages: list[dict[str, Any]], cfg: ExportConfig,
                fingerprint: str, cfg_hash: str, rows_per_file: int = 1000, cpus_per_task: float = 0.25
                ) -> dict[str, Any]:
    """Plan, write and commit one export version. Runs inside a Ray task; fans out plan and writer tasks."""
    store = RunStorage(url, storage_options)
    order = [s["id"] for s in stages]
    version = export_version_dir(fingerprint)
    committed = read_committed(store) or {}
    if committed.get("version") != version:
        store.remove(EXPORT_DIR, version, recursive=True)  # a failed attempt's leftovers
    samples_files = store.list_files(*SAMPLES_TABLE, suffix=MANIFEST_SUFFIX)
    if not samples_files:
        raise ExportFailed(f"export: no {'/'.join(SAMPLES_TABLE)} files: the run's tables were not written")
    with store.fs.open(store.path(*SAMPLES_TABLE, samples_files[0]), "rb") as f:
        schema = pq.read_schema(f)
    bal_cols = balance_columns(schema, stages)
    spec = selection_spec(cfg, order, bal_cols)
    task_mem = int(cfg.task_memory_gb * 1024**3)
    opts = remote_options(cpus_per_task, task_mem)

    group = max(1, cfg.rows_per_task // max(rows_per_file, 1))
    decisions = set(store.list_files(*DECISIONS_TABLE, suffix=MANIFEST_SUFFIX))
    plan_calls = []
    for i in range(0, len(samples_files), group):
        names = samples_files[i : i + group]
        plan_calls.append((_plan_call, (
            url, storage_options, [(*SAMPLES_TABLE, n) for n in names],
            [(*DECISIONS_TABLE, n) for n in names if n in decisions], spec,
            (EXPORT_DIR, version, "_plan", f"part-{i // group:06d}.parquet"))))
    plans: list[PartitionPlan] = _gather(plan_calls, opts, "plan")
    plan_files: list[tuple[str, ...]] = [tuple(c[1][5]) for c in plan_calls]

    ids = plan_identities([p.identities for p in plans], cfg)
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
    stats = {
        "candidates": sum(p.candidates for p in plans),
        "total_samples": sum(p.rows for p in plans),
        "dropped_no_identity": sum(p.no_identity for p in plans),
        "dropped_small_identity": ids.small_samples,
        "small_identities": ids.small_identities,
        "reasons": merge_reasons([p.reasons for p in plans]),
    }
    exts: Counter[str] = Counter()
    for p in plans:
        exts.update(p.exts)
    image_exts: list[str] = [cfg.image_format] if cfg.image_format else sorted(exts) or ["png"]
    labelled = ids.table.sort_by("label")
    class_names = labelled.column("identity_id").to_pylist()
    card = dataset_card(cfg=cfg, version=version, splits=splits, stats=stats, class_names=class_names,
                        image_exts=image_exts, meta_types=meta_types, config_hash=cfg_hash,
                        fingerprint=fingerprint, balance=_balance_markdown(balance), stages=stages,
                        refill=read_summary(store))
    n_train = ids.per_split["train"]["identities"]
    done = {
        "fingerprint": fingerprint, "config_hash": cfg_hash, "version": version, "splits": splits,
        "labels": {"space": "shared", "classes": len(class_names), "train": [0, n_train],
                   "val": [n_train, len(class_names)]},
        "excluded": {k: v for k, v in stats.items() if k != "reasons"},
    }
    # The switch: everything above is beside the committed export; these three, then the commit.
    _copy_atomic(store, (EXPORT_DIR, version, EXPORT_MANIFEST), (EXPORT_DIR, EXPORT_MANIFEST))
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
    """The runner's one call: skip an up-to-date export, else run the export task (declared memory,
    Ray's system retries, and a few more for any Ray failure). Raises ExportFailed."""
    done = read_committed(store)
    if done and done.get("fingerprint") == fingerprint:
        return done, False
    opts = remote_options(0.25, int(cfg.task_memory_gb * 1024**3))
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
