"""Bounds on one query: a timeout, a cap on the process's memory, and stop signals that act at once.

DuckDB's ``memory_limit`` bounds its buffer manager only; the rows a result hands to Arrow and
Python (a batch of 100 MB strings, say) are outside it. So the guard watches the resident memory of
the process and stops the query when what it added since the guard was made passes the cap (the
host's own memory, an interpreter or a test process holding models, is not the query's), and gives
DuckDB a share of the cap so that DuckDB spills to disk before the guard has to stop anything.

The query runs in a worker thread while the calling (main) thread supervises: Python runs signal
handlers only in the main thread and only between bytecodes, so a main thread blocked inside
DuckDB would hold a Ctrl-C until the query ended. Stopping is ``interrupt()`` on every connection the
worker registered; a worker that does not end within ``GRACE_S`` after that (a write blocked on a
full pipe, one C call building a huge batch) is abandoned: the registered cleanups run and the
caller is told, so it can end the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def parse_size(text: str) -> int:
    """Bytes of a size written as DuckDB writes them: ``2GB`` (10^9), ``512MiB`` (2^20), ``1.5gb``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]) if m else 0
    if n <= 0:
        raise ValueError(f"expected a size such as 2GB or 512MiB, got {text!r}")
    return n


def human_size(n: int) -> str:
    return f"{n / 10**9:.2f} GB" if n >= 10**9 else f"{n / 10**6:.0f} MB"


def rss_bytes() -> int:
    """The process's resident memory now (Linux), else its peak (what getrusage offers elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class Stopped(Exception):
    """The guard stopped the query. ``reason``: ``timeout``, ``memory`` or a signal name
    (``SIGINT``, ``SIGTERM``). ``abandoned``: the worker did not end and is still running."""

    def __init__(self, reason: str, detail: str, *, abandoned: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.abandoned = abandoned


class QueryGuard:
    POLL_S = 0.05
    GRACE_S = 0.5
    # DuckDB's share of what the cap leaves: the rest is for the Arrow batches being written out.
    DUCKDB_SHARE = 0.75

    def __init__(self, *, timeout_s: float | None = None, memory_bytes: int | None = None) -> None:
        self.timeout_s = timeout_s or None
        self.memory_bytes = memory_bytes
        self._base = rss_bytes()  # what the process held before the query
        self._lock = threading.Lock()
        self._interrupts: dict[int, Callable[[], None]] = {}
        self._cleanups: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._stopped: Stopped | None = None
        self._abandon_now = False

    def duckdb_memory_limit(self) -> str | None:
        """DuckDB's ``memory_limit`` under this cap: a share of what the query has not used yet."""
        if self.memory_bytes is None:
            return None
        left = max(self.memory_bytes - self.used_bytes(), 0)
        return f"{max(int(left * self.DUCKDB_SHARE), 16 * 2**20)}B"

    @contextlib.contextmanager
    def attached(self, interrupt: Callable[[], None] | None = None,
                 cleanup: Callable[[], None] | None = None) -> Iterator[None]:
        """Register what stops the worker's current work (a connection's ``interrupt``) and what an
        abandoned worker leaves to clean (its temporary folder), for as long as the block runs."""
        with self._lock:
            key = self._next
            self._next += 1
            if interrupt is not None:
                self._interrupts[key] = interrupt
            if cleanup is not None:
                self._cleanups[key] = cleanup
        try:
            self.check()
            yield
        finally:
            with self._lock:
                self._interrupts.pop(key, None)
                self._cleanups.pop(key, None)

    def check(self) -> None:
        """Raise the stop, if one was asked for: the worker calls this between batches."""
        if self._stopped is not None:
            raise self._stopped

    def stop(self, reason: str, detail: str) -> None:
        with self._lock:
            if self._stopped is None:
                self._stopped = Stopped(reason, detail)
        self._interrupt_all()

    def _interrupt_all(self) -> None:
        self._call_each(self._interrupts)

    def _call_each(self, registered: dict[int, Callable[[], None]]) -> None:
        """Every registered call, each once, whatever the others raise: stopping must reach them all."""
        with self._lock:
            calls = list(registered.values())
        for call in calls:
            with contextlib.suppress(Exception):
                call()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopped is not None:
            self._abandon_now = True  # a second Ctrl-C: do not wait for the worker
        name = signal.Signals(signum).name
        self.stop(name, f"query stopped by {name}")

    def run(self, work: Callable[[], T], *, signals: bool = False) -> T:
        """Run ``work`` in a worker thread under the bounds; with ``signals``, SIGINT and SIGTERM stop
        it (the handlers are in place only while it runs, and only from the main thread).

        Raises Stopped when a bound or a signal stopped the work, else what the work raised."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # handed to the calling thread
                outcome["error"] = exc

        worker = threading.Thread(target=target, name="ff-query", daemon=True)
        previous: dict[signal.Signals, Any] = {}
        if signals and threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                previous[s] = signal.signal(s, self._on_signal)
        start = time.monotonic()
        stopped_at: float | None = None
        try:
            worker.start()
            while True:
                worker.join(self.POLL_S)
                if not worker.is_alive():
                    break
                now = time.monotonic()
                if self._stopped is None:
                    self._check_bounds(now - start)
                if self._stopped is not None:
                    stopped_at = stopped_at if stopped_at is not None else now
                    self._interrupt_all()  # again: a query may have started after the first call
                    if self._abandon_now or now - stopped_at >= self.GRACE_S:
                        self._abandon()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self._stopped is not None:
            raise self._stopped
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def used_bytes(self) -> int:
        """Resident memory the process gained since the guard was made."""
        return max(rss_bytes() - self._base, 0)

    def _check_bounds(self, elapsed: float) -> None:
        if self.timeout_s is not None and elapsed >= self.timeout_s:
            self.stop("timeout", f"query stopped after {self.timeout_s:g} s")
            return
        if self.memory_bytes is not None:
            used = self.used_bytes()
            if used > self.memory_bytes:
                self.stop("memory", f"query stopped: memory {human_size(used)} > {human_size(self.memory_bytes)}")

    def _abandon(self) -> None:
        self._call_each(self._cleanups)
        assert self._stopped is not None
        raise Stopped(self._stopped.reason, self._stopped.detail, abandoned=True)
