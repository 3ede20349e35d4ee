"""`<run>/report/index.html`: one self-contained page a person can open after a run.

It shows per-stage counts, throughput and time; score histograms per filter with their thresholds;
the balance tables; the identity grouping's method, groups and (with ground truth) purity, pairwise and
BCubed scores; drops grouped by rule with example thumbnails; identity sheets for samples
dropped as not their identity; and a few kept samples. Images and plots are inlined (data: URIs and
SVG), so the file can be mailed or opened from an object store. Every number is a DuckDB aggregation
over the manifests; only the handful of example rows is read as rows, and only the byte ranges of
their images are read from the tars.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from manifests.catalog import Catalog
from manifests.layout import EXPORT_DIR, EXPORT_MANIFEST, REPORT_FILE
from manifests.storage import RunStorage
from pipeline.engine.rundir import read_run_file
from pipeline.report import plots, queries
from pipeline.report.thresholds import stage_kinds_and_thresholds
from pipeline.report.thumbs import thumbnail_uri
from pipeline.status import run_status, stage_order
from pipeline.summaries import grouping_figures, read_summary
from stages.base import StageKind

KEPT_THUMBS = 12
MAX_HIST_PER_STAGE = 6

_env = Environment(loader=PackageLoader("pipeline.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                   trim_blocks=True, lstrip_blocks=True)


def _histograms(con: Any, order: list[str], kinds: dict[str, StageKind],
                lines: dict[tuple[str, str], list[tuple[float, str]]]) -> list[dict[str, Any]]:
    out = []
    for sid in order:
        numeric = queries.numeric_columns(con, sid)
        wanted = [c for (s, c) in lines if s == sid and c in numeric]
        kind = kinds.get(sid)
        if kind == StageKind.FILTER:
            wanted += [c for c, t in numeric.items() if t in {"FLOAT", "DOUBLE"} and c not in queries.COMMON_NAMES]
        elif kind == StageKind.GLOBAL:
            wanted += [c for c, t in numeric.items() if t in {"FLOAT", "DOUBLE"} and c.endswith("_score")]
        fitted = queries.column_constant(con, sid, "threshold") if "threshold" in numeric else None
        source = queries.text_constant(con, sid, "threshold_source") if fitted is not None else None
        for column in list(dict.fromkeys(wanted))[:MAX_HIST_PER_STAGE]:
            h = queries.histogram(con, sid, column)
            if h is None:
                continue
            h.lines = list(lines.get((sid, column), []))
            if fitted is not None and kind == StageKind.GLOBAL and column.endswith("_score"):
                h.lines.append((fitted, f"stage threshold {fitted:.3g}" + (f" ({source})" if source else "")))
            out.append({"stage": sid, "column": column, "svg": Markup(plots.histogram_svg(h)), "total": h.total,
                        "dropped": sum(h.dropped), "lines": [lbl for _, lbl in h.lines if lbl]})
    return out


def _summaries(store: RunStorage, order: list[str]) -> list[dict[str, Any]]:
    out = []
    for sid in order:
        summary = read_summary(store, sid)
        if summary is not None:
            out.append({"stage": sid, "text": json.dumps(summary, indent=1, sort_keys=True)})
    return out


def build_report(store: RunStorage) -> str:
    st = run_status(store)
    order = stage_order(store)
    state = read_run_file(store)
    config = state.config if state else {}
    kinds, lines = stage_kinds_and_thresholds(config, store.url)
    catalog = Catalog(store, order)
    # The path as DuckDB's read_parquet takes it (escaped: the run directory may hold wildcards).
    manifest = catalog.duck_path(store.path(EXPORT_DIR, EXPORT_MANIFEST)) if store.exists(EXPORT_DIR, EXPORT_MANIFEST) \
        else None
    with catalog.connect(read_only=True) as con:
        names = queries.stage_names(con)
        histograms = _histograms(con, order, kinds, lines)
        drops = queries.drops_by_rule(con)
        sheets = queries.identity_sheets(con, names)
        balance = queries.balance_tables(con, names, manifest)
        kept = queries.kept_examples(con, manifest, len(order) - 1, KEPT_THUMBS) if order else []
        wanted = [(e["sample_id"], e["upto"]) for g in drops for e in g["examples"]]
        for s in sheets:
            wanted += [(x["sample_id"], x["upto"]) for x in [s["sample"], *s["others"]]]
        wanted += [(e["sample_id"], e["upto"]) for e in kept]
        locations = queries.pixel_locations(con, wanted)

    def thumb(example: dict[str, Any]) -> dict[str, Any]:
        return {**example, "uri": thumbnail_uri(store, locations.get((example["sample_id"], example["upto"])))}

    for g in drops:
        g["examples"] = [thumb(e) for e in g["examples"]]
    for s in sheets:
        s["sample"] = thumb(s["sample"])
        s["others"] = [thumb(o) for o in s["others"]]
    stages = st["stages"]
    for s in stages:
        cap = s["capacity_per_worker"]
        s["capacity_total"] = cap * s["workers"] if cap else None
        s["busy_per_worker_s"] = s["busy_s"] / s["workers"] if s["workers"] else 0.0
    ids = [s["stage"] for s in stages]
    time_svg = throughput_svg = None
    if any(s["samples"] for s in stages):
        time_svg = Markup(plots.stage_time_svg(ids, [s["wall_s"] for s in stages],
                                               [s["busy_per_worker_s"] for s in stages]))
        throughput_svg = Markup(plots.throughput_svg(ids, [s["capacity_total"] or 0.0 for s in stages],
                                                     [s["wall_rate"] or 0.0 for s in stages]))
    return _env.get_template("index.html.j2").render(
        run=st["run"], complete=st["complete"], stages=stages, export=st["export"], histograms=histograms,
        drops=drops, sheets=sheets, balance=balance, kept=[thumb(e) for e in kept], time_svg=time_svg,
        throughput_svg=throughput_svg, summaries=_summaries(store, order), config_name=config.get("name"),
        grouping=grouping_figures(store, [(sid, names.get(sid, sid)) for sid in order]),
        refill=st["refill"],
    )


def write_report(store: RunStorage) -> str:
    store.write_atomic(build_report(store).encode(), *REPORT_FILE)
    return store.path(*REPORT_FILE)
