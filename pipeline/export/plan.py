"""Export planning, per partition: which samples, which split, which label, which training shard.

Why per partition: at 50M samples no process may hold the exported rows. Each first-pass task runs
the selection (a sandboxed DuckDB query with projection) over a few files of ``tables/samples``,
writes the candidates to a fragment sorted by a hash of the identity id, and returns only (identity,
label bin) counts and drop counts by rule. The driver decides every identity from those counts
(``pipeline.export.identities``: one row per identity); second-pass tasks (``pipeline.export.choose``)
read whole identities by hash range, choose their images and write the plan fragments sorted by a
hash of the sample id; the split (``pipeline.export.splits``) labels identities; writer tasks then
read their hash range of the plan fragments.

Splits are by identity (no identity in two splits; see ``splits`` for units and strata). Labels
share ONE space across splits: training identities get 0..T-1 (sorted by id, so a classifier head
has T classes), validation identities T..T+V-1; every sample's json
also carries its identity_id. A sample's training shard is floor(u * E), u its hash in [0, 1) and E
the split's shard count, so shards mix identities and hold about ``shard_size`` samples each.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from facekit.userconfig import shown
from manifests.sql import predicate_sql, q
from manifests.tables import column_name
from pipeline.export.config import WHERE_TABLE, ExportConfig, Threshold
from pipeline.export.order import units

MAX_EXAMPLES = 3


def _ref(target: str) -> str:
    stage, _, column = target.partition(".")
    return column_name(stage, column)


def threshold_predicates(thresholds: dict[str, Threshold], stage_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for target, th in thresholds.items():
        stage, _, column = target.partition(".")
        if stage not in stage_ids or not column:
            raise ValueError(f"export.thresholds: {shown(target)} must be 'stage.column' with a stage of this run "
                             f"({', '.join(stage_ids)})")
        ref = q(column_name(stage, column))
        preds = out.setdefault(stage, [])
        if th.min is not None:
            preds.append(f"{ref} >= {th.min!r}")
        if th.max is not None:
            preds.append(f"{ref} <= {th.max!r}")
        if th.max_abs is not None:
            preds.append(f"abs({ref}) <= {th.max_abs!r}")
    return out


def selection_predicate(cfg: ExportConfig, stage_ids: list[str]) -> str:
    """Every stage ok; each stage's own keep unless thresholds replace it or it is ignored; ``where``.
    A NULL in any condition (an error row has no keep and no scores) leaves the sample out, as SQL's
    WHERE does: ``where`` is one parenthesised expression and cannot reach the conditions before it."""
    overridden = threshold_predicates(cfg.thresholds, stage_ids)
    conds = [f"{q(column_name(s, 'status'))} = 'ok'" for s in stage_ids]
    for s in stage_ids:
        if s in overridden:
            conds.extend(overridden[s])
        elif s not in cfg.ignore_decisions:
            conds.append(f"{q(column_name(s, 'keep'))}")
    if cfg.where:
        conds.append(predicate_sql(cfg.where))
    return " AND ".join(conds)


@dataclass(frozen=True)
class SelectionSpec:
    """The plan query: small, picklable, shipped to every plan task."""

    sql: str
    meta_names: tuple[str, ...] = ()  # json field name per metadata column
    member_exts: tuple[str, ...] = ()
    balance_columns: tuple[str, ...] = ()  # samples-table columns counted for the card's balance tables
    diversity: bool = False  # sel_div is present
    embedding: bool = False  # sel_emb, sel_space and sel_metric are present


# Columns of the first pass only: what identity selection and the split read, never written to shards.
SELECTION_COLUMNS = ("sel_score", "sel_div", "sel_bal", "sel_rank", "sel_strat", "sel_dup", "sel_emb", "sel_space",
                     "sel_metric", "ihash")


def split_sources(schema: pa.Schema | None, cfg: ExportConfig) -> tuple[str | None, str | None]:
    """The samples-table embedding column the split compares (``splits.embedding``, else the one stage
    with an embedding) and the dedup group column (the one stage with ``dup_group_id``), or None."""
    if schema is None:
        return None, None
    names = set(schema.names)
    emb = sorted(n for n in names if n.endswith("__embedding") and n[: -len("embedding")] + "embedding_space" in names)
    if cfg.splits.embedding is not None:
        emb = [e for e in emb if e == column_name(cfg.splits.embedding, "embedding")]
    dup = sorted(n for n in names if n.endswith("__dup_group_id"))
    return (emb[0] if len(emb) == 1 else None), (dup[0] if len(dup) == 1 else None)


def selection_spec(cfg: ExportConfig, stage_ids: list[str], balance_columns: list[str] | None = None,
                   schema: pa.Schema | None = None) -> SelectionSpec:
    extra = ""
    for i, target in enumerate(cfg.metadata_columns):
        extra += f", {q(_ref(target))} AS meta_{i}"
    for i, target in enumerate(cfg.extra_members.values()):
        extra += f", {q(_ref(target))} AS member_{i}"
    for i, col in enumerate(balance_columns or []):
        extra += f", CAST({q(col)} AS VARCHAR) AS bal_{i}"
    ids = cfg.identities

    def ref(target: str | None, cast: str) -> str:
        return f"CAST({q(_ref(target))} AS {cast})" if target else f"CAST(NULL AS {cast})"

    extra += (f", {ref(ids.prefer.score, 'DOUBLE')} AS sel_score, {ref(ids.rank.score, 'DOUBLE')} AS sel_rank"
              f", {ref(ids.balance.column if ids.balance else None, 'VARCHAR')} AS sel_bal"
              f", {ref(cfg.splits.stratify, 'VARCHAR')} AS sel_strat")
    if ids.prefer.diversity:
        extra += f", {q(_ref(ids.prefer.diversity))} AS sel_div"
    emb, dup = split_sources(schema, cfg)
    extra += f", CAST({q(dup)} AS VARCHAR) AS sel_dup" if dup else ", CAST(NULL AS VARCHAR) AS sel_dup"
    if emb:
        base = emb[: -len("embedding")]
        extra += (f", {q(emb)} AS sel_emb, {q(base + 'embedding_space')} AS sel_space, "
                  f"{q(base + 'embedding_metric')} AS sel_metric")
    sql = (
        "SELECT sample_id, key, identity_id, image_shard AS src_shard, image_offset AS src_offset, "
        f"image_size AS src_size, image_crc32 AS src_crc32, image_ext AS src_ext{extra} FROM {WHERE_TABLE} WHERE "
        + selection_predicate(cfg, stage_ids)
    )
    return SelectionSpec(sql, tuple(m.replace(".", "_") for m in cfg.metadata_columns),
                         tuple(cfg.extra_members), tuple(balance_columns or []), bool(ids.prefer.diversity),
                         emb is not None)


def sandbox() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can read only the Arrow data registered on it: no files, no network,
    and the setting cannot be turned back on by the query."""
    con = duckdb.connect(":memory:")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def check_selection(spec: SelectionSpec, schema: pa.Schema) -> None:
    """Bind the plan query against the samples schema with no rows: an unknown column in
    ``export.where`` fails here, before any work."""
    con = sandbox()
    try:
        con.register(WHERE_TABLE, schema.empty_table())
        con.execute(f"SELECT * FROM ({spec.sql}) LIMIT 0")
    finally:
        con.close()


_NUM_RE = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")
_RULE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def rule_of(reason: str | None) -> str:
    """The rule a reason belongs to: the reason itself when it is a rule name (``no_face``); for
    older free-text reasons, the text before the first ':' with numbers masked, so one rule never
    becomes one line per distinct number."""
    if not reason:
        return "(no reason)"
    if _RULE_RE.match(reason):
        return reason
    head = reason.split(":", 1)[0].strip()
    return _NUM_RE.sub("N", head)[:80] or "(no reason)"


@dataclass
class PartitionPlan:
    rows: int = 0
    candidates: int = 0
    no_identity: int = 0
    identities: pa.Table | None = None  # (identity, bin) counts: pipeline.export.identities.COUNTS_SCHEMA
    exts: Counter[str] = field(default_factory=Counter)
    reasons: dict[tuple[int, str, str, str], dict[str, Any]] = field(default_factory=dict)


def plan_partition(store: Any, samples_files: list[tuple[str, ...]], decisions_files: list[tuple[str, ...]],
                   spec: SelectionSpec, out_parts: tuple[str, ...]) -> PartitionPlan:
    """First pass over one partition of samples: select, write the candidates sorted by a hash of
    their identity (so the second pass reads whole identities by hash range), return the (identity,
    bin) counts and the drops of the run's own decisions."""
    from pipeline.export.identities import COUNTS_SCHEMA, counts_sql

    ds = pads.dataset([store.path(*p) for p in samples_files], filesystem=store.fs, format="parquet")
    con = sandbox()
    try:
        con.register(WHERE_TABLE, ds)
        sel = con.sql(spec.sql).to_arrow_table()
        total = int(con.sql(f"SELECT count(*) FROM {WHERE_TABLE}").fetchall()[0][0])
        con.register("candidates", sel)
        counts = con.sql(counts_sql("candidates")).to_arrow_table().cast(COUNTS_SCHEMA)
    finally:
        con.close()
    res = PartitionPlan(rows=total, candidates=sel.num_rows, identities=counts)
    res.exts.update(e or "png" for e in sel.column("src_ext").to_pylist())
    ids = sel.column("identity_id")
    res.no_identity = int(pc.sum(pc.is_null(ids)).as_py() or 0) + int(pc.sum(pc.equal(ids, "")).as_py() or 0)
    labelled = sel.filter(pc.and_(pc.is_valid(ids), pc.not_equal(pc.fill_null(ids, ""), "")))
    u = pa.array(units("order:", labelled.column("sample_id")), pa.float64())
    ih = pa.array(units("ident:", labelled.column("identity_id")), pa.float64())
    labelled = labelled.append_column("unit", u).append_column("ihash", ih).sort_by(
        [("ihash", "ascending"), ("identity_id", "ascending"), ("sample_id", "ascending")])
    import io

    buf = io.BytesIO()
    pq.write_table(labelled, buf, row_group_size=4096, compression="zstd")
    store.write_atomic(buf.getvalue(), *out_parts)
    res.reasons = drop_reasons(store, decisions_files)
    return res


def drop_reasons(store: Any, decisions_files: list[tuple[str, ...]]) -> dict[tuple[int, str, str, str], dict[str, Any]]:
    """Failed and dropped rows of a partition grouped by (stage, status, rule), with a few examples."""
    out: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    if not decisions_files:
        return out
    ds = pads.dataset([store.path(*p) for p in decisions_files], filesystem=store.fs, format="parquet")
    t = ds.to_table(columns=["sample_id", "stage", "stage_index", "status", "reason", "detail"],
                    filter=(pads.field("status") != "ok") | ~pads.field("keep"))
    for sid, stage, idx, status, reason, detail in zip(*(t.column(c).to_pylist() for c in t.column_names),
                                                       strict=True):
        k = (int(idx), stage, status, rule_of(reason))
        entry = out.setdefault(k, {"count": 0, "examples": []})
        entry["count"] += 1
        entry["examples"].append((sid, detail if detail is not None else (reason or "")))
        if len(entry["examples"]) > MAX_EXAMPLES:
            entry["examples"] = sorted(entry["examples"])[:MAX_EXAMPLES]
    return out


def merge_reasons(parts: list[dict[tuple[int, str, str, str], dict[str, Any]]]) -> list[dict[str, Any]]:
    merged: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    for part in parts:
        for k, v in part.items():
            m = merged.setdefault(k, {"count": 0, "examples": []})
            m["count"] += v["count"]
            m["examples"] = sorted(m["examples"] + list(v["examples"]))[:MAX_EXAMPLES]
    rows = [{"stage_index": k[0], "stage": k[1], "status": k[2], "rule": k[3], "count": v["count"],
             "examples": [{"sample_id": s, "detail": d} for s, d in v["examples"]]} for k, v in merged.items()]
    return sorted(rows, key=lambda r: (r["stage_index"], -r["count"], r["status"], r["rule"]))


@dataclass
class IdentityPlan:
    """The small per-identity table and what follows from it."""

    table: pa.Table  # identity_id, n, split, label
    per_split: dict[str, dict[str, int]]  # split -> samples, identities, shards


def shard_count(n: int, cfg: ExportConfig) -> int:
    if n <= 0:
        return 0
    return max(1, min(n, max(math.ceil(n / cfg.shard_size), cfg.min_shards_per_split)))


def label_identities(kept: pa.Table, splits: dict[str, str], cfg: ExportConfig) -> IdentityPlan:
    """One label space: training identities 0..T-1 sorted by id, validation T..T+V-1."""
    kept = kept.select(["identity_id", "n"]).sort_by("identity_id")
    ids = kept.column("identity_id").to_pylist()
    train = [i for i in ids if splits[i] == "train"]
    val = [i for i in ids if splits[i] == "val"]
    label = {ident: n for n, ident in enumerate(train + val)}
    table = kept.append_column("split", pa.array([splits[i] for i in ids], pa.string())).append_column(
        "label", pa.array([label[i] for i in ids], pa.int64()))
    per_split: dict[str, dict[str, int]] = {}
    for name, members in (("train", train), ("val", val)):
        n = int(pc.sum(table.filter(pc.equal(table.column("split"), name)).column("n")).as_py() or 0)
        per_split[name] = {"samples": n, "identities": len(members), "shards": shard_count(n, cfg)}
    return IdentityPlan(table, per_split)


def writer_ranges(per_split: dict[str, dict[str, int]], rows_per_task: int) -> list[tuple[str, int, int, int]]:
    """(split, first shard, end shard, shard count) per writer task, about rows_per_task samples each."""
    out: list[tuple[str, int, int, int]] = []
    for split, info in per_split.items():
        e = info["shards"]
        if not e:
            continue
        per_shard = max(1, info["samples"] // e)
        step = max(1, rows_per_task // per_shard)
        out.extend((split, lo, min(lo + step, e), e) for lo in range(0, e, step))
    return out


def where_error(cfg: ExportConfig, stage_ids: list[str], schema: pa.Schema) -> str | None:
    """Why ``export.where`` cannot run on this run's samples table (an unknown column, a type
    error), or None; checked before any work."""
    if not cfg.where:
        return None
    try:
        check_selection(selection_spec(cfg, stage_ids), schema)
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None
