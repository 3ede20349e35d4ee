"""What global stages say about themselves (``report/<stage>.summary.json``), read for the report page and
the dataset card: the raw summaries, and the identity grouping's figures pulled out of them (method,
groups and, where the run had ground truth, the scores face-clustering papers report)."""

from __future__ import annotations

import json
from typing import Any

from manifests.layout import stage_summary_path
from manifests.storage import RunStorage

MAX_SUMMARY_BYTES = 64 << 10
GROUPING_STAGE = "grouping"
# (summary key, label) of the grouping scores against ground truth, in the order they are shown.
GROUPING_SCORES = (
    ("purity", "purity"), ("inverse_purity", "inverse purity"),
    ("pairwise_precision", "pairwise P"), ("pairwise_recall", "pairwise R"), ("pairwise_f", "pairwise F"),
    ("bcubed_precision", "BCubed P"), ("bcubed_recall", "BCubed R"), ("bcubed_f", "BCubed F"),
)


def read_summary(store: RunStorage, stage_id: str) -> dict[str, Any] | None:
    """The stage's summary, or None when it wrote none (or an unreadable or oversized one)."""
    path = stage_summary_path(stage_id)
    if not store.exists(*path):
        return None
    raw = store.read_bytes(*path)
    if len(raw) > MAX_SUMMARY_BYTES:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def grouping_figures(store: RunStorage, stages: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per grouping stage (``(stage id, stage name)`` pairs, in run order) that wrote a summary: its method,
    threshold (and whether it was given, fitted or the space's default), group counts and, with ground
    truth, its scores (``scores``: label -> value)."""
    out = []
    for sid, name in stages:
        if name != GROUPING_STAGE:
            continue
        s = read_summary(store, sid)
        if s is None:
            continue
        scores = {label: v for key, label in GROUPING_SCORES if (v := _number(s.get(key))) is not None}
        out.append({"stage": sid, "method": s.get("method"), "threshold": _number(s.get("threshold")),
                    "threshold_source": s.get("threshold_source"),
                    "groups": s.get("groups"), "singletons": s.get("singletons"),
                    "largest_group": s.get("largest_group"), "gt_identities": s.get("gt_identities"),
                    "gt_column": s.get("gt_column"), "scores": scores})
    return out


def _threshold_text(figures: dict[str, Any]) -> str:
    if figures["threshold"] is None:
        return ""
    source = f", {figures['threshold_source']}" if figures.get("threshold_source") else ""
    return f"threshold {figures['threshold']:.3g}{source}"


def grouping_line(figures: dict[str, Any]) -> str:
    """One sentence of a grouping stage's figures (the dataset card's line)."""
    how = ", ".join(x for x in (f"method {figures['method']}" if figures["method"] else "",
                                _threshold_text(figures))
                    if x)
    text = f"`{figures['stage']}`" + (f" ({how})" if how else "") + f": {figures['groups']} groups"
    extra = [f"{figures[k]} {label}" for k, label in (("singletons", "singletons"), ("largest_group", "in the largest"))
             if figures.get(k) is not None]
    if extra:
        text += " (" + ", ".join(extra) + ")"
    if figures["scores"]:
        truth = f" `{figures['gt_column']}`" if figures.get("gt_column") else ""
        ids = f" ({figures['gt_identities']} identities)" if figures.get("gt_identities") is not None else ""
        text += f"; against the ground truth{truth}{ids}: " + ", ".join(
            f"{label} {v:.3f}" for label, v in figures["scores"].items())
    return text + "."
