"""The balance tables of the dataset card and report: counts of each attribute, overall and per split.

Attributes are the low-cardinality string columns of the export selection (pose bins, CLIP labels,
gender); identifiers and decision columns are not attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from stages.base import IDENTITY_ID, KEY, PARENT_ID, SAMPLE_ID

NOT_ATTRIBUTES = frozenset({SAMPLE_ID, KEY, IDENTITY_ID, PARENT_ID, "split", "export_key", "export_shard",
                            "src_shard", "label", "source_key", "embedding_space", "embedding_metric"})


def attribute_columns(table: pa.Table, max_bins: int = 20) -> list[str]:
    """Low-cardinality string / bool columns: the attributes worth a balance table."""
    out = []
    for name in table.column_names:
        col = table.column(name)
        if name in NOT_ATTRIBUTES or name.rsplit(".", 1)[-1] in NOT_ATTRIBUTES:
            continue
        categorical = pa.types.is_string(col.type) or pa.types.is_boolean(col.type)
        if categorical and len(pc.unique(col)) <= max_bins:
            out.append(name)
    return out


def balance_counts(table: pa.Table, attributes: Sequence[str] | None = None,
                   split_column: str = "split") -> pa.Table:
    """Counts per (attribute, bin, split); struct columns (DuckDB's per-stage rows) are flattened
    first, so ``labels.pose_bin`` works. A missing split column counts everything as ``all``."""
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    attrs = list(attributes) if attributes is not None else attribute_columns(table)
    splits = (table.column(split_column).to_pylist() if split_column in table.column_names
              else ["all"] * table.num_rows)
    rows: dict[tuple[str, str, str], int] = {}
    for attr in attrs:
        if attr not in table.column_names:
            raise KeyError(f"balance: no column {attr!r} (columns: {', '.join(table.column_names)})")
        for value, split in zip(table.column(attr).to_pylist(), splits, strict=True):
            k = (attr, "(none)" if value is None else str(value), str(split))
            rows[k] = rows.get(k, 0) + 1
    keys = sorted(rows)
    return pa.table({
        "attribute": pa.array([k[0] for k in keys], pa.string()),
        "bin": pa.array([k[1] for k in keys], pa.string()),
        "split": pa.array([k[2] for k in keys], pa.string()),
        "count": pa.array([rows[k] for k in keys], pa.int64()),
    })


def balance_report(table: pa.Table, attributes: Sequence[str] | None = None,
                   split_column: str = "split") -> str:
    """Markdown for the dataset card: one row per attribute bin, one count column per split, plus the
    bin's share of all samples. Empty string when there is nothing to report."""
    counts = balance_counts(table, attributes, split_column)
    cells = {(r["attribute"], r["bin"], r["split"]): r["count"] for r in counts.to_pylist()}
    return balance_report_from_counts(cells)


def balance_report_from_counts(counts: Mapping[tuple[str, str, str], int], max_bins: int | None = None) -> str:
    """The same markdown from (attribute, bin, split) -> count, e.g. summed over the export's writer
    tasks (each counts its own rows; no process sees all exported samples). Attributes with more
    than ``max_bins`` bins are not attributes (ids, free text) and are left out."""
    bins: dict[str, set[str]] = {}
    for attr, bin_, _ in counts:
        bins.setdefault(attr, set()).add(bin_)
    keep = {a for a, b in bins.items() if max_bins is None or len(b) <= max_bins}
    cells: dict[tuple[str, str], dict[str, int]] = {}
    for (attr, bin_, split), n in counts.items():
        if attr in keep:
            cells.setdefault((attr, bin_), {})[split] = cells.get((attr, bin_), {}).get(split, 0) + n
    if not cells:
        return ""
    splits = sorted({s for per in cells.values() for s in per}, key=lambda s: (s != "train", s != "val", s))
    totals: dict[str, int] = {}
    for (attr, _), per in cells.items():
        totals[attr] = totals.get(attr, 0) + sum(per.values())
    lines = ["| attribute | bin | " + " | ".join(splits) + " | share |",
             "|---|---|" + "---|" * len(splits) + "---|"]
    for (attr, bin_), per in sorted(cells.items()):
        share = sum(per.values()) / totals[attr]
        per_split = " | ".join(str(per.get(s, 0)) for s in splits)
        lines.append(f"| {attr} | {bin_} | {per_split} | {share:.1%} |")
    return "\n".join(lines)
