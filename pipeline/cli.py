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
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich import box
from rich.console import Console
from rich.table import Table

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
out = Console()
err = Console(stderr=True)


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _fail(message: str, code: int = USER_ERROR) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facefoundry")
    except PackageNotFoundError:
        return "unknown (not installed; running from a source tree)"


def _print_version(value: bool) -> None:
    if value:
        out.print(f"facefoundry {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Generate and curate face datasets on Ray, with per-sample lineage."""


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    output: Annotated[str, typer.Option("--output", "-o", help="run directory: a path or fsspec URL")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (else RAY_ADDRESS, else local)")] = None,
    new: Annotated[bool, typer.Option("--new", help="delete what the output holds and start over")] = False,
    force: Annotated[bool, typer.Option("--force", help="recompute stages whose config changed")] = False,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for the embedded local Ray")] = None,
    progress: Annotated[bool, typer.Option(help="live progress display")] = True,
) -> None:
    """Run a pipeline config end to end (resumes what an earlier run of it committed)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.engine.cluster import ClusterConnectError, ClusterFitError
    from pipeline.engine.rundir import RunConflictError, RunLockedError

    try:
        cfg, stages = load_config(config, set_ or [])
        from pipeline.engine.runner import Runner

        runner = Runner(cfg, stages, output, console=err, show_progress=progress)
    except ConfigError as exc:
        _fail(str(exc))
        return
    try:
        result = runner.run(force=force, new=new, address=address, num_cpus=num_cpus)
    except (RunConflictError, RunLockedError, ClusterConnectError, ClusterFitError) as exc:
        _fail(str(exc))
        return
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]: committed shards are kept; run the same command again to resume.")
        raise typer.Exit(130) from None
    for f in result.failures:
        last = (f["error"].splitlines() or [""])[-1]
        err.print(f"[red]failed[/red] {f['stage']} shard {f['shard']}: {last}")
    _print_next_steps(output, result.complete, result.export)
    if not result.complete:
        raise typer.Exit(1)


def _print_next_steps(output: str, complete: bool, export: dict[str, Any] | None) -> None:
    state = "[green]complete[/green]" if complete else "[yellow]incomplete[/yellow] (run again to resume)"
    err.print(f"\nrun {output}: {state}")
    if export:
        s = export["splits"]
        v = export.get("version", "")
        err.print(f"  training shards  {output}/export/{v}/train ({s['train']['samples']} samples, "
                  f"{s['train']['identities']} identities), {output}/export/{v}/val ({s['val']['samples']} samples)")
        err.print(f"  dataset card     {output}/export/README.md")
    err.print(f"  manifests        {output}/manifests/<stage>/*.parquet")
    err.print(f"  report           {output}/report/index.html")
    err.print("next:")
    err.print(f"  facefoundry status {output}")
    sql = "SELECT stage, reason, count(*) FROM decisions WHERE NOT keep GROUP BY ALL"
    err.print(f'  facefoundry query {output} "{sql}"')
    err.print(f"  facefoundry lineage {output} <sample_id>")


@app.command()
def status(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Per stage: shards committed/total, samples kept/dropped/errored, throughput, completeness."""
    from manifests.storage import RunStorage
    from pipeline.status import NotARunError, run_status

    try:
        st = run_status(RunStorage(run_dir))
    except NotARunError as exc:
        _fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(st, default=_jsonable, indent=1) + "\n")
        return
    table = status_table(st)
    if out.measure(table, options=out.options.update_width(10_000)).maximum <= out.width:
        out.print(table)
    else:  # a long stage id: one line per stage rather than squeezed, unreadable columns
        out.print(table.title, highlight=False)
        for s in st["stages"]:
            out.print(f"[bold]{s['stage']}[/bold]", highlight=False)
            out.print(f"  shards {s['shards_committed']}/{s['shards_total']}  rows {s['samples']}  kept {s['kept']}  "
                      f"dropped {s['dropped']}  errors {s['errors']}  workers {s['workers']}", highlight=False)
            out.print(f"  capacity {_rate(s['capacity_per_worker'])} /s/worker  wall rate {_rate(s['wall_rate'])} /s",
                      highlight=False)
        out.print(table.caption, highlight=False)
    for s in st["stages"]:
        for msg in s.get("not_committed", []):
            out.print(f"[yellow]not committed:[/yellow] {msg}")
    if st["export"]:
        sp = st["export"]["splits"]
        out.print(f"export: train {sp['train']['samples']} samples / {sp['train']['identities']} identities, "
                  f"val {sp['val']['samples']} / {sp['val']['identities']}")
    else:
        out.print("export: not written")


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
    sql: Annotated[str, typer.Argument(help="one SELECT over: identities, decisions, samples, <stage id>")],
    fmt: Annotated[Fmt, typer.Option("--format", "-f")] = Fmt.table,
    output: Annotated[Path | None, typer.Option("--out", help="file to write, outside the run directory (needed "
                                                "for parquet; csv and json go to stdout without it)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="rows shown in table format; only these are read")] = 50,
    vertical: Annotated[bool | None, typer.Option("--vertical/--no-vertical", "-x",
                                                  help="one block per row (default: when the table is wider than "
                                                       "the terminal)")] = None,
    timeout: Annotated[float, typer.Option(min=0, help="seconds before the query is stopped (exit 124); "
                                                       "0: no limit")] = 300,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="memory cap of the whole process, e.g. "
                                                                      "2GB or 512MiB; DuckDB spills to disk below "
                                                                      "it, and the query stops (exit 2) above "
                                                                      "it")] = "2GB",
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
        out.print(f"[bold]-[ row {n} ]-[/bold]")
        for c, v in zip(columns, r, strict=True):
            out.print(f"{c.ljust(name_width)} | {_short(v, value_cap)}", highlight=False, markup=False)
    out.print(caption, highlight=False)
    if vertical is None:
        err.print(f"{len(columns)} columns are wider than the terminal: shown one block per row; "
                  "-f csv or -f json (with --out FILE) gives every row and column in full.", highlight=False,
                  soft_wrap=True)


@app.command()
def lineage(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    sample_id: Annotated[str, typer.Argument(help="sample id")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every stage's row for one sample, in order: versions, model, params hash, scores, decision, shards."""
    from manifests.lineage import trace
    from manifests.storage import RunStorage
    from pipeline.status import NotARunError, stage_order

    store = RunStorage(run_dir)
    try:
        rows = trace(store, stage_order(store), sample_id)
    except NotARunError as exc:
        _fail(str(exc))
        return
    if not rows:
        _fail(f"no sample {sample_id!r} in {run_dir}")
        return
    if as_json:
        sys.stdout.write(json.dumps(rows, default=_jsonable, indent=1) + "\n")
        return
    for r in rows:
        head = f"[bold]{r.get('stage')}[/bold]"
        if r.get("stage") == "export":
            out.print(f"{head}  split={r.get('split')} label={r.get('label')} shard={r.get('export_shard')} "
                      f"key={r.get('export_key')}")
            continue
        decision = "keep" if r.get("keep") else f"drop ({r.get('reason')})"
        if r.get("status") != "ok":
            decision = f"[red]error[/red] ({r.get('reason')})"
        out.print(f"{head} v{r.get('stage_version')}  {decision}  sample={r.get('sample_id')}"
                  + (f" parent={r['parent_id']}" if r.get("parent_id") else ""))
        model = f"{r.get('model_name') or '-'}@{r.get('model_revision') or '-'}"
        out.print(f"    model={model}  params={r.get('params_hash')}"
                  f"  worker={r.get('worker')}  at={r.get('processed_at')}")
        out.print(f"    in={r.get('input_shard') or '-'}  out={r.get('output_shard') or '-'}")
        scores = {k: v for k, v in r.items() if k not in _COMMON and not isinstance(v, bytes | list)}
        if scores:
            out.print("    " + "  ".join(f"{k}={_fmt(v)}" for k, v in scores.items()), highlight=False)


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
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")] = None,
) -> None:
    """Installed packages, GPUs, and whether each model a config names can be found (nothing is loaded)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.doctor import run_doctor

    stages = None
    if config is not None:
        try:
            _, stages = load_config(config, set_ or [])
        except ConfigError as exc:
            _fail(str(exc))
            return
    rep = run_doctor(stages)
    t = Table(title="packages")
    t.add_column("package")
    t.add_column("version")
    for name, version in rep.packages.items():
        t.add_row(name, version or "[yellow]not installed[/yellow]")
    out.print(t)
    out.print(f"GPUs: {', '.join(rep.gpus)}" if rep.gpus else f"GPUs: none ({rep.gpu_note})")
    for s in rep.stages:
        res = ", ".join(f"{k}={v}" for k, v in s["resources"].items() if v)
        if s["problems"]:
            out.print(f"[red]✗[/red] {s['stage']} ({s['class']}; {res})")
            for p in s["problems"]:
                out.print(f"    {p}", highlight=False)
        else:
            out.print(f"[green]✓[/green] {s['stage']} ({s['class']}; {res})")
        for f in s.get("files", []):
            mark = "[green]✓[/green]" if f.get("ok") else "[red]✗[/red]"
            out.print(f"    {mark} {f['file']} {f.get('path') or 'missing'} sha256 {f.get('sha256') or '-'}",
                      highlight=False)
    if not rep.ok:
        raise typer.Exit(1)


train_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT,
                        help="Train on exported shards (Ray Train, DDP).")
eval_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT, help="Evaluate trained models.")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _train_config(config: Path, overrides: list[str] | None, model: type[Any]) -> Any:
    import yaml

    from pipeline.config import ConfigError, apply_overrides
    from training.config import TrainConfigError, load_train_config

    try:
        raw = yaml.safe_load(config.read_text()) or {}
        return load_train_config(apply_overrides(raw, overrides or []), model)
    except (OSError, yaml.YAMLError, ConfigError, TrainConfigError) as exc:
        _fail(str(exc))


@train_app.command("recognition")
def train_recognition_cmd(
    config: Annotated[Path, typer.Argument(help="recognition training YAML")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
) -> None:
    """IResNet + margin loss on exported shards; safetensors checkpoints; resumes from the last one."""
    from pipeline.engine import cluster
    from training.config import RecognitionTrainConfig
    from training.recognition import train_recognition

    cfg = _train_config(config, set_, RecognitionTrainConfig)
    with cluster.session(address):
        result = train_recognition(cfg)
    out.print_json(json.dumps(result.__dict__ if hasattr(result, "__dict__") else result, default=str))


@train_app.command("enhancement")
def train_enhancement_cmd(
    config: Annotated[Path, typer.Argument(help="enhancement training YAML")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
) -> None:
    """A small U-Net on (degraded, clean) pairs; PSNR/SSIM/identity similarity vs the degraded input."""
    from pipeline.engine import cluster
    from training.config import EnhancementTrainConfig
    from training.enhancement import train_enhancement

    cfg = _train_config(config, set_, EnhancementTrainConfig)
    with cluster.session(address):
        result = train_enhancement(cfg)
    out.print_json(json.dumps(result.__dict__ if hasattr(result, "__dict__") else result, default=str))


@eval_app.command("verification")
def eval_verification_cmd(
    config: Annotated[Path, typer.Argument(help="verification eval YAML")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: path.to.key=value")] = None,
) -> None:
    """10-fold verification accuracy and TAR@FAR on .bin pair files and held-out export identities."""
    from training.config import VerificationEvalConfig
    from training.verification import evaluate_verification

    cfg = _train_config(config, set_, VerificationEvalConfig)
    results = evaluate_verification(cfg, console=out)
    out.print_json(json.dumps(results, default=str))


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    app()


if __name__ == "__main__":
    main()
