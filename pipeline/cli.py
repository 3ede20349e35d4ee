"""The `facefoundry` command line. Library code raises; only this module turns errors into exit codes."""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import functools
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich import box
from rich.table import Table

from pipeline.terminal import console, styled

if TYPE_CHECKING:
    import pyarrow as pa

    from manifests.query_guard import QueryGuard
    from manifests.storage import RunStorage

# Every user error (a bad config, a missing run, bad SQL, an unknown sample) exits 2, as click's own
# usage errors do; 1 means the run itself did not complete.
USER_ERROR = 2
CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=CONTEXT,
                  help="Generate and curate face datasets on Ray, with per-sample lineage.")
out = console()
err = console(stderr=True)


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class _SigtermStop:
    """SIGTERM during a run stops it as Ctrl-C does (committed shards kept, Ray stopped), by raising
    KeyboardInterrupt; whether it came from SIGTERM is remembered here because Ray's waits re-raise a
    signal's exception as a plain KeyboardInterrupt."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the stop under way
        raise KeyboardInterrupt


def _fail(message: str, code: int = USER_ERROR) -> None:
    err.print(styled(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facefoundry")
    except PackageNotFoundError:
        return "unknown (not installed; running from a source tree)"


def _print_version(value: bool) -> None:
    if value:
        out.print(f"facefoundry {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Generate and curate face datasets on Ray, with per-sample lineage."""


# Options several commands take, declared once.
Overrides = Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")]
StartOver = Annotated[bool, typer.Option("--new", help="delete the job's checkpoints and metrics and start over")]
TrainConfigFile = Annotated[Path, typer.Argument(help="the job's training YAML")]

@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    output: Annotated[str, typer.Option("--output", "-o", help="run directory: a path or fsspec URL")],
    set_: Overrides = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (else RAY_ADDRESS, else local)")] = None,
    new: Annotated[bool, typer.Option("--new", help="delete what the output holds and start over")] = False,
    force: Annotated[bool, typer.Option("--force", help="recompute stages whose config changed")] = False,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for the embedded local Ray")] = None,
    progress: Annotated[bool, typer.Option(help="live progress display")] = True,
    py_module: Annotated[list[str] | None, typer.Option(
        "--py-module", help="a folder holding your own stage package: importable without PYTHONPATH, uploaded "
                            "to the cluster with --address (repeatable; also run.py_modules in the config)")] = None,
) -> None:
    """Run a pipeline config end to end (resumes what an earlier run of it committed)."""
    from manifests.storage import StorageURLError
    from pipeline.config import ConfigError, load_config
    from pipeline.engine.cluster import ClusterConnectError, ClusterFitError
    from pipeline.engine.rundir import NotARunError, RunConflictError, RunLockedError, RunOutputError

    if num_cpus is not None and num_cpus < 1:
        _fail(f"--num-cpus must be a whole number of CPUs, 1 or more (got {num_cpus}); leave it out to use "
              f"every CPU of this machine")
    try:
        cfg, stages = load_config(config, set_ or [], py_modules=py_module or [])
        from pipeline.engine.runner import Runner

        runner = Runner(cfg, stages, output, console=err, show_progress=progress)
    except (ConfigError, StorageURLError) as exc:
        _fail(str(exc))
        return
    sigterm = _SigtermStop()
    previous = signal.signal(signal.SIGTERM, sigterm)
    try:
        result = runner.run(force=force, new=new, address=address, num_cpus=num_cpus)
    except (ConfigError, RunConflictError, RunLockedError, RunOutputError, NotARunError, ClusterConnectError,
            ClusterFitError) as exc:
        _fail(str(exc))
        return
    except KeyboardInterrupt:
        stop = "terminated" if sigterm.received else "interrupted"
        err.print(styled("\n", (stop, "yellow"), ": committed shards are kept; run the same command again to resume."))
        raise typer.Exit(128 + (signal.SIGTERM if sigterm.received else signal.SIGINT)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.nothing_to_do:
        err.print(f"run {output}: complete, nothing to do")
        return
    for f in result.failures:
        last = (f["error"].splitlines() or [""])[-1]
        err.print(styled(("failed", "red"), f" {f['stage']} shard {f['shard']}: {last}"))
    _print_next_steps(output, result.complete, result.export)
    if not result.complete:
        raise typer.Exit(1)


def _print_next_steps(output: str, complete: bool, export: dict[str, Any] | None) -> None:
    """Where the run's outputs are: only paths that exist (a failed run has no report, maybe no manifests)."""
    from manifests.layout import EXPORT_CARD, EXPORT_DIR, MANIFESTS_DIR, REPORT_FILE
    from manifests.storage import RunStorage

    store = RunStorage(output)
    state = ("complete", "green") if complete else ("incomplete", "yellow")
    err.print(styled("\nrun ", output, ": ", state, "" if complete else " (run again to resume)"))
    if export:
        s = export["splits"]
        v = export.get("version", "")
        err.print(f"  training shards  {output}/export/{v}/train ({s['train']['samples']} samples, "
                  f"{s['train']['identities']} identities), {output}/export/{v}/val ({s['val']['samples']} samples)")
        if store.exists(EXPORT_DIR, EXPORT_CARD):
            err.print(f"  dataset card     {output}/{EXPORT_DIR}/{EXPORT_CARD}")
    if store.list_files(MANIFESTS_DIR):
        err.print(f"  manifests        {output}/{MANIFESTS_DIR}/<stage>/*.parquet")
    if store.exists(*REPORT_FILE):
        err.print(f"  report           {output}/{'/'.join(REPORT_FILE)}")
    err.print("next:")
    quoted = shlex.quote(output)
    err.print(f"  facefoundry status {quoted}")
    sql = "SELECT stage, reason, count(*) FROM decisions WHERE NOT keep GROUP BY ALL"
    err.print(f'  facefoundry query {quoted} "{sql}"')
    err.print(f"  facefoundry lineage {quoted} <sample_id>")


@app.command()
def status(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Per stage: shards committed/total, samples kept/dropped/errored, throughput, completeness."""
    from manifests.storage import RunStorage, StorageURLError
    from pipeline.status import NotARunError, run_status

    try:
        st = run_status(RunStorage(run_dir))
    except (NotARunError, StorageURLError) as exc:
        _fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(st, default=_jsonable, indent=1) + "\n")
        return
    table = status_table(st)
    if out.measure(table, options=out.options.update_width(10_000)).maximum <= out.width:
        out.print(table)
    else:  # a long stage id: one line per stage rather than squeezed, unreadable columns
        out.print(table.title)
        for s in st["stages"]:
            out.print(styled((s["stage"], "bold")))
            out.print(f"  shards {s['shards_committed']}/{s['shards_total']}  rows {s['samples']}  kept {s['kept']}  "
                      f"dropped {s['dropped']}  errors {s['errors']}  workers {s['workers']}")
            out.print(f"  capacity {_rate(s['capacity_per_worker'])} /s/worker  wall rate {_rate(s['wall_rate'])} /s")
        out.print(table.caption)
    for s in st["stages"]:
        for msg in s.get("not_committed", []):
            out.print(styled(("not committed:", "yellow"), f" {msg}"))
    if st["export"]:
        sp = st["export"]["splits"]
        out.print(f"export: train {sp['train']['samples']} samples / {sp['train']['identities']} identities, "
                  f"val {sp['val']['samples']} / {sp['val']['identities']}")
    else:
        out.print("export: not written")
    if st.get("refill"):
        from pipeline.refill import summary_lines

        for line in summary_lines(st["refill"]):
            out.print(line, highlight=False)


def status_table(st: dict[str, Any]) -> Table:
    """Stage names are never cut; capacity and wall rate are separate columns (see pipeline/status.py)."""
    t = Table(title=f"{st['run']}: {'complete' if st['complete'] else 'incomplete'}", box=box.SIMPLE_HEAD,
              padding=(0, 1), pad_edge=False, collapse_padding=True, show_edge=False,
              caption="capacity: rows per busy second of one worker; wall rate: rows per second of the stage's "
                      "wall span (--json has the spans). Wall rate far below capacity x workers: the stage waited.")
    width = max([len("stage"), *(len(s["stage"]) for s in st["stages"])])
    t.add_column("stage", no_wrap=True, min_width=width)
    for col in ("shards", "rows", "kept", "dropped", "errors", "workers", "capacity\n/s/worker", "wall rate\n/s"):
        t.add_column(col, justify="right", overflow="fold")
    for s in st["stages"]:
        t.add_row(s["stage"], f"{s['shards_committed']}/{s['shards_total']}", str(s["samples"]), str(s["kept"]),
                  str(s["dropped"]), str(s["errors"]), str(s["workers"]), _rate(s["capacity_per_worker"]),
                  _rate(s["wall_rate"]))
    return t


def _rate(v: float | None) -> str:
    if not v:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


# Exit codes of a query the guard stopped: a signal's are the shell's (128 + signal number); a
# timeout's is GNU timeout's, so a script can tell a slow query (retry with a larger --timeout) from
# a wrong one (2); a query over the memory limit is refused like DuckDB's own out-of-memory error (2).
STOP_EXIT = {"SIGINT": 130, "SIGTERM": 143, "timeout": 124, "memory": USER_ERROR}
STOP_OPTION = {"timeout": " (--timeout)", "memory": " (--memory-limit)"}


@app.command()
def query(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    sql: Annotated[str, typer.Argument(help="one SELECT over: identities, decisions, samples, metrics "
                                                    "(training), <stage id>")],
    fmt: Annotated[Fmt, typer.Option("--format", "-f")] = Fmt.table,
    output: Annotated[Path | None, typer.Option("--out", help="file to write, outside the run directory (needed "
                                                "for parquet; csv and json go to stdout without it)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="rows shown in table format; only these are read")] = 50,
    vertical: Annotated[bool | None, typer.Option("--vertical/--no-vertical", "-x",
                                                  help="one block per row (default: when the table is wider than "
                                                       "the terminal)")] = None,
    timeout: Annotated[float, typer.Option(min=0, help="seconds before the query is stopped (exit 124); "
                                                       "0: no limit")] = 300,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="memory the query may add to this process, "
                                                                      "e.g. 2GB or 512MiB; DuckDB spills to disk "
                                                                      "below it, and the query stops (exit 2) "
                                                                      "above it")] = "2GB",
) -> None:
    """SQL on a read-only DuckDB connection over the committed manifests, streamed: columns of the same
    name are shown as name, name_2, ...; Ctrl-C stops it (exit 130)."""
    import duckdb
    import pyarrow as pa

    from manifests.catalog import Catalog, QueryError
    from manifests.query_guard import QueryGuard, Stopped, parse_size
    from manifests.storage import RunStorage
    from pipeline.status import NotARunError, stage_order

    try:
        memory = parse_size(memory_limit)
    except ValueError as exc:
        _fail(f"--memory-limit: {exc}")
        return
    store = RunStorage(run_dir)
    try:
        order = stage_order(store)
    except NotARunError as exc:
        _fail(str(exc))
        return
    problem = _out_problem(output, fmt, store)
    if problem:
        _fail(problem)
        return
    guard = QueryGuard(timeout_s=timeout, memory_bytes=memory)
    catalog = Catalog(store, order, memory_limit=guard.duckdb_memory_limit() or memory_limit)

    def work() -> None:
        with catalog.stream(sql, guard=guard) as reader:
            if fmt == Fmt.table:
                _print_rows(reader, limit, vertical)
            else:
                _write_rows(reader, fmt, output, guard)

    try:
        guard.run(work, signals=True)
    except Stopped as exc:
        code = STOP_EXIT[exc.reason]
        try:
            _fail(exc.detail + STOP_OPTION.get(exc.reason, ""), code)
        finally:
            if exc.abandoned:  # the worker thread is still inside DuckDB or a write: end without it
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (QueryError, duckdb.Error, pa.ArrowException, OSError) as exc:
        # A type the format cannot hold (a union or interval in Parquet), an --out that cannot be written.
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, duckdb.OutOfMemoryException):
            text += " (--memory-limit)"
        _fail(text)


def _out_problem(output: Path | None, fmt: Fmt, store: RunStorage) -> str | None:
    """Why ``--out`` cannot be written, checked before the query runs: a query never writes into a run
    (its committed manifests must never be overwritten), nor over a folder."""
    if output is None:
        return "--format parquet needs --out FILE" if fmt == Fmt.parquet else None
    if fmt == Fmt.table:
        return "--out writes -f csv, json or parquet; the table format prints to the terminal"
    if output.is_dir():
        return f"--out {output}: is a folder; expected a file name"
    parent = output.absolute().parent
    if not parent.is_dir():
        return f"--out {output}: folder {parent} does not exist"
    if store.is_local:
        run = os.path.realpath(store.root)
        target = os.path.realpath(output)
        if target == run or target.startswith(run.rstrip(os.sep) + os.sep):
            return f"--out {output}: is inside the run directory {store.root}; write the result elsewhere"
    return None


def _write_rows(reader: pa.RecordBatchReader, fmt: Fmt, output: Path | None, guard: QueryGuard) -> None:
    """csv, json (one array) or parquet, written batch by batch as the query makes them. A file is
    written beside its final name and renamed when complete, so a stopped query leaves no half file
    and an existing file is replaced only by a whole result."""
    import pyarrow.parquet as pq

    regular = output is not None and (not output.exists() or output.is_file())
    target = output.with_name(f".{output.name}.ff-tmp-{os.getpid()}") if output is not None and regular else output
    names: list[str] = reader.schema.names
    rows = 0
    with contextlib.ExitStack() as stack:
        if target is not None and target != output:
            stack.enter_context(guard.attached(cleanup=functools.partial(_unlink, target)))
        try:
            if fmt == Fmt.parquet:
                assert target is not None
                with pq.ParquetWriter(target, reader.schema) as writer:
                    for batch in reader:
                        writer.write_batch(batch)
                        rows += batch.num_rows
            else:
                stream = stack.enter_context(open(target, "w", newline="", encoding="utf-8")) if target else sys.stdout
                rows = _write_text(reader, fmt, names, stream)
            if target is not None and output is not None and target != output:
                os.replace(target, output)
        except BaseException:
            if target is not None and target != output:
                _unlink(target)
            raise
    if output is not None:
        err.print(f"wrote {rows} rows to {output}", highlight=False, markup=False)


def _write_text(reader: pa.RecordBatchReader, fmt: Fmt, names: list[str], stream: TextIO) -> int:
    rows = 0
    if fmt == Fmt.csv:
        w = csv.writer(stream, lineterminator="\n")
        w.writerow(names)
        for batch in reader:
            for row in _batch_rows(batch):
                w.writerow([_csv_cell(v) for v in row])
            rows += batch.num_rows
        return rows
    stream.write("[")
    for batch in reader:
        for row in _batch_rows(batch):
            stream.write(("\n" if rows == 0 else ",\n") + _json_row(dict(zip(names, row, strict=True))))
            rows += 1
    stream.write("\n]\n" if rows else "]\n")
    return rows


def _json_row(row: dict[str, Any]) -> str:
    """One row as JSON; NaN and infinities (no JSON number spells them) as null."""
    try:
        return json.dumps(row, default=_jsonable, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(row), default=_jsonable, allow_nan=False)


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _batch_rows(batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
    """A batch's rows as tuples, by position: names never merge two columns."""
    return list(zip(*(col.to_pylist() for col in batch.columns), strict=True))


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


CELL_CAP = 60


def _short(v: Any, cap: int = CELL_CAP) -> str:
    text = _jsonable(v) if isinstance(v, bytes | datetime.date | datetime.time) else str(v)
    return text if len(text) <= cap else text[: cap - 3] + "..."


def _csv_cell(v: Any) -> Any:
    return _jsonable(v) if isinstance(v, bytes | datetime.date | datetime.time) else v


def _print_rows(reader: pa.RecordBatchReader, limit: int, vertical: bool | None) -> None:
    """The first ``limit`` rows (one more is read, to tell whether there are more): a table when it
    fits the terminal, else one block per row (psql's \\x), so a wide result stays readable."""
    columns: list[str] = reader.schema.names
    shown: list[tuple[Any, ...]] = []
    more = False
    for batch in reader:
        shown.extend(_batch_rows(batch))
        if len(shown) > limit:
            more = True
            break
    shown = shown[:limit]
    cells = [[_short(v) for v in row] for row in shown]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    fits = sum(widths) + 3 * len(columns) + 1 <= out.width
    caption = f"first {limit} rows shown; more rows exist (--limit)" if more else f"{len(shown)} rows"
    if vertical is False or (vertical is None and fits):
        t = Table()
        for c in columns:
            t.add_column(c, overflow="fold")
        for row in cells:
            t.add_row(*row)
        out.print(t)
        out.print(caption, highlight=False)
        return
    name_width = max(len(c) for c in columns)
    value_cap = max(20, out.width - name_width - 3)
    for n, r in enumerate(shown, 1):
        out.print(styled((f"-[ row {n} ]-", "bold")))
        for c, v in zip(columns, r, strict=True):
            out.print(f"{c.ljust(name_width)} | {_short(v, value_cap)}", highlight=False, markup=False)
    out.print(caption, highlight=False)
    if vertical is None:
        err.print(f"{len(columns)} columns are wider than the terminal: shown one block per row; "
                  "-f csv or -f json (with --out FILE) gives every row and column in full.", highlight=False,
                  soft_wrap=True)



def _analysis(work: Any, errors: tuple[type[BaseException], ...], memory_limit: str, timeout: float,
              as_json: bool, show: Any) -> None:
    """A read-only analysis (whatif, diff) under query's bounds: its first error line as a user error, its
    result as JSON or as the command's tables."""
    try:
        result = _guarded(work, memory_limit, timeout)
    except errors as exc:
        _fail(str(exc).strip().splitlines()[0])
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    show(result)


def _guarded(work: Any, memory_limit: str, timeout: float) -> Any:
    """Run a read-only analysis under query's bounds: a memory cap (DuckDB spills below it), a
    timeout, Ctrl-C and SIGTERM that stop it at once; exits as ``query`` does when one stops it."""
    from manifests.query_guard import QueryGuard, Stopped, parse_size

    try:
        memory = parse_size(memory_limit)
    except ValueError as exc:
        _fail(f"--memory-limit: {exc}")
    guard = QueryGuard(timeout_s=timeout, memory_bytes=memory)
    try:
        return guard.run(lambda: work(guard), signals=True)
    except Stopped as exc:
        code = STOP_EXIT[exc.reason]
        try:
            _fail(exc.detail + STOP_OPTION.get(exc.reason, ""), code)
        finally:
            if exc.abandoned:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


@app.command()
def whatif(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="export.KEY=V1,V2,...: values to try for one export setting (repeatable; the grid is the "
                      "product of every key's values); commas inside quotes or parentheses stay in the value")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    timeout: Annotated[float, typer.Option(min=0, help="seconds before it is stopped (exit 124); 0: no limit")] = 600,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="memory it may add to this process, e.g. 2GB")
                            ] = "2GB",
) -> None:
    """What the export would keep under other settings: per combination of the --set values, samples and
    identities kept, drops per rule, quotas and balance unmet, from the run's tables; nothing is written."""
    from manifests.storage import RunStorage, StorageURLError
    from pipeline.engine.rundir import read_run_file
    from pipeline.status import NotARunError, stage_order
    from pipeline.whatif import WhatifError, prepare
    from pipeline.whatif import whatif as evaluate

    try:
        store = RunStorage(run_dir)
        order = stage_order(store)
        state = read_run_file(store)
        assert state is not None  # stage_order refused a directory without a run file
        grid = prepare(store, order, dict(state.config.get("export") or {}), set_ or [])
    except (NotARunError, StorageURLError, WhatifError) as exc:
        _fail(str(exc))
        return
    import duckdb

    _analysis(lambda guard: evaluate(store, order, grid, memory_limit=memory_limit, guard=guard),
              (WhatifError, duckdb.Error), memory_limit, timeout, as_json, _print_whatif)


def _drop_text(d: dict[str, Any]) -> str:
    own = d["stage"] == "export" or d["rule"].startswith("threshold ")
    return f"{d['rule'] if own else d['stage'] + ': ' + d['rule']} {d['count']}"


def whatif_table(result: dict[str, Any], top_rules: int = 4) -> Table:
    """One row per combination; its drop rules one per line, largest first."""
    combos = result["combinations"]
    t = Table(title=f"{result['run']}: {len(combos)} combination(s)", box=box.SIMPLE_HEAD,
              caption=WHATIF_CAPTION.format(samples=result["evaluation"]["samples"]))
    for key in result["keys"]:
        t.add_column(key.removeprefix("export."))
    for col in ("samples", "identities"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("drops by rule", no_wrap=True)
    unmet = any(c["unmet"] for c in combos)
    if unmet:
        t.add_column("unmet")
    for c in combos:
        lines = [_drop_text(d) for d in c["drops"][:top_rules]]
        if len(c["drops"]) > top_rules:
            lines.append(f"+{len(c['drops']) - top_rules} more")
        row = [*(c["settings"][k] for k in result["keys"]), str(c["samples"]), str(c["identities"]),
               "\n".join(lines) or "-"]
        if unmet:
            row.append("\n".join(str(u) for u in c["unmet"]) or "none")
        t.add_row(*row)
    return t


WHATIF_CAPTION = ("{samples} samples read once. A sample is counted under the first rule, in the export's order, "
                  "that drops it; --json has every rule. The split is decided when the export runs.")


def _print_whatif(result: dict[str, Any]) -> None:
    """The table when it fits the terminal, else one block per combination (as ``status`` does)."""
    table = whatif_table(result)
    if out.measure(table, options=out.options.update_width(10_000)).maximum <= out.width:
        out.print(table)
        return
    out.print(f"{result['run']}: {len(result['combinations'])} combination(s)", highlight=False)
    for n, c in enumerate(result["combinations"], 1):
        settings = "  ".join(f"{k.removeprefix('export.')}={v}" for k, v in c["settings"].items())
        out.print(styled((f"[{n}]", "bold"), f" {settings or '(the run' + chr(39) + 's settings)'}"), soft_wrap=True)
        out.print(f"  kept {c['samples']} samples, {c['identities']} identities", highlight=False)
        out.print("  drops: " + (", ".join(_drop_text(d) for d in c["drops"]) or "none"), highlight=False,
                  markup=False)
        for u in c["unmet"]:
            out.print(styled(("  unmet:", "yellow"), f" {u}"))
    out.print(WHATIF_CAPTION.format(samples=result["evaluation"]["samples"]), highlight=False)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(help="run directory A (before)")],
    run_b: Annotated[str, typer.Argument(help="run directory B (after)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    examples: Annotated[int, typer.Option(min=0, max=100, help="example sample ids per change")] = 3,
    timeout: Annotated[float, typer.Option(min=0, help="seconds before it is stopped (exit 124); 0: no limit")] = 600,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="memory it may add to this process, e.g. 2GB; "
                                                                      "DuckDB spills to disk below it")] = "2GB",
) -> None:
    """What changed from run A to run B, joined by sample id: per stage the samples whose decision changed
    (by rule, with example ids), score shifts over the samples both hold, export membership and split changes."""
    import duckdb

    from manifests.storage import RunStorage, StorageURLError
    from pipeline.diff import DiffError
    from pipeline.diff import diff as compare
    from pipeline.status import NotARunError, stage_order

    try:
        stores = (RunStorage(run_a), RunStorage(run_b))
        for st in stores:
            stage_order(st)  # refuses a directory that is not a run
    except (NotARunError, StorageURLError) as exc:
        _fail(str(exc))
        return
    _analysis(lambda guard: compare(*stores, examples=examples, memory_limit=memory_limit, guard=guard),
              (DiffError, duckdb.Error), memory_limit, timeout, as_json, _print_diff)


def _print_diff(r: dict[str, Any]) -> None:
    s = r["samples"]
    out.print(styled(("A", "bold"), f" {r['a']}"), highlight=False)
    out.print(styled(("B", "bold"), f" {r['b']}"), highlight=False)
    out.print(f"samples: {s['common']} in both, {s['only_a']} in A only, {s['only_b']} in B only", highlight=False)
    for side in ("a", "b"):
        if s[f"only_{side}_examples"]:
            out.print(f"  e.g. in {side.upper()} only: {', '.join(s[f'only_{side}_examples'])}", highlight=False)
    t = Table(title="decisions that changed (A -> B), per stage", box=box.SIMPLE_HEAD)
    for col, just in (("stage", "left"), ("A -> B", "left"), ("rule", "left"), ("samples", "right"),
                      ("examples", "left")):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for st in r["stages"]:
        for c in st["changes"]:
            t.add_row(st["stage"], f"{c['from']} -> {c['to']}", c["rule"] or "-", str(c["count"]),
                      "\n".join(c["examples"]))
    out.print(t if r["stages"] else "decisions: no stage changed a decision")
    shifted = [x for x in r["scores"] if x["changed"]]
    if shifted:
        t = Table(title="score shifts over the samples in both runs (columns with a changed value)",
                  box=box.SIMPLE_HEAD)
        for col in ("column", "changed", "mean A", "mean B", "delta", "p50 A", "p50 B"):
            t.add_column(col, justify="left" if col == "column" else "right", overflow="fold")
        mid = QUANTILE_MEDIAN
        for x in shifted:
            t.add_row(x["column"], str(x["changed"]), _num(x["mean_a"]), _num(x["mean_b"]), _num(x["mean_delta"]),
                      _num(x["q_a"][mid] if x["q_a"] else None), _num(x["q_b"][mid] if x["q_b"] else None))
        out.print(t)
    else:
        out.print(f"scores: no value changed in {len(r['scores'])} shared numeric column(s)")
    e = r["export"]
    if not (e["a"] and e["b"]):
        missing = " and ".join(side.upper() for side in ("a", "b") if not e[side])
        out.print(f"export: not compared ({missing} has no committed export)")
        return
    out.print(f"export: A {e['samples_a']} samples, B {e['samples_b']}; {e['only_a']} in A's only, {e['only_b']} in "
              f"B's only, {e['split_changed']} changed split", highlight=False)
    for c in e["changes"]:
        out.print(f"  {c['from']} -> {c['to']}: {c['count']}  e.g. {', '.join(c['examples'])}", highlight=False)


QUANTILE_MEDIAN = 1  # position of the median in pipeline.diff.QUANTILES


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@app.command()
def lineage(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    sample_id: Annotated[str, typer.Argument(help="sample id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every stage's row for one sample, in order: versions, model, params hash, scores, decision, shards."""
    from manifests.lineage import trace
    from manifests.storage import RunStorage, StorageURLError
    from pipeline.status import NotARunError, stage_order

    try:
        store = RunStorage(run_dir)
        rows = trace(store, stage_order(store), sample_id)
    except (NotARunError, StorageURLError) as exc:
        _fail(str(exc))
        return
    if not rows:
        _fail(f"no sample {sample_id!r} in {run_dir}")
        return
    if as_json:
        sys.stdout.write(json.dumps(rows, default=_jsonable, indent=1) + "\n")
        return
    for r in rows:
        head = (str(r.get("stage")), "bold")
        if r.get("stage") == "export":
            made = "" if r.get("round") is None else f" round={r['round']}"
            out.print(styled(head, f"  split={r.get('split')} label={r.get('label')} shard={r.get('export_shard')} "
                                   f"key={r.get('export_key')}{made}"))
            continue
        decision: str | tuple[str, str] = "keep" if r.get("keep") else f"drop ({r.get('reason')})"
        if r.get("status") != "ok":
            decision = (f"error ({r.get('reason')})", "red")
        out.print(styled(head, f" v{r.get('stage_version')}  ", decision, f"  sample={r.get('sample_id')}",
                         f" parent={r['parent_id']}" if r.get("parent_id") else ""))
        model = f"{r.get('model_name') or '-'}@{r.get('model_revision') or '-'}"
        out.print(f"    model={model}  params={r.get('params_hash')}"
                  f"  worker={r.get('worker')}  at={r.get('processed_at')}")
        out.print(f"    in={r.get('input_shard') or '-'}  out={r.get('output_shard') or '-'}")
        scores = {k: v for k, v in r.items() if k not in _COMMON and not isinstance(v, bytes | list)}
        if scores:
            out.print("    " + "  ".join(f"{k}={_fmt(v)}" for k, v in scores.items()))


_COMMON = {"sample_id", "key", "identity_id", "parent_id", "stage", "stage_name", "stage_version", "shard", "status",
           "keep", "reason", "model_name", "model_revision", "params_hash", "fingerprint", "input_shard",
           "output_shard", "image_ext", "tar_offset", "tar_size", "worker", "processed_at", "duration_ms",
           "stage_index"}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(v: Any) -> Any:
    """JSON for what json cannot write: ISO-8601 times, hex bytes, numbers for decimals."""
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    return str(v)


@app.command()
def doctor(
    config: Annotated[Path | None, typer.Argument(help="pipeline YAML whose models to check")] = None,
    set_: Overrides = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address: check every node (else RAY_ADDRESS, "
                                                     "else this machine only)")] = None,
    py_module: Annotated[list[str] | None, typer.Option("--py-module", help="a folder holding your own stage "
                                                                           "package (as for run)")] = None,
) -> None:
    """Installed packages, GPUs, and whether each model and file a config names can be found (nothing is
    loaded), on this machine or on every node of a cluster."""
    from pipeline.config import ConfigError, load_config
    from pipeline.doctor import run_doctor, run_doctor_on_nodes

    stages, identities, modules = None, None, list(py_module or [])
    if config is not None:
        try:
            cfg, stages = load_config(config, set_ or [], py_modules=modules)
        except ConfigError as exc:
            _fail(str(exc))
            return
        identities, modules = cfg.identities, cfg.run.py_modules
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from pipeline.engine import cluster

        try:
            with cluster.session(address, py_modules=modules):
                reports = run_doctor_on_nodes(stages, identities)
        except cluster.ClusterConnectError as exc:
            _fail(str(exc))
            return
    else:
        reports = [run_doctor(stages, identities)]
    for rep in reports:
        _print_doctor(rep, several=len(reports) > 1 or bool(address))
    if not all(rep.ok for rep in reports):
        raise typer.Exit(1)


def _print_doctor(rep: Any, several: bool) -> None:
    if several:
        out.rule(rep.node)
    t = Table(title="packages")
    t.add_column("package")
    t.add_column("version")
    for name, version in rep.packages.items():
        t.add_row(name, version or styled(("not installed", "yellow")))
    out.print(t)
    out.print(f"GPUs: {', '.join(rep.gpus)}" if rep.gpus else f"GPUs: none ({rep.gpu_note})")
    for key, value in rep.environment.items():
        out.print(f"{key}: {value}", highlight=False, markup=False)
    for p in rep.config_problems:
        out.print(styled(("✗", "red"), " config"))
        out.print(f"    {p}", highlight=False, markup=False)
    for s in rep.stages:
        res = ", ".join(f"{k}={v}" for k, v in s["resources"].items() if v)
        if s["problems"]:
            out.print(styled(("✗", "red"), f" {s['stage']} ({s['class']}; {res})"))
            for p in s["problems"]:
                out.print(f"    {p}")
        else:
            out.print(styled(("✓", "green"), f" {s['stage']} ({s['class']}; {res})"))
        for f in s.get("files", []):
            mark = ("✓", "green") if f.get("ok") else ("✗", "red")
            out.print(styled("    ", mark, f" {f['file']} {f.get('path') or 'missing'} "
                                             f"sha256 {f.get('sha256') or '-'}"))


@app.command()
def stages(
    name: Annotated[str | None, typer.Argument(help="a stage name: show its params, reads, columns, resources")] = None,
) -> None:
    """The registered stages, one line each; with NAME, that stage's params (type, default, description)."""
    from pipeline.reference import UnknownStageNameError, stage_doc, stage_lines, stage_text

    if name is None:
        sys.stdout.write("\n".join(stage_lines()) + "\n")
        return
    try:
        doc = stage_doc(name)
    except UnknownStageNameError as exc:
        _fail(str(exc))
        return
    sys.stdout.write(stage_text(doc) + "\n")


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--out", help="file to write (default: standard output)")] = None,
) -> None:
    """The pipeline config's JSON Schema (each stage's params included), for editors to validate and complete."""
    from pipeline.reference import schema_text

    text = schema_text()
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
        return
    err.print(f"wrote {output}", highlight=False)


train_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT,
                        help="Train on exported shards (Ray Train, DDP).")
eval_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT, help="Evaluate trained models.")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _training_user_errors() -> tuple[type[Exception], ...]:
    from training.bin_pairs import PairFileError
    from training.checkpoints import CheckpointError
    from training.export_index import ExportError

    return (CheckpointError, ExportError, PairFileError, FileNotFoundError)


def _train_config(config: Path, overrides: list[str] | None, model: type[Any]) -> Any:
    from facekit.userconfig import load_yaml_file
    from pipeline.config import ConfigError, apply_overrides
    from training.config import load_train_config

    try:
        return load_train_config(apply_overrides(load_yaml_file(config) or {}, overrides or [], model), model)
    except ConfigError as exc:
        _fail(str(exc))


def _train(config: Path, overrides: list[str] | None, model: type[Any], train: Any, address: str | None,
           new: bool) -> None:
    """Load the job's config, train in a Ray session, print the result as JSON (user errors: one line)."""
    from pipeline.engine import cluster

    cfg = _train_config(config, overrides, model)
    try:
        with cluster.session(address):
            result = train(cfg, new=new)
    except _training_user_errors() as exc:
        _fail(str(exc))
        return
    out.print_json(json.dumps(result.__dict__ if hasattr(result, "__dict__") else result, default=str))


def _recognition_job() -> tuple[type[Any], Any]:
    from training.config import RecognitionTrainConfig
    from training.recognition import train_recognition

    return RecognitionTrainConfig, train_recognition


def _enhancement_job() -> tuple[type[Any], Any]:
    from training.config import EnhancementTrainConfig
    from training.enhancement import train_enhancement

    return EnhancementTrainConfig, train_enhancement


def _train_command(kind: str, job: Callable[[], tuple[type[Any], Any]], summary: str) -> None:
    """``facefoundry train <kind>``: every job takes the same arguments; ``job`` names its config model and
    entry point, imported only when the command runs."""

    def command(
        config: TrainConfigFile,
        set_: Overrides = None,
        address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
        new: StartOver = False,
    ) -> None:
        model, train = job()
        _train(config, set_, model, train, address, new)

    train_app.command(kind, help=summary)(command)


_train_command("recognition", _recognition_job,
               "IResNet + margin loss on exported shards; safetensors checkpoints; resumes from the last one.")
_train_command("enhancement", _enhancement_job,
               "A small U-Net on (degraded, clean) pairs; PSNR/SSIM/identity similarity vs the degraded input.")


@eval_app.command("verification")
def eval_verification_cmd(
    config: Annotated[Path, typer.Argument(help="verification eval YAML")],
    set_: Overrides = None,
) -> None:
    """10-fold verification accuracy and TAR@FAR on .bin pair files and held-out export identities."""
    from training.config import VerificationEvalConfig
    from training.verification import evaluate_verification

    cfg = _train_config(config, set_, VerificationEvalConfig)
    try:
        results = evaluate_verification(cfg, console=out)
    except _training_user_errors() as exc:
        _fail(str(exc))
        return
    out.print_json(json.dumps(results, default=str))


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    app()


if __name__ == "__main__":
    main()
