"""``facefoundry diff RUN_A RUN_B``: what changed between two runs, joined by sample id.

- per stage, the samples whose decision changed (kept, dropped or error in A -> in B), by rule, with
  counts and a few example ids; the final decision (``keep`` of ``tables/samples``) as stage
  ``final``; samples present in one run only;
- score shifts: per numeric column the two samples tables share, over the samples both runs have:
  mean, quantiles and how many values changed;
- export membership: samples in A's export and not B's and the reverse (by split), and samples
  whose split changed.

Everything is aggregated inside DuckDB: one sandboxed, read-only connection that sees the tables of
both runs and nothing else (file access limited to the two run directories, configuration locked),
with a memory limit and a temporary folder to spill to. Python receives counts and at most
``examples`` ids per group, never the rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from duckdb.func import FunctionNullHandling

from manifests.catalog import TEMP_PREFIX, Catalog, sweep_stale_temp
from manifests.commit import COMMITTED_GLOB
from manifests.layout import (
    DECISIONS_TABLE,
    EXPORT_DIR,
    EXPORT_DONE,
    EXPORT_MANIFEST,
    MANIFEST_SUFFIX,
    SAMPLES_TABLE,
    TABLES_DONE,
)
from manifests.query_guard import QueryGuard
from manifests.sql import lit, parquet_source, q, sandbox
from manifests.storage import RunStorage
from manifests.tables import BASE_FIELDS, DECISION_COLUMNS, SEP
from pipeline.export.plan import rule_of

SIDES = ("a", "b")
QUANTILES = (0.1, 0.5, 0.9)
FINAL = "final"


class DiffError(ValueError):
    """Runs that cannot be compared (no tables committed): a user error."""


def _tables(store: RunStorage) -> tuple[list[str], list[str], pa.Schema]:
    if not store.exists(*TABLES_DONE):
        raise DiffError(f"{store.url} has no committed tables (tables/samples, tables/decisions): run it again "
                        "to complete it")
    samples = store.list_files(*SAMPLES_TABLE, suffix=MANIFEST_SUFFIX)
    decisions = store.list_files(*DECISIONS_TABLE, suffix=MANIFEST_SUFFIX)
    if not samples or not decisions:
        raise DiffError(f"{store.url} has no tables/samples or tables/decisions files")
    with store.fs.open(store.path(*SAMPLES_TABLE, samples[0]), "rb") as f:
        schema = pq.read_schema(f)
    return samples, decisions, schema


def _source(catalog: Catalog, parts: tuple[str, ...], names: list[str]) -> str:
    folder = catalog.store.path(*parts)
    return parquet_source(catalog.url(folder), COMMITTED_GLOB, [catalog.url(f"{folder}/{n}") for n in names],
                          local=catalog.store.is_local)


@contextlib.contextmanager
def connect(a: RunStorage, b: RunStorage, *, memory_limit: str = "2GB", guard: QueryGuard | None = None
            ) -> Iterator[tuple[duckdb.DuckDBPyConnection, dict[str, pa.Schema], dict[str, bool]]]:
    """One connection with views ``a_samples``, ``a_decisions``, ``a_export`` (when A has a committed
    export) and the same for ``b_``; sandboxed to the two run directories (see ``Catalog.connect``)."""
    guard = guard or QueryGuard()
    catalogs = {"a": Catalog(a, [], memory_limit=memory_limit), "b": Catalog(b, [], memory_limit=memory_limit)}
    views: list[str] = []
    schemas: dict[str, pa.Schema] = {}
    exports: dict[str, bool] = {}
    for side, cat in catalogs.items():
        samples, decisions, schemas[side] = _tables(cat.store)
        views.append(f"CREATE VIEW {side}_samples AS SELECT * FROM {_source(cat, SAMPLES_TABLE, samples)}")
        views.append(f"CREATE VIEW {side}_decisions AS SELECT * FROM {_source(cat, DECISIONS_TABLE, decisions)}")
        exports[side] = cat.store.exists(EXPORT_DIR, EXPORT_DONE) and cat.store.exists(EXPORT_DIR, EXPORT_MANIFEST)
        if exports[side]:
            path = cat.duck_path(cat.store.path(EXPORT_DIR, EXPORT_MANIFEST))
            views.append(f"CREATE VIEW {side}_export AS SELECT sample_id, split FROM read_parquet({lit(path)})")
    sweep_stale_temp()
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
    try:
        con = duckdb.connect(":memory:")
        try:
            with guard.attached(con.interrupt, functools.partial(shutil.rmtree, tmp, ignore_errors=True)):
                for cat in catalogs.values():
                    if not cat.store.is_local:
                        con.register_filesystem(cat.store.fs)
                con.execute(f"SET temp_directory={lit(os.path.join(tmp, 'spill'))}")
                con.execute(f"SET memory_limit={lit(memory_limit)}")
                # The one rule that names a reason's rule, as the export and the report name it.
                con.create_function("rule_of", rule_of, ["VARCHAR"], "VARCHAR",
                                    null_handling=FunctionNullHandling.SPECIAL)
                for stmt in views:
                    con.execute(stmt)
                sandbox(con, [d for cat in catalogs.values() for d in cat._allowed()])
                yield con, schemas, exports
        finally:
            con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _state(side: str) -> str:
    return (f"CASE WHEN {side}.sample_id IS NULL THEN 'absent' WHEN {side}.status <> 'ok' THEN 'error' "
            f"WHEN {side}.keep THEN 'kept' ELSE 'dropped' END")


def decision_changes(con: duckdb.DuckDBPyConnection, examples: int) -> list[dict[str, Any]]:
    """Per stage: (state in A, state in B, rule) -> count and example ids, for samples whose state or
    rule changed. The rule is B's when B did not keep the sample, else A's."""
    own = ("SELECT sample_id, stage, stage_index, status, keep, "
           "CASE WHEN status = 'ok' AND keep THEN NULL ELSE rule_of(reason) END AS reason FROM {side}_decisions")
    final = ("SELECT sample_id, '" + FINAL + "' AS stage, 1000000 AS stage_index, 'ok' AS status, keep, "
             "CASE WHEN keep THEN NULL ELSE coalesce(dropped_by, '?') || ': ' || rule_of(drop_reason) END AS reason "
             "FROM {side}_samples")
    sql = f"""
    WITH a AS ({own.format(side='a')} UNION ALL {final.format(side='a')}),
         b AS ({own.format(side='b')} UNION ALL {final.format(side='b')}),
         j AS (SELECT coalesce(a.stage, b.stage) AS stage, coalesce(a.stage_index, b.stage_index) AS stage_index,
                      coalesce(a.sample_id, b.sample_id) AS sample_id, {_state('a')} AS sa, {_state('b')} AS sb,
                      a.reason AS ra, b.reason AS rb
               FROM a FULL OUTER JOIN b ON a.sample_id = b.sample_id AND a.stage = b.stage
               WHERE a.sample_id IS NULL OR b.sample_id IS NULL OR a.status IS DISTINCT FROM b.status
                     OR a.keep IS DISTINCT FROM b.keep
                     OR a.reason IS DISTINCT FROM b.reason)
    SELECT stage, min(stage_index) AS stage_index, sa, sb,
           CASE WHEN sb IN ('dropped', 'error') AND sa IN ('dropped', 'error') AND ra IS DISTINCT FROM rb
                THEN ra || ' -> ' || rb
                WHEN sb IN ('dropped', 'error') THEN rb
                WHEN sa IN ('dropped', 'error') THEN ra ELSE '' END AS rule,
           count(*) AS n, min(sample_id, {int(examples)}) AS examples
    FROM j GROUP BY ALL ORDER BY stage_index, stage, n DESC, sa, sb, rule
    """
    out: dict[str, dict[str, Any]] = {}
    for stage, _idx, sa, sb, rule, n, ex in con.execute(sql).fetchall():
        entry = out.setdefault(stage, {"stage": stage, "changed": 0, "changes": []})
        entry["changed"] += int(n)
        entry["changes"].append({"from": sa, "to": sb, "rule": rule, "count": int(n),
                                 "examples": list(ex or [])[:examples]})
    return list(out.values())


def sample_counts(con: duckdb.DuckDBPyConnection, examples: int) -> dict[str, Any]:
    row = con.execute(f"""
        SELECT count(*) FILTER (WHERE a.sample_id IS NOT NULL AND b.sample_id IS NOT NULL),
               count(*) FILTER (WHERE b.sample_id IS NULL), count(*) FILTER (WHERE a.sample_id IS NULL),
               min(a.sample_id, {int(examples)}) FILTER (WHERE b.sample_id IS NULL),
               min(b.sample_id, {int(examples)}) FILTER (WHERE a.sample_id IS NULL)
        FROM (SELECT sample_id FROM a_samples) a FULL OUTER JOIN (SELECT sample_id FROM b_samples) b
             ON a.sample_id = b.sample_id""").fetchone()
    assert row is not None
    return {"common": int(row[0]), "only_a": int(row[1]), "only_b": int(row[2]),
            "only_a_examples": list(row[3] or []), "only_b_examples": list(row[4] or [])}


def score_columns(schemas: dict[str, pa.Schema]) -> list[str]:
    """Numeric stage columns both samples tables hold (``stage__column``; not the decision columns)."""
    base = {f.name for f in BASE_FIELDS}
    b = {f.name: f.type for f in schemas["b"]}
    out = []
    for f in schemas["a"]:
        stage, sep, col = f.name.partition(SEP)
        if (f.name in base or not sep or not stage or col in DECISION_COLUMNS or f.name not in b
                or not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                or not (pa.types.is_integer(b[f.name]) or pa.types.is_floating(b[f.name]))):
            continue
        out.append(f.name)
    return out


def score_shifts(con: duckdb.DuckDBPyConnection, columns: list[str]) -> list[dict[str, Any]]:
    """Per column, over the samples both runs have: mean and quantiles in each, the mean's delta, and
    how many samples' values differ (NULL on one side only counts as a change)."""
    if not columns:
        return []
    qs = "[" + ", ".join(repr(x) for x in QUANTILES) + "]"
    aggs = []
    for i, c in enumerate(columns):
        ca, cb = f"a.{q(c)}", f"b.{q(c)}"
        aggs.append(f"count({ca}) AS n_a{i}, count({cb}) AS n_b{i}, avg({ca}) AS mean_a{i}, avg({cb}) AS mean_b{i}, "
                    f"quantile_cont({ca}, {qs}) AS q_a{i}, quantile_cont({cb}, {qs}) AS q_b{i}, "
                    f"count(*) FILTER (WHERE {ca} IS DISTINCT FROM {cb}) AS changed{i}, "
                    f"avg(abs({ca} - {cb})) AS mad{i}")
    cols = ", ".join(q(c) for c in columns)
    sql = (f"SELECT {', '.join(aggs)} FROM (SELECT sample_id, {cols} FROM a_samples) a "
           f"JOIN (SELECT sample_id, {cols} FROM b_samples) b ON a.sample_id = b.sample_id")
    row = con.execute(sql).fetchone()
    assert row is not None
    out = []
    width = 8
    for i, c in enumerate(columns):
        n_a, n_b, mean_a, mean_b, q_a, q_b, changed, mad = row[i * width:(i + 1) * width]
        if not n_a and not n_b:
            continue
        stage, _, col = c.partition(SEP)
        out.append({"column": f"{stage}.{col}", "n_a": int(n_a), "n_b": int(n_b), "mean_a": _num(mean_a),
                    "mean_b": _num(mean_b),
                    "mean_delta": None if mean_a is None or mean_b is None else float(mean_b) - float(mean_a),
                    "quantiles": [float(x) for x in QUANTILES],
                    "q_a": [_num(x) for x in (q_a or [])], "q_b": [_num(x) for x in (q_b or [])],
                    "changed": int(changed), "mean_abs_change": _num(mad)})
    return out


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def export_changes(con: duckdb.DuckDBPyConnection, exports: dict[str, bool], examples: int) -> dict[str, Any]:
    """Export membership: (split in A, split in B) -> count and examples, for samples whose split
    differs ('-': not in that export)."""
    out: dict[str, Any] = {"a": exports["a"], "b": exports["b"], "changes": []}
    if not exports["a"] or not exports["b"]:
        return out
    sql = f"""
    SELECT coalesce(a.split, '-') AS sa, coalesce(b.split, '-') AS sb, count(*) AS n,
           min(coalesce(a.sample_id, b.sample_id), {int(examples)}) AS examples
    FROM a_export a FULL OUTER JOIN b_export b ON a.sample_id = b.sample_id
    WHERE a.split IS DISTINCT FROM b.split GROUP BY ALL ORDER BY n DESC, sa, sb"""
    for sa, sb, n, ex in con.execute(sql).fetchall():
        out["changes"].append({"from": sa, "to": sb, "count": int(n), "examples": list(ex or [])})
    sizes = con.execute("SELECT (SELECT count(*) FROM a_export), (SELECT count(*) FROM b_export)").fetchone()
    assert sizes is not None
    out["samples_a"], out["samples_b"] = int(sizes[0]), int(sizes[1])
    out["only_a"] = sum(c["count"] for c in out["changes"] if c["to"] == "-")
    out["only_b"] = sum(c["count"] for c in out["changes"] if c["from"] == "-")
    out["split_changed"] = sum(c["count"] for c in out["changes"] if "-" not in (c["from"], c["to"]))
    return out


def diff(a: RunStorage, b: RunStorage, *, examples: int = 3, memory_limit: str = "2GB",
         guard: QueryGuard | None = None) -> dict[str, Any]:
    with connect(a, b, memory_limit=memory_limit, guard=guard) as (con, schemas, exports):
        return {
            "a": a.url,
            "b": b.url,
            "samples": sample_counts(con, examples),
            "stages": decision_changes(con, examples),
            "scores": score_shifts(con, score_columns(schemas)),
            "export": export_changes(con, exports, examples),
        }
