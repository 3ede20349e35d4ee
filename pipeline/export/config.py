"""The export config: what is selected, how it is split and sharded, and what the dataset card says.

``where`` is ONE boolean predicate over the columns of ``tables/samples`` (``stage__column``; see
``manifests.tables``). It is parsed by DuckDB's own parser and refused unless it is exactly one
row-level predicate: no second statement, no set operation, no subquery, no LIMIT. It then runs
on an in-memory connection whose external access is disabled, over the Arrow data of one partition.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import duckdb
from pydantic import Field, field_validator

from facekit.common import Strict

WHERE_TABLE = "samples"


class Threshold(Strict):

    min: float | None = None
    max: float | None = None
    max_abs: float | None = None


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check_where(where: str) -> str:
    """Refuse anything but one row-level boolean predicate; returns it unchanged."""
    if not where.strip():
        raise ValueError("must be a SQL predicate, got an empty string")
    sql = f"SELECT 1 FROM {WHERE_TABLE} WHERE ({where})"
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(f"not a SQL predicate: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError("must be ONE predicate (a WHERE condition), not statements")
    con = duckdb.connect()
    try:
        row = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        doc: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
    finally:
        con.close()
    if doc.get("error") or len(doc.get("statements", [])) != 1:
        raise ValueError(f"not a SQL predicate: {doc.get('error_message', 'cannot parse')}")
    node = doc["statements"][0]["node"]
    from_table = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("group_expressions")
            or node.get("having") or node.get("qualify") or node.get("sample")
            or (node.get("cte_map") or {}).get("map") or len(node.get("select_list", [])) != 1
            or from_table.get("type") != "BASE_TABLE" or from_table.get("table_name") != WHERE_TABLE
            or node.get("where_clause") is None):
        raise ValueError("must be ONE predicate (a WHERE condition) over the samples table")
    if any(n.get("class") == "SUBQUERY" or n.get("type") == "SUBQUERY" for n in _walk(node["where_clause"])):
        raise ValueError("must be a row-level predicate: subqueries are not allowed")
    return where


class ExportConfig(Strict):

    enabled: bool = True
    shard_size: int = Field(1000, ge=1, description="target samples per training shard")
    min_shards_per_split: int = Field(
        8, ge=1, description="at least this many shards per split (one per data-loader worker) when the split "
        "has that many samples; the card warns when it has fewer")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of identities held out")
    min_images_per_identity: int = Field(2, ge=1)
    thresholds: dict[str, Threshold] = Field(
        default_factory=dict, description="'stage.column': {min, max, max_abs}; replaces that stage's own decision"
    )
    where: str | None = Field(None, description="one SQL predicate over tables/samples columns (stage__column)")
    ignore_decisions: tuple[str, ...] = Field((), description="stages whose own keep decision is ignored")
    image_format: Literal["png", "jpg"] | None = Field(None, description="None keeps the bytes as they are")
    metadata_columns: tuple[str, ...] = Field(
        (), description="'stage.column' values copied into each sample's .json (e.g. labels.pose_bin)"
    )
    extra_members: dict[str, str] = Field(
        default_factory=dict,
        description="tar extension -> 'stage.column' of bytes written beside the image, e.g. "
        "{'degraded.png': 'degrade.degraded'} for (degraded, clean) enhancement pairs",
    )
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.+\-]*$",
                         description="the dataset card's license: a Hugging Face Hub license id (cc-by-4.0, mit, "
                         "other, ...)")
    description: str = Field("", max_length=4000, description="one paragraph for the dataset card")
    pretty_name: str | None = Field(None, max_length=200)
    task_memory_gb: float = Field(1.0, gt=0.0, le=512.0, description="memory declared by each export task")
    rows_per_task: int = Field(50_000, ge=1, description="samples a plan or writer task handles at most")

    @field_validator("where")
    @classmethod
    def _one_predicate(cls, value: str | None) -> str | None:
        return None if value is None else check_where(value)
