"""The DuckDB catalog: views over committed manifest fragments only.

Views:
- one per stage, named by its stage id: that stage's rows, all columns;
- ``decisions``: one row per sample per stage with the common lineage and decision columns;
- ``samples``: one row per sample; per stage one STRUCT column named by the stage id holding that
  stage's row (a derived sample sees its parent's rows for stages that ran before it was derived),
  so `SELECT sample_id, quality.yaw FROM samples WHERE quality.keep` reads naturally;
- ``identities``: the run's identity table, when it has one;
- ``metrics``: training metrics written beside the manifests, when there are any.

User SQL runs on a read-only database with external access limited to the run directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import duckdb
import pyarrow as pa

from manifests.commit import committed_fragments
from manifests.schema import COMMON_FIELDS
from manifests.storage import RunStorage


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Catalog:
    def __init__(self, store: RunStorage, stage_ids: list[str]) -> None:
        self.store = store
        self.stage_ids = stage_ids

    def _url(self, path: str) -> str:
        return path if self.store.is_local else self.store.fs.unstrip_protocol(path)

    def fragments(self, stage_id: str) -> list[str]:
        """Verified fragments only: a truncated or foreign file never breaks a query (manifests/commit.py)."""
        return [self._url(f.path) for f in committed_fragments(self.store, stage_id)]

    def view_sql(self) -> list[str]:
        stmts: list[str] = []
        common = [f.name for f in COMMON_FIELDS]
        for sid in self.stage_ids:
            files = self.fragments(sid)
            if files:
                listing = ", ".join(_lit(f) for f in files)
                stmts.append(f"CREATE VIEW {_q(sid)} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
            else:
                cols = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {_q(f.name)}" for f in COMMON_FIELDS)
                stmts.append(f"CREATE VIEW {_q(sid)} AS SELECT {cols} WHERE false")
        parts = [
            f"SELECT {i} AS stage_index, {', '.join(_q(c) for c in common)} FROM {_q(sid)}"
            for i, sid in enumerate(self.stage_ids)
        ]
        stmts.append("CREATE VIEW decisions AS " + " UNION ALL ".join(parts))
        stmts.append(self._samples_sql())
        ident = self.store.path("identities", "identities.parquet")
        if self.store.fs.exists(ident):
            stmts.append(f"CREATE VIEW identities AS SELECT * FROM read_parquet({_lit(self._url(ident))})")
        metrics = self.store.path("metrics")
        if self.store.fs.exists(metrics):
            files = [self._url(p) for p in self.store.fs.glob(metrics + "/**/*.parquet")]
            if files:
                listing = ", ".join(_lit(f) for f in sorted(files))
                stmts.append(f"CREATE VIEW metrics AS SELECT * FROM read_parquet([{listing}], union_by_name=true, "
                             "filename=true)")
        return stmts

    def _samples_sql(self) -> str:
        sids = self.stage_ids
        base = (
            "WITH ids AS (SELECT sample_id, last(key ORDER BY stage_index) AS key, "
            "last(identity_id ORDER BY stage_index) AS identity_id, "
            "max(parent_id) AS parent_id, max(stage_index) AS last_stage_index "
            "FROM decisions GROUP BY sample_id)"
        )
        select = ["ids.sample_id", "ids.key", "ids.identity_id", "ids.parent_id", "ids.last_stage_index"]
        joins = []
        for i, sid in enumerate(sids):
            own, par = f"s{i}", f"p{i}"
            joins.append(f"LEFT JOIN {_q(sid)} {own} ON {own}.sample_id = ids.sample_id")
            joins.append(f"LEFT JOIN {_q(sid)} {par} ON {par}.sample_id = ids.parent_id")
            select.append(
                f"CASE WHEN {own}.sample_id IS NOT NULL THEN {own} "
                f"WHEN {par}.sample_id IS NOT NULL THEN {par} ELSE NULL END AS {_q(sid)}"
            )
        return f"CREATE VIEW samples AS {base} SELECT {', '.join(select)} FROM ids {' '.join(joins)}"

    @contextlib.contextmanager
    def connect(self, read_only: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection with the views. Read-only by default: user SQL can read, not write."""
        tmp = tempfile.mkdtemp(prefix="ff-catalog-")
        db = os.path.join(tmp, "catalog.duckdb")
        try:
            con = duckdb.connect(db)
            if not self.store.is_local:
                con.register_filesystem(self.store.fs)
            for stmt in self.view_sql():
                con.execute(stmt)
            con.close()
            con = duckdb.connect(db, read_only=read_only)
            if not self.store.is_local:
                con.register_filesystem(self.store.fs)
            if read_only and self.store.is_local:
                con.execute(f"SET allowed_directories=[{_lit(self.store.root + os.sep)}]")
                con.execute("SET enable_external_access=false")
                con.execute("SET lock_configuration=true")
            try:
                yield con
            finally:
                con.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def query(self, sql: str) -> pa.Table:
        """Run one user query. Only SELECT / EXPLAIN statements, on a read-only connection whose file
        access is limited to the run directory: a query can read the run, never change it."""
        check_read_only_sql(sql)
        with self.connect(read_only=True) as con:
            return con.sql(sql).to_arrow_table()


class QueryError(ValueError):
    pass


_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def check_read_only_sql(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from None
    if len(statements) != 1:
        raise QueryError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in _ALLOWED:
        raise QueryError(f"only SELECT queries are allowed here (got {kind.name})")


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_integer(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    return "VARCHAR"

