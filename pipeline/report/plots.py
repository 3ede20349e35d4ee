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
    with rc_context(RC):
        fig = Figure(figsize=(5.0, 0.3 * len(stages) + 0.9))
        ax = fig.add_subplot()
        ys = list(range(len(stages)))
        ax.barh([y + 0.2 for y in ys], wall_s, height=0.4, color=KEPT, label="wall span")
        ax.barh([y - 0.2 for y in ys], busy_per_worker_s, height=0.4, color=DROPPED, label="busy / worker")
        ax.set_yticks(ys, list(stages))
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title("time per stage")
        ax.legend(frameon=False, fontsize=7)
        return _svg(fig)


def throughput_svg(stages: Sequence[str], capacity: Sequence[float], wall_rate: Sequence[float]) -> str:
    with rc_context(RC):
        fig = Figure(figsize=(5.0, 0.3 * len(stages) + 0.9))
        ax = fig.add_subplot()
        ys = list(range(len(stages)))
        ax.barh([y - 0.2 for y in ys], capacity, height=0.4, color=KEPT, label="capacity × workers")
        ax.barh([y + 0.2 for y in ys], wall_rate, height=0.4, color=DROPPED, label="wall rate")
        ax.set_yticks(ys, list(stages))
        ax.invert_yaxis()
        if any(v > 0 for v in [*capacity, *wall_rate]):
            ax.set_xscale("log")
        ax.set_xlabel("rows / s")
        ax.set_title("throughput per stage")
        ax.legend(frameon=False, fontsize=7)
        return _svg(fig)
