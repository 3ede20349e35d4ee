"""The one place where user text meets DuckDB and globs: the export predicate re-emitted from DuckDB's
parse tree, and glob escapes that make a path with wildcard characters match itself only (DuckDB's
read_parquet and fsspec's glob, local and in memory)."""

from __future__ import annotations

import uuid
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.sql import glob_escape, lit, parquet_source, predicate_sql
from manifests.storage import move_path, remove_path

ESCAPES = [
    "true) OR (true",
    "true) OR keep IS NULL OR (true",
    "1=1) --",
    "1=1 /* */) OR (1=1",
    "keep --\n) OR (true",
    "keep; DROP TABLE samples",
    "true; COPY (SELECT 1) TO '/tmp/x'",
    "true) UNION SELECT * FROM samples WHERE (true",
    "true UNION SELECT 1",
    "true ORDER BY 1",
    "true LIMIT 1",
    "true GROUP BY 1",
    "sample_id IN (SELECT sample_id FROM read_csv('/etc/passwd'))",
    "EXISTS (SELECT 1)",
    "",
    "   ",
]


@pytest.mark.parametrize("text", ESCAPES)
def test_a_predicate_that_closes_its_parenthesis_or_is_not_one_expression_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        predicate_sql(text)


@pytest.mark.parametrize(("text", "canonical"), [
    ("emb.score > 0.5 and src.keep -- trailing comment", "(((emb.score > 0.5) AND src.keep))"),
    ("keep /* ) OR (true */", "(keep)"),  # a comment hiding a parenthesis is dropped with the comment
    ("name = 'a'')--' OR b", "(((\"name\" = 'a'')--') OR b))"),  # quotes stay inside their literal
    ("x IS NULL OR y", "(((x IS NULL) OR y))"),
    ("a AND (b OR c) AND d", "((a AND (b OR c) AND d))"),
])
def test_a_predicate_comes_back_as_one_parenthesised_expression(text: str, canonical: str) -> None:
    assert predicate_sql(text) == canonical


NAMES = ["r[1]", "r*x", "r?x", "r{a,b}'q", "r]x"]
NEIGHBOURS = ["r1", "rzzx", "rxx", "ra'q", "r]y"]  # what each unescaped name would match as a glob


def _plant(fs: fsspec.AbstractFileSystem, root: str) -> None:
    for name in NAMES + NEIGHBOURS:
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        with fs.open(f"{root}/{name}/part.parquet", "wb") as f:
            pq.write_table(pa.table({"dir": [name]}), f)


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_an_escaped_path_matches_itself_only_in_fsspec_and_duckdb(protocol: str, tmp_path: Path) -> None:
    fs = fsspec.filesystem(protocol)
    root = str(tmp_path) if protocol == "file" else f"/globs-{uuid.uuid4().hex}"
    _plant(fs, root)
    con = duckdb.connect()
    if protocol != "file":
        con.register_filesystem(fs)
    for name in NAMES:
        folder = f"{root}/{name}"
        assert [p.rsplit("/", 2)[-2] for p in fs.glob(glob_escape(folder) + "/*.parquet")] == [name]
        url = folder if protocol == "file" else f"memory://{folder}"
        got = con.execute(f"SELECT list(dir) FROM {parquet_source(url, '*.parquet', [], local=protocol == 'file')}")
        assert got.fetchall() == [([name],)]


def test_a_local_folder_with_a_backslash_is_read_by_its_file_list(tmp_path: Path) -> None:
    """DuckDB's local glob never matches a name with a backslash: the reader names the files."""
    for name in ("r\\b", "rb"):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"dir": [name]}), tmp_path / name / "part.parquet")
    folder = str(tmp_path / "r\\b")
    source = parquet_source(folder, "*.parquet", [folder + "/part.parquet"], local=True)
    assert duckdb.sql(f"SELECT list(dir) FROM {source}").fetchall() == [(["r\\b"],)]
    with pytest.raises(ValueError, match="backslash"):
        parquet_source(folder + "[1]", "*.parquet", [folder + "[1]/part.parquet"], local=True)


def test_moving_and_removing_a_path_with_wildcards_touches_that_path_only() -> None:
    fs = fsspec.filesystem("memory")
    root = f"/mv-{uuid.uuid4().hex}"
    _plant(fs, root)
    move_path(fs, f"{root}/r[1]/part.parquet", f"{root}/r[1]/moved.parquet")
    assert fs.exists(f"{root}/r[1]/moved.parquet") and fs.exists(f"{root}/r1/part.parquet")
    remove_path(fs, f"{root}/r*x", recursive=True)
    assert not fs.exists(f"{root}/r*x/part.parquet")
    assert all(fs.exists(f"{root}/{n}/part.parquet") for n in [*NEIGHBOURS, "r?x", "r{a,b}'q"])


def test_a_literal_is_one_quoted_string() -> None:
    for text in ["it's", "a'); DROP TABLE x; --", "''", "\\'"]:
        assert duckdb.sql(f"SELECT {lit(text)}").fetchall() == [(text,)]
