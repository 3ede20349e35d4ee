"""``facefoundry whatif``: what an export would keep under other settings, without running it.

A grid of export settings (``--set export.KEY=V1,V2``; the grid is the product of every key's
values) is evaluated on the run's committed ``tables/samples`` only; nothing in the run is written.
Each combination's selection is the export's own: its predicate comes from
``pipeline.export.plan.selection_predicate`` and its identity rules (quotas, minimum, maximum
identities, balance) from ``pipeline.export.identities.select_identities`` on the same (identity,
bin) counts the export's plan builds, so a whatif and the export run with the same settings agree on
every count. The split is not evaluated: it depends on dedup groups and look-alike identities,
measured on embeddings when the export runs.

Why it is fast: the export's predicate is a conjunction. The conditions of every combination
(each stage's status and decision, each threshold bound, each ``where``) are collected once as
*atoms*, and ONE DuckDB pass over the columns they read groups the samples by (identity, which
atoms hold, the rule of each stage that did not keep the sample, the balance label of every
balance column in the grid) with a count and the sum of every ranking score in the grid. That
compact table has at most one row per sample and usually far fewer; every combination is then a
few numpy operations on it (a sample passes when all of the combination's atoms hold; it is dropped
by the first one, in the export's order, that does not) and one (identity, bin) table for the
identity rules.

Memory: the compact table costs about ``COMPACT_ROW_BYTES`` per row plus one bool per row per atom,
and the (identity, bin) counts about 50 bytes per identity and bin per combination (written to a
temporary folder when the run is partitioned, read back one combination at a time). Runs of up to
``ROWS_PER_PARTITION`` samples are done in one pass; larger runs are split into partitions by a
hash of the identity (an identity is never split), one DuckDB pass per partition, so the compact
table is bounded by the partition's size, not the run's. DuckDB itself runs under a memory limit
and spills to a temporary folder beyond it.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from facekit.userconfig import clip, format_errors
from manifests.catalog import Catalog
from manifests.layout import MANIFEST_SUFFIX, SAMPLES_TABLE, TABLES_DONE
from manifests.query_guard import QueryGuard
from manifests.sql import parse_tree, predicate_sql, q
from manifests.storage import RunStorage
from manifests.tables import column_name
from pipeline.config import ConfigError, _split_override, apply_overrides
from pipeline.export.config import ExportConfig
from pipeline.export.identities import COUNTS_SCHEMA, NO_BIN, TOO_SMALL, select_identities
from pipeline.export.plan import rule_of, selection_predicate, where_error

ROWS_PER_PARTITION = 4_000_000
COMPACT_ROW_BYTES = 32  # identity code, count, one rule code per stage (a few), numpy overhead
MAX_COMBINATIONS = 10_000
EXPORT_PREFIX = "export."


class WhatifError(ValueError):
    """A grid that cannot be evaluated (a bad key or value, a run without tables): a user error."""


# ------------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Combination:
    settings: dict[str, str]  # the key as given -> the value's text
    cfg: ExportConfig


def split_values(text: str) -> list[str]:
    """``V1,V2,...`` split at the commas that are outside quotes, parentheses and brackets, so an SQL
    ``where`` (``f(a, b) > 1``, ``x IN ('a', 'b')``) or a YAML list stays one value."""
    out: list[str] = []
    depth = 0
    quote = ""
    start = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def parse_sets(sets: list[str]) -> dict[str, list[str]]:
    """``--set`` items -> key -> values, in the order given. A key given twice adds its values."""
    grid: dict[str, list[str]] = {}
    for item in sets:
        try:
            _, value = _split_override(item)
        except ConfigError as exc:
            raise WhatifError(str(exc)) from None
        key = item[: len(item) - len(value) - 1].strip()
        if not key.startswith(EXPORT_PREFIX) or key == EXPORT_PREFIX:
            raise WhatifError(f"--set {clip(key)}: whatif varies export settings only (export.KEY=V1,V2)")
        values = split_values(value)
        if any(v == "" for v in values) and value.strip() != "":
            raise WhatifError(f"--set {clip(key)}: an empty value in {clip(value)!r}")
        grid.setdefault(key, [])
        grid[key].extend(v for v in values if v not in grid[key])
    return grid


def build_grid(base: dict[str, Any], sets: list[str], stage_ids: list[str], schema: pa.Schema
               ) -> list[Combination]:
    """Every combination of the grid, each validated as the export would validate it (every key and
    value, every threshold's stage, every ``where`` bound against the samples table) before any work.
    Raises WhatifError naming the key."""
    from pipeline.config import PipelineConfig

    grid = parse_sets(sets)
    total = math.prod(len(v) for v in grid.values()) if grid else 1
    if total > MAX_COMBINATIONS:
        raise WhatifError(f"the grid has {total} combinations; at most {MAX_COMBINATIONS} are evaluated")
    # Each value alone first: an error names the one key and value that is wrong.
    for key, values in grid.items():
        for v in values:
            _validate(base, [(key, v)], stage_ids, schema, PipelineConfig)
    out = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid.items()]):
        cfg = _validate(base, list(combo), stage_ids, schema, PipelineConfig)
        out.append(Combination(dict(combo), cfg))
    return out


def _validate(base: dict[str, Any], pairs: list[tuple[str, str]], stage_ids: list[str], schema: pa.Schema,
              model: Any) -> ExportConfig:
    shown = ", ".join(f"{k}={v}" for k, v in pairs) or "the run's export settings"
    if any(k == "export.identities.min_images" for k, _ in pairs):
        # run.yaml holds every setting, the alias too: the grid's identities.min_images replaces it.
        base = {k: v for k, v in base.items() if k != "min_images_per_identity"}
    try:
        raw = apply_overrides({"export": base}, [f"{k}={v}" for k, v in pairs], model)
        cfg = ExportConfig.model_validate(raw["export"])
    except ConfigError as exc:
        raise WhatifError(" ".join(str(exc).split())) from None
    except ValidationError as exc:
        raise WhatifError(f"--set {clip(shown)}: " + " ".join(format_errors(exc, prefix="export").split())) from None
    try:
        selection_predicate(cfg, stage_ids)
    except ValueError as exc:
        raise WhatifError(f"--set {clip(shown)}: {exc}") from None
    problem = where_error(cfg, stage_ids, schema)
    if problem:
        raise WhatifError(f"--set {clip(shown)}: export.where: {problem}")
    return cfg


# ------------------------------------------------------------------------------------------ atoms


def conjuncts(predicate: str) -> list[str]:
    """The top-level ``AND`` terms of the export's predicate, as its own text: each is one condition
    the export applies (``where`` is one parenthesised term)."""
    out: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    n = len(predicate)
    while i < n:
        ch = predicate[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and predicate.startswith(" AND ", i):
            out.append(predicate[start:i].strip())
            start = i + 5
            i += 5
            continue
        i += 1
    out.append(predicate[start:].strip())
    return [c for c in out if c]


def columns_of(exprs: list[str]) -> list[set[str]]:
    """The columns each expression reads, from DuckDB's own parse tree (one parse for all of them)."""
    if not exprs:
        return []
    tree = parse_tree("SELECT " + ", ".join(f"({e})" for e in exprs) + " FROM t")
    if tree is None:
        return [set() for _ in exprs]

    def walk(node: Any, found: set[str]) -> set[str]:
        if isinstance(node, dict):
            if node.get("class") == "COLUMN_REF":
                found.add(".".join(str(n) for n in node.get("column_names", [])))
            for v in node.values():
                walk(v, found)
        elif isinstance(node, list):
            for v in node:
                walk(v, found)
        return found

    return [walk(item, set()) for item in tree["statements"][0]["node"]["select_list"]]


@dataclass(frozen=True)
class Atom:
    sql: str
    kind: str  # error | decision | threshold | where | selection
    stage: str  # the stage whose rows it reads ("export" for where and unknown conditions)
    rule: str  # the rule reported when it drops a sample (error and decision: the stage's own rule)


def label_atom(sql: str, cols: set[str], stage_ids: list[str], where_sql: set[str], thresholds: set[str]) -> Atom:
    """What a condition of the export's predicate is, from the columns it reads."""
    if sql in where_sql:
        return Atom(sql, "where", "export", "where")
    if len(cols) == 1:
        (col,) = cols
        stage, sep, name = col.partition("__")
        if sep and stage in stage_ids:
            if name == "status":
                return Atom(sql, "error", stage, "error")
            if name == "keep":
                return Atom(sql, "decision", stage, "decision")
            if f"{stage}.{name}" in thresholds:
                return Atom(sql, "threshold", stage, f"threshold {stage}.{name}")
    return Atom(sql, "selection", "export", "selection")


@dataclass
class Plan:
    atoms: list[Atom]
    combos: list[list[int]]  # per combination: its atoms, in the export's order
    bins: list[str] = field(default_factory=list)  # balance columns ('stage.column') of the grid
    ranks: list[str] = field(default_factory=list)  # identity ranking scores of the grid
    combo_bin: list[int] = field(default_factory=list)  # per combination: its balance column, or -1
    combo_rank: list[int] = field(default_factory=list)  # per combination: its ranking score, or -1


def atom_plan(combos: list[Combination], stage_ids: list[str]) -> Plan:
    index: dict[str, int] = {}
    where_sql = {predicate_sql(c.cfg.where) for c in combos if c.cfg.where}
    thresholds = {t for c in combos for t in c.cfg.thresholds}
    per_combo = []
    for c in combos:
        mine = []
        for sql in conjuncts(selection_predicate(c.cfg, stage_ids)):
            mine.append(index.setdefault(sql, len(index)))
        per_combo.append(mine)
    terms = list(index)
    atoms = [label_atom(sql, cols, stage_ids, where_sql, thresholds)
             for sql, cols in zip(terms, columns_of(terms), strict=True)]
    bal = [c.cfg.identities.balance.column if c.cfg.identities.balance else None for c in combos]
    rank = [c.cfg.identities.rank.score for c in combos]
    bins = sorted({b for b in bal if b})
    ranks = sorted({r for r in rank if r})
    return Plan(atoms, per_combo, bins, ranks, [bins.index(b) if b else -1 for b in bal],
                [ranks.index(r) if r else -1 for r in rank])


def _column(target: str) -> str:
    stage, _, column = target.partition(".")
    return q(column_name(stage, column))


# ------------------------------------------------------------------------------------------ the pass


def compact_sql(plan: Plan, stage_ids: list[str], partitions: int, part: int) -> str:
    """The one pass: samples grouped by identity, which atoms hold (one bool column each) and, per
    stage with an error or decision atom, the rule of a sample that stage did not keep."""
    cols = [f"coalesce(({a.sql}), false) AS a{i}" for i, a in enumerate(plan.atoms)]
    rule_stages = sorted({a.stage for a in plan.atoms if a.kind in ("error", "decision")}, key=stage_ids.index)
    for s in rule_stages:
        status, keep, reason = (q(f"{s}__{c}") for c in ("status", "keep", "reason"))
        cols.append(f"CASE WHEN coalesce({status} = 'ok' AND {keep}, false) THEN NULL "
                    f"ELSE coalesce({reason}, 'no_row') END AS r_{s}")
    # The balance label and the ranking score as the export's plan reads them (as text, as a number).
    cols += [f"CAST({_column(b)} AS VARCHAR) AS b{j}" for j, b in enumerate(plan.bins)]
    aggs = [f"sum(CAST({_column(r)} AS DOUBLE)) AS rs{j}, count(CAST({_column(r)} AS DOUBLE)) AS rn{j}"
            for j, r in enumerate(plan.ranks)]
    ident = "CASE WHEN identity_id IS NULL OR identity_id = '' THEN NULL ELSE identity_id END"
    where = f" WHERE hash(identity_id) % {partitions} = {part}" if partitions > 1 else ""
    return (f"SELECT {ident} AS identity_id, {', '.join(cols)}, {''.join(a + ', ' for a in aggs)}count(*) AS n "
            f"FROM samples{where} GROUP BY ALL")


@dataclass
class Outcome:
    """One combination's sample-level counts, summed over partitions."""

    total: int = 0
    candidates: int = 0
    no_identity: int = 0
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, rule) -> samples


def evaluate_part(table: pa.Table, plan: Plan, outcomes: list[Outcome]) -> list[pa.Table]:
    """Every combination on one partition's compact table (numpy; no per-row Python). Returns, per
    combination, the partition's (identity, bin) counts in the export's ``COUNTS_SCHEMA``."""
    n = table.column("n").to_numpy().astype(np.int64)
    ids = pc.dictionary_encode(table.column("identity_id")).combine_chunks()
    code = pc.fill_null(ids.indices, -1).to_numpy().astype(np.int64)
    labelled = code >= 0
    names = ids.dictionary
    holds = [table.column(f"a{i}").to_numpy(zero_copy_only=False).astype(bool) for i in range(len(plan.atoms))]
    rules: dict[str, tuple[np.ndarray, list[str]]] = {}
    for s in {a.stage for a in plan.atoms if a.kind in ("error", "decision")}:
        enc = pc.dictionary_encode(table.column(f"r_{s}")).combine_chunks()
        rules[s] = (pc.fill_null(enc.indices, -1).to_numpy().astype(np.int64),
                    [rule_of(r) for r in enc.dictionary.to_pylist()])
    bins: list[tuple[np.ndarray, pa.Array]] = []
    for j in range(len(plan.bins)):
        enc = pc.dictionary_encode(pc.fill_null(table.column(f"b{j}"), NO_BIN)).combine_chunks()
        bins.append((enc.indices.to_numpy().astype(np.int64), enc.dictionary))
    ranks = [(table.column(f"rs{j}").to_numpy(zero_copy_only=False).astype(np.float64),
              table.column(f"rn{j}").to_numpy().astype(np.int64)) for j in range(len(plan.ranks))]
    ranks = [(np.nan_to_num(rs), rn) for rs, rn in ranks]
    total = int(n.sum())
    out_tables = []
    for k, (out, mine) in enumerate(zip(outcomes, plan.combos, strict=True)):
        out.total += total
        remaining = np.ones(len(n), bool)
        for i in mine:  # the first condition, in the export's order, that a sample fails drops it
            fail = remaining & ~holds[i]
            if not fail.any():
                continue
            remaining &= holds[i]
            atom = plan.atoms[i]
            if atom.kind in ("error", "decision"):
                rcodes, rnames = rules[atom.stage]
                per = np.bincount(rcodes[fail] + 1, weights=n[fail], minlength=len(rnames) + 1)
                for code_ in np.flatnonzero(per).tolist():
                    rule = rnames[code_ - 1] if code_ else "(no reason)"
                    out.drops[(atom.stage, f"error: {rule}" if atom.kind == "error" else rule)] += int(per[code_])
            else:
                out.drops[(atom.stage, atom.rule)] += int(n[fail].sum())
        out.candidates += int(n[remaining].sum())
        out.no_identity += int(n[remaining & ~labelled].sum())
        sel = remaining & labelled
        b = plan.combo_bin[k]
        bcode, bnames = bins[b] if b >= 0 else (np.zeros(len(n), np.int64), pa.array([NO_BIN]))
        key = code[sel] * len(bnames) + bcode[sel]
        if len(bnames) == 1:  # no balance column: the identity code is the key, no sort needed
            present = np.bincount(key, minlength=len(names)) > 0
            uniq = np.flatnonzero(present)
            inv = (np.cumsum(present) - 1)[key]
        else:
            uniq, inv = np.unique(key, return_inverse=True)
        r = plan.combo_rank[k]
        rs, rn = ranks[r] if r >= 0 else (np.zeros(len(n)), np.zeros(len(n), np.int64))
        out_tables.append(pa.table({
            "identity_id": names.take(pa.array(uniq // len(bnames))),
            "bin": bnames.take(pa.array(uniq % len(bnames))),
            "n": pa.array(np.bincount(inv, weights=n[sel], minlength=len(uniq)).astype(np.int64)),
            "score_sum": pa.array(np.bincount(inv, weights=rs[sel], minlength=len(uniq))),
            "score_n": pa.array(np.bincount(inv, weights=rn[sel], minlength=len(uniq)).astype(np.int64)),
        }).cast(COUNTS_SCHEMA))
    return out_tables


def finish(combo: Combination, out: Outcome, counts: pa.Table) -> dict[str, Any]:
    """Apply the export's identity rules (the export's own function) to the (identity, bin) counts."""
    selection = select_identities(counts, combo.cfg)
    drops = [{"stage": s, "rule": r, "count": c} for (s, r), c in out.drops.items()]
    if out.no_identity:
        drops.append({"stage": "export", "rule": "no_identity", "count": out.no_identity})
    drops += [{"stage": "export", "rule": r, "count": c} for r, c in selection.drops.items() if c]
    unmet = []
    if selection.balance is not None and not selection.balance.get("met", True):
        unmet.append(f"balance {selection.balance['column']}: short {selection.balance['short']}")
    if selection.short_of_target:
        unmet.append(f"target_images {selection.target_images}: {selection.short_of_target} identities short")
    return {
        "settings": combo.settings,
        "samples": selection.samples,
        "identities": selection.identities,
        "candidates": out.candidates,
        "total_samples": out.total,
        "dropped_no_identity": out.no_identity,
        "dropped_small_identity": selection.drops.get(TOO_SMALL, 0),
        "small_identities": selection.dropped_identities.get(TOO_SMALL, 0),
        "drops": sorted(drops, key=lambda d: (-d["count"], d["stage"], d["rule"])),
        "selection": selection.summary(),
        "unmet": unmet,
    }


MAX_WORKERS = 8
# (identity, bin) rows over all combinations: the identity rules are array operations (about a quarter
# of a microsecond a row), and a spawned process costs seconds to import the package, so a pool pays only
# for grids this large.
PARALLEL_FROM_ROWS = 50_000_000


def _finish_all(combos: list[Combination], outcomes: list[Outcome], counts_of: Any, workers: int
                ) -> list[dict[str, Any]]:
    """``finish`` per combination: the identity rules are the costly part of a very large grid, so they
    may run in ``workers`` processes (spawned: the caller holds DuckDB threads), a bounded
    number of combinations in flight (each process holds one combination's counts at a time)."""
    if workers <= 1:
        return [finish(c, o, counts_of(k)) for k, (c, o) in enumerate(zip(combos, outcomes, strict=True))]
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    results: list[dict[str, Any] | None] = [None] * len(combos)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future[dict[str, Any]], int] = {}
        for k, (c, o) in enumerate(zip(combos, outcomes, strict=True)):
            if len(pending) >= 2 * workers:
                done = next(iter(pending))
                results[pending.pop(done)] = done.result()
            pending[pool.submit(finish, c, o, counts_of(k))] = k
        for fut, k in pending.items():
            results[k] = fut.result()
    return [r for r in results if r is not None]


def samples_rows(store: RunStorage) -> tuple[int, pa.Schema]:
    """Rows of the committed samples table (from the files' footers) and its schema."""
    if not store.exists(*TABLES_DONE):
        raise WhatifError(f"{store.url} has no committed tables/samples (a run that did not finish its tables "
                          "commit): run it again to complete it")
    names = store.list_files(*SAMPLES_TABLE, suffix=MANIFEST_SUFFIX)
    if not names:
        raise WhatifError(f"{store.url} has no tables/samples files")
    rows = 0
    schema: pa.Schema | None = None
    for name in names:
        with store.fs.open(store.path(*SAMPLES_TABLE, name), "rb") as f:
            meta = pq.read_metadata(f)
        rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
    assert schema is not None
    return rows, schema


@dataclass(frozen=True)
class Grid:
    keys: list[str]
    combinations: list[Combination]
    rows: int  # samples in the run's table


def prepare(store: RunStorage, stage_ids: list[str], base_export: dict[str, Any], sets: list[str]) -> Grid:
    """The grid, every combination checked against the run; raises WhatifError before any work."""
    rows, schema = samples_rows(store)
    return Grid(list(parse_sets(sets)), build_grid(base_export, sets, stage_ids, schema), rows)


def whatif(store: RunStorage, stage_ids: list[str], grid: Grid, *, memory_limit: str = "2GB",
           guard: QueryGuard | None = None, rows_per_partition: int = ROWS_PER_PARTITION,
           workers: int | None = None) -> dict[str, Any]:
    """Evaluate the grid; see the module docstring. ``workers``: processes that apply the identity
    rules, one combination at a time each (default: one per CPU when the grid is large enough to
    pay for starting them, else none)."""
    combos = grid.combinations
    plan = atom_plan(combos, stage_ids)
    partitions = max(1, math.ceil(grid.rows / rows_per_partition))
    outcomes = [Outcome() for _ in combos]
    catalog = Catalog(store, stage_ids, memory_limit=memory_limit)
    compact_rows = 0
    kept: list[list[pa.Table]] = [[] for _ in combos]
    with tempfile.TemporaryDirectory(prefix="ff-whatif-") as tmp:
        spilled: list[str] = []
        for part in range(partitions):
            sql = compact_sql(plan, stage_ids, partitions, part)
            with catalog.connect(read_only=True, sql=sql, guard=guard) as con:
                table = con.sql(sql).to_arrow_table()
            compact_rows = max(compact_rows, table.num_rows)
            counts = evaluate_part(table, plan, outcomes)
            del table
            if partitions > 1:  # on disk: read back one combination at a time
                path = os.path.join(tmp, f"part-{part}.parquet")
                pq.write_table(pa.concat_tables([t.append_column("combo", pa.array([k] * t.num_rows, pa.int32()))
                                                 for k, t in enumerate(counts)]), path)
                spilled.append(path)
            else:
                for k, t in enumerate(counts):
                    kept[k].append(t)
            del counts
        def counts_of(k: int) -> pa.Table:
            parts = kept[k] or [pq.read_table(p, filters=[("combo", "=", k)]).drop_columns(["combo"])
                                for p in spilled]
            kept[k] = []
            return pa.concat_tables(parts) if parts else COUNTS_SCHEMA.empty_table()

        size = sum(t.num_rows for ts in kept for t in ts) or grid.rows
        n_workers = workers if workers is not None else (
            min(os.cpu_count() or 1, len(combos), MAX_WORKERS) if size >= PARALLEL_FROM_ROWS else 0)
        results = _finish_all(combos, outcomes, counts_of, n_workers)
    return {
        "run": store.url,
        "keys": grid.keys,
        "combinations": results,
        "evaluation": {"samples": grid.rows, "partitions": partitions, "conditions": len(plan.atoms),
                       "largest_compact_table_rows": compact_rows},
    }
