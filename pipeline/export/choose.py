"""The export plan's second pass: per range of identity hashes, which images of each identity win.

The first pass wrote every partition's candidates sorted by a hash of the identity id, so one task
reads all rows of the identities whose hash lies in its range (row-group statistics skip the rest):
memory per task is about ``rows_per_task`` rows whatever the run's size. Each task applies the
identity decisions of the driver (``select_identities``: one row per identity) and ``pick_images``
within each kept identity, then writes

- ``_plan/part-K``: the kept rows, writer columns only, sorted by the sample hash (the writers read
  their shard ranges of these files);
- ``_emb/part-K``: sample id, identity and embedding of the kept rows, when the run has one, for the
  split's leak checks (centroids and the image-level nearest neighbours);

and returns the drops by rule (with examples), and per kept identity its image count, its stratum
and the dedup groups of its images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.export.config import Identities
from pipeline.export.identities import NO_BIN, available_bins, image_plan, pick_images
from pipeline.export.order import units
from pipeline.export.plan import MAX_EXAMPLES, SELECTION_COLUMNS

EXPORT_STAGE = "export"


@dataclass
class ChosenPart:
    kept: pa.Table  # identity_id, n, strat
    dup_links: list[tuple[str, str]] = field(default_factory=list)  # (dedup group, identity)
    drops: dict[str, dict[str, Any]] = field(default_factory=dict)  # rule -> count, examples
    space: tuple[str, str] | None = None  # (embedding space, metric) of the kept rows


def hash_ranges(rows: int, rows_per_task: int) -> list[tuple[float, float]]:
    """Identity-hash ranges of about ``rows_per_task`` candidate rows each (hashes are uniform)."""
    k = max(1, -(-rows // max(rows_per_task, 1)))
    return [(i / k, (i + 1) / k) for i in range(k)]


def read_identity_range(store: Any, cand_files: list[tuple[str, ...]], lo: float, hi: float) -> pa.Table:
    ds = pads.dataset([store.path(*p) for p in cand_files], filesystem=store.fs, format="parquet")
    upper = pads.field("ihash") < hi if hi < 1.0 else pads.field("ihash") <= 1.0
    t = ds.to_table(filter=(pads.field("ihash") >= lo) & upper)
    return t.sort_by([("identity_id", "ascending"), ("sample_id", "ascending")])


def _mode(values: list[Any]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        k = NO_BIN if v is None else str(v)
        counts[k] = counts.get(k, 0) + 1
    return min(counts, key=lambda b: (-counts[b], b))


def choose_range(store: Any, cand_files: list[tuple[str, ...]], decisions: pa.Table, lo: float, hi: float,
                 cfg: Identities, out_plan: tuple[str, ...], out_emb: tuple[str, ...] | None) -> ChosenPart:

    t = read_identity_range(store, cand_files, lo, hi)
    rule_of = dict(zip(decisions.column("identity_id").to_pylist(), decisions.column("rule").to_pylist(),
                       strict=True))
    ids = t.column("identity_id").to_pylist()
    rules: list[str | None] = [None] * t.num_rows
    kept_ids: list[str] = []
    kept_n: list[int] = []
    strata: list[str] = []
    strat = t.column("sel_strat").to_pylist()
    start = 0
    while start < t.num_rows:
        end = start
        while end < t.num_rows and ids[end] == ids[start]:
            end += 1
        ident = ids[start]
        decided = rule_of.get(ident, "identity_too_small")
        if decided is not None:
            rules[start:end] = [decided] * (end - start)
        else:
            rows = t.slice(start, end - start)
            picked = pick_images(rows, image_plan(available_bins(rows), cfg), cfg)
            rules[start:end] = picked
            chosen = [strat[start + i] for i, r in enumerate(picked) if r is None]
            kept_ids.append(ident)
            kept_n.append(len(chosen))
            strata.append(_mode(chosen))
        start = end
    mask = pa.array([r is None for r in rules], pa.bool_())
    out = ChosenPart(pa.table({"identity_id": pa.array(kept_ids, pa.string()), "n": pa.array(kept_n, pa.int64()),
                               "strat": pa.array(strata, pa.string())}))
    sids = t.column("sample_id").to_pylist()
    for sid, rule in zip(sids, rules, strict=True):
        if rule is not None:
            entry = out.drops.setdefault(rule, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < MAX_EXAMPLES:
                entry["examples"].append((sid, ""))
    kept = t.filter(mask)
    dups = kept.column("sel_dup").to_pylist()
    out.dup_links = sorted({(g, i) for g, i in zip(dups, kept.column("identity_id").to_pylist(), strict=True)
                            if g is not None})
    if out_emb is not None and "sel_emb" in kept.column_names:
        valid = pc.is_valid(kept.column("sel_emb"))
        emb = kept.filter(valid).select(["sample_id", "identity_id", "sel_emb", "sel_space", "sel_metric"])
        spaces = {(s, m) for s, m in zip(emb.column("sel_space").to_pylist(), emb.column("sel_metric").to_pylist(),
                                         strict=True)}
        if len(spaces) > 1:
            raise ValueError(f"export.splits: more than one embedding space among the exported samples "
                             f"({sorted(spaces)}): similarities are only comparable within one space")
        out.space = spaces.pop() if spaces else None
        check = pa.array(units("check:", emb.column("sample_id")), pa.float64())
        emb = emb.select(["sample_id", "identity_id", "sel_emb"]).append_column("check", check).sort_by("check")
        _write(store, emb, out_emb)
    writer = kept.drop_columns([c for c in SELECTION_COLUMNS if c in kept.column_names])
    _write(store, writer.sort_by([("unit", "ascending"), ("sample_id", "ascending")]), out_plan)
    return out


def _write(store: Any, table: pa.Table, parts: tuple[str, ...]) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=4096, compression="zstd")
    store.write_atomic(buf.getvalue(), *parts)


def merge_drops(parts: list[dict[str, dict[str, Any]]], stage_index: int) -> dict[tuple[int, str, str, str],
                                                                                   dict[str, Any]]:
    """The second pass's drops in the shape of the run's own (``plan.merge_reasons``)."""
    out: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    for part in parts:
        for rule, v in part.items():
            m = out.setdefault((stage_index, EXPORT_STAGE, "dropped", rule), {"count": 0, "examples": []})
            m["count"] += v["count"]
            m["examples"] = sorted(m["examples"] + list(v["examples"]))[:MAX_EXAMPLES]
    return out


def centroids(x: np.ndarray, codes: np.ndarray, size: int, cosine: bool) -> np.ndarray:
    """Per-identity mean vectors (unit length in a cosine space)."""
    from facekit.vector_index import group_sums, normalise_rows

    sums = group_sums(codes, x, size)
    counts = np.bincount(codes, minlength=size).astype(np.float64)[:, None]
    mean = (sums / np.maximum(counts, 1.0)).astype(np.float32)
    return normalise_rows(mean) if cosine else mean
