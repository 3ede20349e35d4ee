"""Every number of the report, as DuckDB aggregations over the catalog's views.

Nothing here reads whole manifests into Python: histograms are binned in SQL, counts are GROUP BYs,
and only a bounded handful of rows (examples for thumbnails) ever comes back as rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import duckdb

from manifests.schema import COMMON_NAMES
from manifests.sql import lit, q
from pipeline.balance import NOT_ATTRIBUTES

EXAMPLES_PER_RULE = 4
MAX_RULES = 40
MAX_SHEETS = 6
SHEET_OTHERS = 5
HIST_BINS = 30
MAX_BINS_PER_ATTRIBUTE = 20
# Stages whose drops are about identity: shown beside the identity's other images.
IDENTITY_STAGES = ("consistency", "separation")


# ``reason`` is a stable rule name when the stage also wrote ``detail``. Older stages wrote free text with
# the numbers inside ("blurry: 10.2 < 20", "yaw -46.0 < -45", "far from centroid (0.28, threshold 0.25)"):
# those group by their leading words, up to the first ':', '(', comparison or number.
RULE_SQL = ("coalesce(CASE WHEN detail IS NULL THEN nullif(trim(regexp_extract(reason, '^[^:(<>=0-9]*[A-Za-z_]', 0)), "
            "'') END, reason, '(no reason)')")


@dataclass
class Histogram:
    stage: str
    column: str
    edges: list[float]
    kept: list[int]
    dropped: list[int]
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.kept) + sum(self.dropped)


def stage_names(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return dict(con.execute("SELECT stage, any_value(stage_name) FROM decisions GROUP BY stage").fetchall())


def numeric_columns(con: duckdb.DuckDBPyConnection, stage: str) -> dict[str, str]:
    """The stage view's numeric columns and their DuckDB types (lists and vectors are not scores)."""
    out = {}
    for name, kind, *_ in con.execute(f"DESCRIBE {q(stage)}").fetchall():
        if kind in {"FLOAT", "DOUBLE", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT"} or kind.startswith(
                "DECIMAL"):
            out[name] = kind
    return out


def histogram(con: duckdb.DuckDBPyConnection, stage: str, column: str, bins: int = HIST_BINS) -> Histogram | None:
    """Counts of a stage's score in equal-width bins, split by that stage's own keep decision."""
    base = (f"SELECT CAST({q(column)} AS DOUBLE) AS x, keep FROM {q(stage)} WHERE status = 'ok' "
            f"AND {q(column)} IS NOT NULL AND isfinite(CAST({q(column)} AS DOUBLE))")
    lo, hi, n = con.execute(f"SELECT min(x), max(x), count(*) FROM ({base})").fetchone() or (None, None, 0)
    if not n or lo is None or hi is None:
        return None
    if hi <= lo:  # one value for every row (a per-stage constant): nothing to see in a histogram
        return None
    width = (hi - lo) / bins
    rows = con.execute(
        f"SELECT least(CAST(floor((x - ?) / ?) AS BIGINT), ?) AS b, keep, count(*) FROM ({base}) GROUP BY ALL",
        [lo, width, bins - 1],
    ).fetchall()
    kept, dropped = [0] * bins, [0] * bins
    for b, keep, count in rows:
        (kept if keep else dropped)[int(b)] += int(count)
    return Histogram(stage, column, [lo + i * width for i in range(bins + 1)], kept, dropped)


def column_constant(con: duckdb.DuckDBPyConnection, stage: str, column: str) -> float | None:
    """A per-row column that holds one value for the whole stage (a fitted threshold)."""
    row = con.execute(f"SELECT min({q(column)}), max({q(column)}) FROM {q(stage)} WHERE status = 'ok'").fetchone()
    if row and row[0] is not None and row[0] == row[1] and math.isfinite(float(row[0])):
        return float(row[0])
    return None


def text_constant(con: duckdb.DuckDBPyConnection, stage: str, column: str) -> str | None:
    """A per-row text column with one value for the whole stage (how its threshold was made), if it has one."""
    if column not in {row[0] for row in con.execute(f"DESCRIBE {q(stage)}").fetchall()}:
        return None
    row = con.execute(f"SELECT min({q(column)}), max({q(column)}) FROM {q(stage)} WHERE status = 'ok'").fetchone()
    return str(row[0]) if row and row[0] is not None and row[0] == row[1] else None


def drops_by_rule(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Per stage and rule: how many samples it dropped or failed, with a few example rows."""
    groups = con.execute(
        f"SELECT stage_index, stage, status, {RULE_SQL} AS rule, count(*) AS n FROM decisions "
        "WHERE status <> 'ok' OR NOT keep GROUP BY ALL ORDER BY n DESC, stage_index LIMIT ?", [MAX_RULES]
    ).fetchall()
    if not groups:
        return []
    examples = con.execute(
        f"SELECT stage, status, rule, sample_id, identity_id, stage_index, why FROM ("
        f"  SELECT stage, status, {RULE_SQL} AS rule, sample_id, identity_id, stage_index, "
        "   coalesce(detail, reason) AS why, "
        f"  row_number() OVER (PARTITION BY stage, status, {RULE_SQL} ORDER BY hash(sample_id)) AS rn "
        "  FROM decisions WHERE status <> 'ok' OR NOT keep) WHERE rn <= ?", [EXAMPLES_PER_RULE]
    ).fetchall()
    by_group: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for stage, status, rule, sid, ident, idx, why in examples:
        by_group.setdefault((stage, status, rule), []).append(
            {"sample_id": sid, "identity_id": ident, "upto": int(idx), "caption": why or ""})
    out = []
    for idx, stage, status, rule, n in sorted(groups, key=lambda g: (g[0], -g[4])):
        out.append({"stage_index": int(idx), "stage": stage, "status": status, "rule": rule, "count": int(n),
                    "examples": by_group.get((stage, status, rule), [])})
    return out


def identity_sheets(con: duckdb.DuckDBPyConnection, names: dict[str, str]) -> list[dict[str, Any]]:
    """Samples dropped by an identity stage, each with a few other images of its identity (kept first)."""
    stages = [sid for sid, name in names.items() if name in IDENTITY_STAGES]
    if not stages:
        return []
    listing = ", ".join(lit(s) for s in stages)
    dropped = con.execute(
        f"SELECT stage, stage_index, sample_id, identity_id, {RULE_SQL} AS rule, coalesce(detail, reason) "
        f"FROM decisions WHERE stage IN ({listing}) AND status = 'ok' AND NOT keep AND identity_id IS NOT NULL "
        "ORDER BY hash(sample_id) LIMIT ?", [MAX_SHEETS]
    ).fetchall()
    sheets = []
    for stage, idx, sid, ident, rule, why in dropped:
        others = con.execute(
            f"SELECT sample_id, keep FROM {q(stage)} WHERE identity_id = ? AND sample_id <> ? "
            "ORDER BY keep DESC, hash(sample_id) LIMIT ?", [ident, sid, SHEET_OTHERS]
        ).fetchall()
        sheets.append({
            "stage": stage, "rule": rule, "caption": why or "", "identity_id": ident,
            "sample": {"sample_id": sid, "upto": int(idx), "caption": "dropped"},
            "others": [{"sample_id": o, "upto": int(idx), "caption": "kept" if k else "dropped too"}
                       for o, k in others],
        })
    return sheets


def pixel_locations(con: duckdb.DuckDBPyConnection,
                    wanted: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
    """For each (sample, stage index): the last pixels written for it (or its parent) up to that stage:
    the image the stage looked at. Only the wanted handful of rows is joined."""
    if not wanted:
        return {}
    values = ", ".join(f"({lit(s)}, {int(i)})" for s, i in sorted(set(wanted)))
    rows = con.execute(
        f"WITH want(want_id, upto) AS (VALUES {values}), "
        "parents AS (SELECT sample_id, max(parent_id) AS parent_id FROM decisions "
        "  WHERE sample_id IN (SELECT want_id FROM want) GROUP BY sample_id), "
        "cand AS (SELECT w.want_id, w.upto, w.want_id AS src FROM want w UNION ALL "
        "  SELECT w.want_id, w.upto, p.parent_id FROM want w JOIN parents p ON p.sample_id = w.want_id "
        "  WHERE p.parent_id IS NOT NULL) "
        "SELECT c.want_id, c.upto, arg_max(struct_pack(shard := d.output_shard, off := d.tar_offset, "
        "  size := d.tar_size, crc := d.tar_crc32, ext := d.image_ext), d.stage_index) "
        "FROM cand c JOIN decisions d ON d.sample_id = c.src AND d.output_shard IS NOT NULL "
        "  AND d.tar_offset IS NOT NULL AND d.stage_index <= c.upto GROUP BY ALL"
    ).fetchall()
    return {(sid, int(upto)): loc for sid, upto, loc in rows}


def kept_examples(con: duckdb.DuckDBPyConnection, export_manifest: str | None, last_index: int,
                  n: int) -> list[dict[str, Any]]:
    if export_manifest:
        rows = con.execute(f"SELECT sample_id, split || ' · ' || identity_id FROM read_parquet({lit(export_manifest)}) "
                           "ORDER BY hash(sample_id) LIMIT ?", [n]).fetchall()
    else:
        rows = con.execute("SELECT sample_id, identity_id FROM decisions WHERE stage_index = ? AND keep "
                           "AND status = 'ok' ORDER BY hash(sample_id) LIMIT ?", [last_index, n]).fetchall()
    return [{"sample_id": s, "upto": last_index, "caption": c or ""} for s, c in rows]


def balance_tables(con: duckdb.DuckDBPyConnection, names: dict[str, str],
                   export_manifest: str | None) -> list[dict[str, Any]]:
    """Per label attribute: counts per bin and split (exported samples) or per final decision."""
    tables = []
    for stage, name in names.items():
        if name != "labels":
            continue
        cols = [(c, k) for c, k, *_ in con.execute(f"DESCRIBE {q(stage)}").fetchall()
                if k in {"VARCHAR", "BOOLEAN"} and c not in NOT_ATTRIBUTES and c not in COMMON_NAMES]
        split = "coalesce(e.split, 'not exported')" if export_manifest else "'all'"
        join = f"LEFT JOIN read_parquet({lit(export_manifest)}) e USING (sample_id)" if export_manifest else ""
        for col, _ in cols:
            distinct = con.execute(f"SELECT count(DISTINCT {q(col)}) FROM {q(stage)}").fetchone()
            if not distinct or not 0 < int(distinct[0]) <= MAX_BINS_PER_ATTRIBUTE:
                continue
            rows = con.execute(
                f"SELECT coalesce(CAST(l.{q(col)} AS VARCHAR), '(none)') AS bin, {split} AS split, count(*) "
                f"FROM {q(stage)} l {join} WHERE l.status = 'ok' GROUP BY ALL ORDER BY bin"
            ).fetchall()
            splits = sorted({r[1] for r in rows}, key=lambda s: (s != "train", s != "val", s))
            cells: dict[str, dict[str, int]] = {}
            for bin_, sp, count in rows:
                cells.setdefault(bin_, {})[sp] = int(count)
            total = sum(sum(v.values()) for v in cells.values()) or 1
            tables.append({
                "attribute": f"{stage}.{col}", "splits": splits,
                "rows": [{"bin": b, "counts": [v.get(s, 0) for s in splits], "share": sum(v.values()) / total}
                         for b, v in sorted(cells.items())],
            })
    return tables

