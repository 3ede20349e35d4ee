"""The DuckDB catalog: views over committed manifest fragments only.

Views:
- one per stage, named by its stage id: that stage's rows, all columns. It reads the stage's
  compacted copy (sorted by sample_id, see manifests/compaction.py) when that copy covers exactly
  the committed fragments, and otherwise a glob over the fragments. A glob, not a list of paths:
  connecting costs one directory listing per stage, not a parse of one path per fragment; the
  pattern cannot match a temporary name (``_tmp-...``), so what a reader sees is committed.
  Fixed-size vectors read as DuckDB arrays (``FLOAT[512]``), not variable lists;
- ``decisions``: one row per sample per stage with the common lineage and decision columns;
- ``samples``: one row per sample. When the run wrote its samples table (``tables/samples/``) it
  is that table. Otherwise a view with, per stage, one STRUCT column named by the stage id (a
  derived sample sees its parent's row for stages that ran before it was derived), so
  ``SELECT sample_id, quality.yaw FROM samples WHERE quality.keep`` reads naturally. DuckDB does not
  prune the fields of a struct it builds, so ``query`` builds each struct from the fields the
  query names (DuckDB's own parser says which) and leaves out the stages it never names: a count
  reads the sample ids, not every column of every stage;
- ``identities``: the run's identity table, when it has one;
- ``metrics``: training metrics written beside the manifests, when there are any.

User SQL (``query``) and the export's SQL run in one sandbox on every store, local or fsspec: a
single SELECT, on a read-only database, with DuckDB's external access limited to the run
directory and the configuration locked.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.commit import COMMITTED_GLOB as COMMITTED_GLOB
from manifests.commit import Fragment, committed_tokens, scan_fragments
from manifests.compaction import read_pointer
from manifests.layout import (
    IDENTITIES_FILE,
    MANIFEST_SUFFIX,
    MANIFESTS_DIR,
    METRICS_DIR,
    SAMPLES_TABLE,
    SHARD_SUFFIX,
    SHARDS_DIR,
    TABLES_DONE,
)
from manifests.query_guard import QueryGuard
from manifests.schema import COMMON_FIELDS
from manifests.sql import (
    array_casts,
    duck_path,
    duck_type,
    glob_escape,
    lit,
    one_statement,
    parquet_source,
    parse_tree,
    q,
    sandbox,
)
from manifests.storage import RunStorage


def _select_star(casts: dict[str, str]) -> str:
    if not casts:
        return "SELECT *"
    return "SELECT * REPLACE (" + ", ".join(f"CAST({q(c)} AS {t}) AS {q(c)}" for c, t in casts.items()) + ")"


@dataclass
class StageSource:
    """Where a stage's committed rows are read from."""

    stage_id: str
    fragments: dict[str, str]
    columns: list[str] = field(default_factory=list)
    casts: dict[str, str] = field(default_factory=dict)
    compacted: dict[str, Any] | None = None  # the valid compaction pointer, when there is one
    read_sql: str | None = None  # a table expression; None: no committed rows
    bad: list[str] = field(default_factory=list)  # fragments that failed verification: never read
    verified: list[Fragment] | None = None  # the footer-checked fragments, when they were checked


# Rows per Arrow batch of a streamed result. Not smaller: DuckDB's streaming buffer caps bytes, not
# batches, and with batches of a few rows its threads run ahead and queue the whole result.
STREAM_BATCH_ROWS = 10_000


class Catalog:
    def __init__(self, store: RunStorage, stage_ids: list[str], *, memory_limit: str = "2GB") -> None:
        self.store = store
        self.stage_ids = stage_ids
        self.memory_limit = memory_limit
        self._sources: dict[str, StageSource] = {}

    # ------------------------------------------------------------ sources

    def url(self, path: str) -> str:
        return path if self.store.is_local else self.store.fs.unstrip_protocol(path)

    def fragments(self, stage_id: str) -> list[str]:
        """URLs of the committed fragments of a stage (for callers that read them one by one)."""
        return [self.url(self.store.path(MANIFESTS_DIR, stage_id, n)) for n in self.source(stage_id).fragments]

    def source(self, stage_id: str) -> StageSource:
        if stage_id in self._sources:
            return self._sources[stage_id]
        pointer = read_pointer(self.store, stage_id)
        frags = committed_tokens(self.store, stage_id, tokens=pointer is not None)
        src = StageSource(stage_id, frags)
        if pointer is not None and pointer.get("fragments") != frags:
            pointer = None  # stale: a fragment was added, removed or rewritten since
        if pointer is not None and pointer.get("tars"):
            listed = self.store.list_sizes(SHARDS_DIR, stage_id, suffix=SHARD_SUFFIX)
            if any(listed.get(name) != size for name, size in pointer["tars"].items()):
                pointer = None  # a shard tar was truncated or removed since: check each fragment
        if frags:
            if pointer is not None:
                src.compacted = pointer
                src.columns = list(pointer["columns"])
                src.casts = dict(pointer["casts"])
            else:
                # Not compacted (a run in progress): check each fragment's commit record, so a truncated
                # or foreign file is reported and never read. A compacted copy was verified when made.
                scan = scan_fragments(self.store, stage_id)
                src.verified = scan.fragments
                good = {posixpath.basename(f.path) for f in scan.fragments}
                src.bad = [b.message() for b in scan.bad]
                if src.bad:
                    frags = {n: tok for n, tok in frags.items() if n in good}
                    src.fragments = frags
        if frags:
            if pointer is not None:
                src.read_sql = self._read_parquet((MANIFESTS_DIR, stage_id, *pointer["dir"]),
                                                  [f["name"] for f in pointer["files"]])
            else:
                first = self.store.path(MANIFESTS_DIR, stage_id, next(iter(frags)))
                schema = pq.read_schema(first if self.store.is_local else self.store.fs.open(first, "rb"))
                src.columns = list(schema.names)
                src.casts = array_casts(schema)
                if src.bad:  # name the good files: the glob would reach the bad ones
                    listing = ", ".join(lit(self.duck_path(self.store.path(MANIFESTS_DIR, stage_id, n)))
                                        for n in frags)
                    src.read_sql = f"read_parquet([{listing}])"
                else:
                    src.read_sql = self._read_parquet((MANIFESTS_DIR, stage_id), list(frags))
        self._sources[stage_id] = src
        return src

    # ------------------------------------------------------------ views

    def _relation(self, sid: str) -> str:
        """The stage's rows as a SELECT (typed and empty when nothing is committed)."""
        src = self.source(sid)
        if src.read_sql is None:
            cols = ", ".join(f"CAST(NULL AS {duck_type(f.type) or 'VARCHAR'}) AS {q(f.name)}" for f in COMMON_FIELDS)
            return f"SELECT {cols} WHERE false"
        return f"{_select_star(src.casts)} FROM {src.read_sql}"

    def _stage_view(self, sid: str) -> str:
        return f"CREATE VIEW {q(sid)} AS {self._relation(sid)}"

    def _table_view(self, name: str, parts: tuple[str, ...], extra: str = "") -> str | None:
        """A view over a folder of committed Parquet files written by the run (not per stage)."""
        names = self.store.list_files(*parts, suffix=MANIFEST_SUFFIX)
        if not names:
            return None
        schema = pq.read_schema(self._open(self.store.path(*parts, names[0])))
        source = self._read_parquet(parts, names, extra)
        return f"CREATE VIEW {q(name)} AS {_select_star(array_casts(schema))} FROM {source}"

    def _samples_table_sql(self, fields: dict[str, list[str] | None] | None) -> str | None:
        """``samples`` over the run's committed samples table (manifests/tables.py: flat
        ``<stage>__<column>`` columns), with each stage also as a STRUCT of the fields the query
        names, so ``quality.yaw`` reads one column of one table, no join. None when the table is
        not committed or lacks a field the query names (the join view then answers)."""
        if not self.store.exists(*TABLES_DONE):
            return None
        names = self.store.list_files(*SAMPLES_TABLE, suffix=MANIFEST_SUFFIX)
        if not names:
            return None
        schema = pq.read_schema(self._open(self.store.path(*SAMPLES_TABLE, names[0])))
        structs = []
        for sid in self.stage_ids:
            if fields is not None and sid not in fields:
                continue
            prefix = f"{sid}__"
            available = [c[len(prefix):] for c in schema.names if c.startswith(prefix)]
            wanted = fields.get(sid) if fields is not None else None
            if wanted is not None and any(w not in available for w in wanted):
                return None
            chosen = available if wanted is None else [c for c in available if c in set(wanted)]
            chosen = chosen or available[:1]
            if not chosen or sid in schema.names:
                continue
            packed = ", ".join(f"{q(c)} := {q(prefix + c)}" for c in chosen)
            present = f"{q(prefix + 'status')} IS NOT NULL" if "status" in available else "true"
            structs.append(f"CASE WHEN {present} THEN struct_pack({packed}) END AS {q(sid)}")
        select = ", ".join([_select_star(array_casts(schema)), *structs]).replace("SELECT ", "", 1)
        return f"CREATE VIEW samples AS SELECT {select} FROM {self._read_parquet(SAMPLES_TABLE, names)}"

    def duck_path(self, path: str) -> str:
        """A file of the run as DuckDB's readers take it (see ``manifests.sql.duck_path``)."""
        return duck_path(self.url(path), local=self.store.is_local)

    def _read_parquet(self, parts: tuple[str, ...], names: list[str], extra: str = "") -> str:
        """``read_parquet`` over the committed files of a run folder (``names``: those files)."""
        folder = self.store.path(*parts)
        return parquet_source(self.url(folder), COMMITTED_GLOB, [self.url(posixpath.join(folder, n)) for n in names],
                              local=self.store.is_local, extra=extra)

    def _open(self, path: str) -> Any:
        return path if self.store.is_local else self.store.fs.open(path, "rb")

    def view_sql(self, samples_fields: dict[str, list[str] | None] | None = None,
                 needed: set[str] | None = None) -> list[str]:
        """The views. ``samples_fields`` shapes the fallback ``samples`` view: per stage, the fields
        its struct holds (None: all of them); stages left out get no struct. None: every stage,
        every field (what a caller gets that does not say what it reads). ``needed``: the relations
        a query names (None: all). DuckDB binds a view when it is created, which globs its folder,
        so a view nobody reads is not created; no view is built on another stage view."""
        def want(name: str) -> bool:
            return needed is None or name.lower() in needed

        stmts = [self._stage_view(sid) for sid in self.stage_ids if want(sid)]
        table = self._samples_table_sql(samples_fields) if want("samples") else None
        if want("decisions") or (want("samples") and table is None):
            common = ", ".join(q(f.name) for f in COMMON_FIELDS)
            parts = [f"SELECT {i} AS stage_index, {common} FROM ({self._relation(sid)})"
                     for i, sid in enumerate(self.stage_ids)]
            stmts.append("CREATE VIEW decisions AS " + " UNION ALL ".join(parts))
        if want("samples"):
            stmts.append(table or self._samples_sql(samples_fields))
        ident = self.store.path(*IDENTITIES_FILE)
        if want("identities") and self.store.fs.exists(ident):
            schema = pq.read_schema(self._open(ident))
            stmts.append(f"CREATE VIEW identities AS {_select_star(array_casts(schema))} "
                         f"FROM read_parquet({lit(self.duck_path(ident))})")
        metrics = self.store.path(METRICS_DIR)
        found = (self.store.fs.glob(glob_escape(metrics) + "/**/" + COMMITTED_GLOB)
                 if want("metrics") and self.store.fs.exists(metrics) else [])
        if found:
            source = parquet_source(self.url(metrics), "**/" + COMMITTED_GLOB, [self.url(f) for f in found],
                                    local=self.store.is_local, extra=", union_by_name=true, filename=true")
            stmts.append(f"CREATE VIEW metrics AS SELECT * FROM {source}")
        return stmts

    def _samples_sql(self, fields: dict[str, list[str] | None] | None) -> str:
        from manifests.reader import own_or_parent_sql

        select = ["ids.sample_id", "ids.key", "ids.identity_id", "ids.parent_id", "ids.last_stage_index"]
        joins = []
        for i, sid in enumerate(self.stage_ids):
            src = self.source(sid)
            if fields is not None and sid not in fields:
                continue
            available = src.columns or [f.name for f in COMMON_FIELDS]
            wanted = fields.get(sid) if fields is not None else None
            cols = available if wanted is None else [c for c in available if c in set(wanted)]
            if not cols:
                cols = ["sample_id"]
            has_own = f"(ids.stages >> {i}) & 1 = 1" if len(self.stage_ids) < 127 else None
            join, exprs = own_or_parent_sql("ids", f"({self._relation(sid)})", f"s{i}", cols, has_own=has_own)
            joins.append(join)
            packed = ", ".join(f"{q(c)} := {exprs[c]}" for c in cols)
            select.append(f"CASE WHEN {exprs['sample_id']} IS NOT NULL THEN struct_pack({packed}) END AS {q(sid)}")
        ids = (
            "WITH ids AS (SELECT sample_id, last(key ORDER BY stage_index) AS key, "
            "last(identity_id ORDER BY stage_index) AS identity_id, "
            "max(parent_id) AS parent_id, max(stage_index) AS last_stage_index, "
            # Which stages hold a row of the sample's own: its row there, else its parent's.
            "bit_or(CAST(1 AS HUGEINT) << stage_index) AS stages "
            "FROM decisions GROUP BY sample_id)"
        )
        return f"CREATE VIEW samples AS {ids} SELECT {', '.join(select)} FROM ids {' '.join(joins)}"

    # ------------------------------------------------------------ connections

    def _allowed(self) -> list[str]:
        """The run directory, spelled every way a path to it can reach DuckDB."""
        roots = {self.url(self.store.root)}
        if self.store.is_local:
            roots.add(os.path.realpath(self.store.root))
        else:
            roots.add(self.store.url.rstrip("/"))
            roots.add(self.store.fs.unstrip_protocol(self.store.root))
        return sorted(r.rstrip("/") + "/" for r in roots)

    def _register(self, con: duckdb.DuckDBPyConnection) -> None:
        if not self.store.is_local:
            con.register_filesystem(self.store.fs)

    @contextlib.contextmanager
    def connect(self, read_only: bool = True, *, sql: str | None = None,
                guard: QueryGuard | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A sandboxed connection with the views: read-only database, file access limited to the run
        directory on every store, configuration locked. ``sql``: the query this connection is for,
        so the fallback ``samples`` view holds only what it reads. ``guard``: what may stop the work
        on this connection (its interrupt and its temporary folder are registered there)."""
        guard = guard or QueryGuard()
        sweep_stale_temp()
        tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        db = os.path.join(tmp, "catalog.duckdb")
        try:
            con = duckdb.connect(db)
            try:
                with guard.attached(con.interrupt, functools.partial(shutil.rmtree, tmp, ignore_errors=True)):
                    self._register(con)
                    fields, needed = analyse(sql, self.stage_ids) if sql is not None else (None, None)
                    for stmt in self.view_sql(fields, needed):
                        con.execute(stmt)
            finally:
                con.close()
            con = duckdb.connect(db, read_only=read_only)
            try:
                with guard.attached(con.interrupt, functools.partial(shutil.rmtree, tmp, ignore_errors=True)):
                    self._register(con)
                    con.execute(f"SET temp_directory={lit(os.path.join(tmp, 'spill'))}")
                    con.execute(f"SET memory_limit={lit(self.memory_limit)}")
                    con.execute("SET parquet_metadata_cache=true")
                    sandbox(con, self._allowed())
                    yield con
            finally:
                con.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def stream(self, sql: str, *, guard: QueryGuard | None = None) -> Iterator[pa.RecordBatchReader]:
        """Run one user query: a single SELECT in the sandbox, its rows read as they are made, so a
        reader that stops early stops the query. A query can read the run, never change it, and
        never read anything outside it. Columns of the same name get distinct ones
        (``distinct_names``)."""
        check_read_only_sql(sql)
        with self.connect(read_only=True, sql=sql, guard=guard) as con:
            reader = con.sql(sql).to_arrow_reader(STREAM_BATCH_ROWS)
            names = distinct_names(reader.schema.names)
            schema = pa.schema([f.with_name(n) for f, n in zip(reader.schema, names, strict=True)])

            def batches() -> Iterator[pa.RecordBatch]:
                for batch in reader:
                    if guard is not None:
                        guard.check()
                    yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)

            try:
                yield pa.RecordBatchReader.from_batches(schema, batches())
            finally:
                reader.close()

    def query(self, sql: str) -> pa.Table:
        """Every row of one user query (see ``stream``), for callers that need them all at once."""
        with self.stream(sql) as reader:
            return reader.read_all()


def distinct_names(names: list[str]) -> list[str]:
    """Result column names with no two alike: the first of a name keeps it, the next ones get
    ``_2``, ``_3``... (skipping a name the result already has), so ``SELECT q.keep, d.keep`` reads as
    ``keep, keep_2`` in every format and a writer keyed by name (JSON, dicts, Parquet readers) keeps
    every column."""
    taken = set(names)
    used: set[str] = set()
    out = []
    for name in names:
        new, k = name, 2
        while new in used or (new != name and new in taken):
            new, k = f"{name}_{k}", k + 1
        used.add(new)
        out.append(new)
    return out


TEMP_PREFIX = "ff-catalog-"


def sweep_stale_temp(root: str | None = None) -> None:
    """Remove catalog temporary folders (``ff-catalog-<pid>-...``) whose owning process is gone: a
    process killed by SIGKILL runs no cleanup, so the next catalog start does it."""
    root = root or tempfile.gettempdir()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        m = re.fullmatch(re.escape(TEMP_PREFIX) + r"(\d+)-.+", entry.name)
        if m and entry.is_dir(follow_symlinks=False) and not _alive(int(m.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class QueryError(ValueError):
    pass


_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def check_read_only_sql(sql: str) -> None:
    try:
        kind = one_statement(sql, "query").type
    except ValueError as exc:
        raise QueryError(str(exc)) from None
    if kind not in _ALLOWED:
        raise QueryError(f"only SELECT queries are allowed here (got {kind.name})")
    if kind == duckdb.StatementType.EXPLAIN and _explain_analyze(sql):
        # EXPLAIN ANALYZE runs the statement it explains: "EXPLAIN ANALYZE COPY ... TO" writes a file.
        raise QueryError("only SELECT queries are allowed here (EXPLAIN ANALYZE runs what it explains; use EXPLAIN)")


def _explain_analyze(sql: str) -> bool:
    skip = {duckdb.token_type.comment, duckdb.token_type.string_const}
    starts = [pos for pos, kind in duckdb.tokenize(sql) if kind not in skip]
    words = [sql[a:b].strip().strip('"').upper() for a, b in zip(starts, [*starts[1:], len(sql)], strict=True)]
    return any(w.startswith(("ANALYZE", "ANALYSE")) for w in words)


def _walk(node: Any, refs: list[list[str]], stars: list[bool], tables: set[str]) -> None:
    if isinstance(node, dict):
        cls = node.get("class")
        if cls == "COLUMN_REF":
            refs.append([str(n).lower() for n in node.get("column_names", [])])
        elif cls == "STAR":
            stars.append(True)
        if node.get("type") == "BASE_TABLE" and node.get("table_name"):
            tables.add(str(node["table_name"]).lower())
        for v in node.values():
            _walk(v, refs, stars, tables)
    elif isinstance(node, list):
        for v in node:
            _walk(v, refs, stars, tables)


def analyse(sql: str, stage_ids: list[str]) -> tuple[dict[str, list[str] | None] | None, set[str] | None]:
    """What a query reads: its ``samples_fields`` and the relations it names (None: unknown, all)."""
    tree = parse_tree(sql)
    if tree is None:
        return None, None
    tables: set[str] = set()
    _walk(tree, [], [], tables)
    return samples_fields(sql, stage_ids, tree), tables


def samples_fields(sql: str, stage_ids: list[str], tree: dict[str, Any] | None = None
                   ) -> dict[str, list[str] | None] | None:
    """Which fields of which stage structs a query reads from ``samples``: ``stage.field`` (or
    ``alias.stage.field``) names a field; a stage named bare (``quality``, ``quality['yaw']``)
    needs its whole struct; ``*`` needs everything (None). Over-inclusion only costs reading."""
    tree = tree if tree is not None else parse_tree(sql)
    if tree is None:
        return None
    refs: list[list[str]] = []
    stars: list[bool] = []
    _walk(tree, refs, stars, set())
    if stars:
        return None
    lower = {s.lower(): s for s in stage_ids}
    out: dict[str, list[str] | None] = {}
    for names in refs:
        for i in (0, 1):
            if i < len(names) and names[i] in lower:
                sid = lower[names[i]]
                if i + 1 < len(names):
                    have = out.get(sid, [])
                    if have is not None:
                        out[sid] = [*have, names[i + 1]]
                else:
                    out[sid] = None
                break
    return out
