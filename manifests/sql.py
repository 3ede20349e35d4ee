"""Quoting for the text that meets DuckDB and globs: identifiers, string literals, glob patterns and
the one user predicate (``export.where``). Every SQL string or glob built from a run path or any user
text is built with these, so each escape rule is written once.

Globs: DuckDB (locally, and through fsspec for other stores) and fsspec treat ``*``, ``?`` and
``[...]`` as wildcards; ``{``, ``}`` and ``]`` on their own are literal in both. A wildcard character
inside brackets (``[*]``, ``[[]``) matches itself only, in both. DuckDB's local glob never matches a
path holding a backslash, whatever the escape: where a folder's path holds one, a reader is given the
list of its files instead (see ``parquet_source``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb

GLOB_CHARS = frozenset("*?[")
_GLOB_RE = re.compile(r"([*?\[])")


def q(name: str) -> str:
    """An SQL identifier (a column, a view) that cannot end its quotes."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """An SQL string literal that cannot end its quotes."""
    return "'" + text.replace("'", "''") + "'"


def glob_escape(path: str) -> str:
    """``path`` as a glob pattern that matches that path only (DuckDB and fsspec alike)."""
    return _GLOB_RE.sub(r"[\1]", path)


def has_glob(text: str) -> bool:
    return any(c in GLOB_CHARS for c in text)


def duck_globbable(path: str) -> bool:
    """Whether DuckDB's local glob can reach ``path`` at all (it skips every name with a backslash)."""
    return "\\" not in path


def duck_path(path: str, *, local: bool) -> str:
    """A file's path as DuckDB's readers take it: they glob every path they are given, a list's items
    too, so the path is escaped; a local path DuckDB cannot glob (a backslash) goes as it is, which
    DuckDB opens directly as long as it holds no wildcard character."""
    if local and not duck_globbable(path):
        if has_glob(path):
            raise ValueError(f"DuckDB cannot read a local path holding both a backslash and one of * ? [: {path!r}")
        return path
    return glob_escape(path)


def parquet_source(folder: str, pattern: str, files: Iterable[str], *, local: bool, extra: str = "") -> str:
    """``read_parquet(...)`` over the files of ``folder`` that ``pattern`` (a glob of names, written by
    the caller, never user text) matches: the escaped folder plus the pattern (one listing when DuckDB
    binds it), or, where DuckDB cannot glob the folder's path, the ``files`` (full paths) by name."""
    if local and not duck_globbable(folder):
        names = ", ".join(lit(duck_path(f, local=local)) for f in files)
        return f"read_parquet([{names}]{extra})"
    return f"read_parquet({lit(glob_escape(folder.rstrip('/')) + '/' + pattern)}{extra})"


# ---------------------------------------------------------------------------------------- DuckDB


def duck_type(t: pa.DataType) -> str | None:
    """DuckDB's name of an Arrow type, for the types the catalog casts (fixed-size vectors)."""
    if pa.types.is_fixed_size_list(t):
        inner = duck_type(t.value_type)
        return f"{inner}[{t.list_size}]" if inner else None
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_float16(t):
        return "FLOAT"
    if pa.types.is_integer(t):
        return {8: "TINYINT", 16: "SMALLINT", 32: "INTEGER", 64: "BIGINT"}[t.bit_width]
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    return None


def array_casts(schema: pa.Schema) -> dict[str, str]:
    """Columns that Parquet stores as lists but are fixed-size arrays in Arrow (vectors)."""
    out = {}
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            t = duck_type(f.type)
            if t:
                out[f.name] = t
    return out


def sandbox(con: duckdb.DuckDBPyConnection, allowed_directories: list[str]) -> None:
    """Limit a connection's file access to ``allowed_directories`` and lock that in: no later SET,
    extension load or ATTACH can lift it. DuckDB checks a glob's pattern text against the list before
    it expands it (and each file it finds after), so a directory whose name holds a wildcard character
    is allowed in its escaped spelling too: the spelling every reader of the run gives it."""
    allowed = sorted({*allowed_directories, *(glob_escape(d) for d in allowed_directories)})
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    con.execute("SET allowed_directories=[" + ", ".join(lit(d) for d in allowed) + "]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")


# ---------------------------------------------------------------------------------------- predicates

_PROBE_TABLE = "__ff_rows"
_PROBE = f"SELECT 1 FROM {_PROBE_TABLE} WHERE "
_GUARD = "__ff_guard"


def parse_tree(sql: str) -> dict[str, Any] | None:
    """DuckDB's own parse tree of a SELECT (json_serialize_sql), or None if it cannot serialise it."""
    import duckdb  # here: per-shard workers import q() and never parse a predicate

    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql($1)", [sql]).fetchone()
    except duckdb.Error:
        return None
    finally:
        con.close()
    tree = json.loads(row[0]) if row else None
    return None if not tree or tree.get("error") else tree


def _sql(tree: dict[str, Any]) -> str:
    import duckdb

    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_deserialize_sql($1)", [json.dumps(tree)]).fetchone()
    finally:
        con.close()
    assert row is not None
    return str(row[0])


def _shape(node: Any) -> Any:
    """A parse tree without its source positions: two spellings of one expression compare equal."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_shape(v) for v in node]
    return node


def one_statement(sql: str, what: str) -> Any:
    """The one statement ``sql`` holds (DuckDB's ``Statement``), else a ValueError saying that one
    ``what`` was expected: user SQL and ``export.where`` are both refused here first."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse the {what}: {str(exc).strip().splitlines()[0]}") from None
    if len(statements) != 1:
        raise ValueError(f"expected exactly one {what}, got {len(statements)} statements")
    return statements[0]


def _where_of(sql: str) -> dict[str, Any]:
    """The WHERE expression of ``SELECT 1 FROM <probe> WHERE ...``, refused unless that is the
    whole statement: one SELECT with nothing but the predicate around the probe table."""
    one_statement(sql, "SQL predicate")
    tree = parse_tree(sql)
    if tree is None or len(tree.get("statements", [])) != 1:
        raise ValueError("not a single SQL predicate")
    node = tree["statements"][0]["node"]
    extra = [k for k in ("modifiers", "group_expressions", "group_sets", "having", "qualify", "sample")
             if node.get(k)]
    from_table = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or extra or (node.get("cte_map") or {}).get("map")
            or len(node.get("select_list", [])) != 1 or from_table.get("type") != "BASE_TABLE"
            or from_table.get("table_name") != _PROBE_TABLE or node.get("where_clause") is None):
        what = ", ".join(extra) or "a clause or statement around the expression"
        raise ValueError(f"expected one predicate expression, got {what}")
    where: dict[str, Any] = node["where_clause"]
    if '"SUBQUERY"' in json.dumps(where):
        raise ValueError("subqueries are not allowed in a predicate")
    return where


def predicate_sql(text: str) -> str:
    """A user's row predicate as ONE parenthesised SQL expression, re-emitted from DuckDB's own parse
    tree (comments dropped, every operator parenthesised), safe to place after ``... AND``.

    The text is parsed as it stands after ``WHERE`` (never inside parentheses we add, which
    ``true) OR (true`` would close). Refused with a ValueError: an empty text, several statements,
    anything that is not a bare boolean expression (``ORDER BY``, ``UNION``, ``LIMIT``, a trailing
    ``; COPY ...``) and subqueries (a predicate over a sample's columns needs none). The re-emitted
    expression is parsed once more behind another condition and must come back as that condition
    AND the same expression: what it returns cannot reach outside its parentheses."""
    if not text or not text.strip():
        raise ValueError("expected one SQL predicate such as \"quality__yaw < 30\", got an empty text")
    tree = parse_tree(_PROBE + text)
    where = _where_of(_PROBE + text)
    assert tree is not None  # _where_of parsed it
    body = _sql(tree)
    if not body.startswith(_PROBE):
        raise ValueError("not a single SQL predicate")
    out = "(" + body[len(_PROBE):] + ")"
    # DuckDB flattens nested ANDs: the guard joins the predicate's own conjuncts, or the predicate.
    guarded = _shape(_where_of(f"{_PROBE}{_GUARD} AND {out}"))
    own = _shape(where)
    expected = [_shape(_where_of(_PROBE + _GUARD)),
                *(own["children"] if own.get("type") == "CONJUNCTION_AND" else [own])]
    if guarded.get("type") != "CONJUNCTION_AND" or guarded.get("children") != expected:
        raise ValueError("not a single SQL predicate")
    return out
