"""Live per-stage progress: shards done/total, samples/s, kept/dropped/errors."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.engine.execution import Outcomes, ShardResult
from pipeline.terminal import console as make_console


@dataclass
class StageProgress(Outcomes):
    stage_id: str
    kind: str
    total: int
    done: int = 0
    skipped: int = 0
    computed: int = 0
    failed: int = 0
    rows: int = 0
    started: float | None = None
    last: float | None = None

    def add(self, r: ShardResult) -> None:
        now = time.monotonic()
        began = now - r.seconds
        self.started = began if self.started is None else min(self.started, began)
        self.last = now
        self.done += 1
        self.computed += 1
        self.rows += r.rows_out
        self.tally(r)

    @property
    def rate(self) -> float:
        if not self.started or not self.last or self.last <= self.started:
            return 0.0
        return self.rows / (self.last - self.started)


class Progress:
    def __init__(self, stages: list[StageProgress], enabled: bool = True, console: Console | None = None) -> None:
        self.stages = {s.stage_id: s for s in stages}
        self.console = console or make_console(stderr=True)
        self.enabled = enabled
        self._live: Live | None = None
        self.export_note = ""

    def table(self) -> Table:
        t = Table(title="facefoundry", expand=False)
        for col in ("stage", "kind", "shards", "samples/s", "kept", "dropped", "errors"):
            t.add_column(col, justify="left" if col in ("stage", "kind") else "right")
        for s in self.stages.values():
            shards = Text(f"{s.done}/{s.total}" + (f" ({s.skipped} resumed)" if s.skipped else ""))
            if s.failed:
                shards.append(f" {s.failed} failed", "red")
            t.add_row(Text(s.stage_id), Text(s.kind), shards, f"{s.rate:,.1f}" if s.rate else "-",
                      str(s.kept), str(s.dropped), str(s.errors))
        if self.export_note:
            t.caption = self.export_note
        return t

    def update(self, result: ShardResult | None = None) -> None:
        if result is not None:
            self.stages[result.stage_id].add(result)
        if self._live is not None:
            self._live.update(self.table())

    def __enter__(self) -> Progress:
        if self.enabled:
            self._live = Live(self.table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.__exit__(et, ev, tb)
            self._live = None
