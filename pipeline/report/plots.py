"""The report's plots: matplotlib figures rendered to SVG text and inlined in the page.

Figures are built with the object-oriented API (``Figure`` + its own canvas), never pyplot, so no
GUI backend is picked and nothing global is shared between reports. Text stays text in the SVG
(``svg.fonttype: none``), which keeps each plot a few kB; the hash salt makes the output stable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from pipeline.report.queries import Histogram

KEPT = "#3b7dd8"
DROPPED = "#e0703a"
LINE = "#b0182a"
RC: Any = {"svg.fonttype": "none", "svg.hashsalt": "facefoundry-report", "font.size": 8,
      "axes.spines.top": False, "axes.spines.right": False}


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with rc_context(RC):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def histogram_svg(h: Histogram) -> str:
    with rc_context(RC):
        fig = Figure(figsize=(4.2, 2.4))
        ax = fig.add_subplot()
        left, width = h.edges[:-1], h.edges[1] - h.edges[0]
        ax.bar(left, h.kept, width=width, align="edge", color=KEPT, label="kept")
        ax.bar(left, h.dropped, width=width, align="edge", bottom=h.kept, color=DROPPED, label="dropped")
        for x, label in h.lines:
            ax.axvline(x, color=LINE, linestyle="--", linewidth=1.2, label=label)
        ax.set_title(f"{h.stage}.{h.column}")
        ax.set_xlabel(h.column)
        ax.set_ylabel("samples")
        ax.legend(frameon=False, fontsize=7)
        return _svg(fig)


def stage_time_svg(stages: Sequence[str], wall_s: Sequence[float], busy_per_worker_s: Sequence[float]) -> str:
    return _stage_bars(stages, [(0.2, wall_s, KEPT, "wall span"), (-0.2, busy_per_worker_s, DROPPED, "busy / worker")],
                       "seconds", "time per stage")


def throughput_svg(stages: Sequence[str], capacity: Sequence[float], wall_rate: Sequence[float]) -> str:
    return _stage_bars(stages, [(-0.2, capacity, KEPT, "capacity × workers"), (0.2, wall_rate, DROPPED, "wall rate")],
                       "rows / s", "throughput per stage", log=True)


def _stage_bars(stages: Sequence[str], bars: Sequence[tuple[float, Sequence[float], str, str]], xlabel: str,
                title: str, log: bool = False) -> str:
    """Two bars per stage, one row a stage: each bar (offset from the row, values, colour, label);
    ``log``: a log x axis when any value is positive."""
    with rc_context(RC):
        fig = Figure(figsize=(5.0, 0.3 * len(stages) + 0.9))
        ax = fig.add_subplot()
        ys = list(range(len(stages)))
        for offset, values, color, label in bars:
            ax.barh([y + offset for y in ys], values, height=0.4, color=color, label=label)
        ax.set_yticks(ys, list(stages))
        ax.invert_yaxis()
        if log and any(v > 0 for _, values, _, _ in bars for v in values):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7)
        return _svg(fig)
