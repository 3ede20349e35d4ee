"""The command line's manners: --version and -h, readable wide results, ISO-8601 JSON, exit code 2 for
every user error, and a status table that names every stage in full with both throughputs."""

from __future__ import annotations

import ast
import copy
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import USER_ERROR, app
from tests.fixtures import REPO

LONG_ID = "mean_brightness_filter_with_a_long_stage_id"


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> Path:
    from pipeline.config import load_config
    from pipeline.engine.runner import Runner
    from tests.conftest import ENGINE_CONFIG

    raw = copy.deepcopy(ENGINE_CONFIG)
    raw["stages"][1]["id"] = LONG_ID
    cfg, stages = load_config(raw=raw)
    out = tmp_path_factory.mktemp("cli") / "run"
    assert Runner(cfg, stages, str(out), show_progress=False).run().complete
    return out


def _cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_a_complete_runs_rerun_starts_no_ray_and_rewrites_nothing(engine_run: Path, tmp_path: Path) -> None:
    from tests.conftest import ENGINE_CONFIG

    raw = copy.deepcopy(ENGINE_CONFIG)
    raw["stages"][1]["id"] = LONG_ID
    config = tmp_path / "engine.yaml"
    config.write_text(yaml.safe_dump(raw))
    # Where a Ray started by the command would put its session (short: Ray's socket paths have a limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ffray-", dir="/tmp"))
    def written() -> dict[str, int]:  # the run lock's own file is taken and released by every command
        return {str(p.relative_to(engine_run)): p.stat().st_mtime_ns for p in engine_run.rglob("*")
                if p.is_file() and p.name != ".lock"}

    before = written()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACEFOUNDRY_RAY_TMP": str(ray_tmp)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output", str(engine_run),
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"run {engine_run}: complete, nothing to do"
    assert list(ray_tmp.iterdir()) == []
    assert written() == before  # no history entry, compaction, tables, export or report written again


def test_version_and_short_help() -> None:
    code, out, _ = _cli("--version")
    assert code == 0 and re.fullmatch(r"facefoundry \S+.*\n", out)
    for args in (["-h"], ["status", "-h"], ["train", "-h"], ["train", "recognition", "-h"]):
        code, out, _ = _cli(*args)
        assert code == 0 and "Usage" in out, args
    assert "metrics" in _cli("query", "-h")[1]  # the training metrics view is queryable too


def test_every_user_error_exits_2_with_a_message(engine_run: Path, tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [{stage: render, params: {size: tiny}}]\n")
    no_pairs = tmp_path / "no-pairs.yaml"
    no_pairs.write_text(f"checkpoint: {tmp_path / 'job'}\n")
    no_checkpoint = tmp_path / "no-checkpoint.yaml"
    no_checkpoint.write_text(f"checkpoint: {tmp_path / 'job'}\nexport: {engine_run}\n")
    cases = [
        ("lineage", str(engine_run), "no-such-sample"),
        ("status", str(tmp_path / "missing-run")),
        ("query", str(tmp_path / "missing-run"), "SELECT 1"),
        ("lineage", str(tmp_path / "missing-run"), "x"),
        ("query", str(engine_run), "SELECT no_such_column FROM decisions"),
        ("query", str(engine_run), "SELEC broken"),
        ("query", str(engine_run), "DELETE FROM decisions"),
        ("query", str(engine_run), "SELECT 1", "-f", "parquet"),
        ("query", str(engine_run), "SELECT 1", "--memory-limit", "lots"),
        ("query", str(engine_run), "SELECT 1", "--timeout", "-1"),
        ("query", str(engine_run), "SELECT to_months(3) AS i", "-f", "parquet", "--out", str(tmp_path / "i.parquet")),
        ("run", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "o")),
        ("run", str(bad_yaml), "--output", str(tmp_path / "o")),
        ("run", str(REPO / "examples" / "quickstart.yaml"), "--output", str(tmp_path / "o"), "--set", "nokey"),
        ("doctor", str(bad_yaml)),
        ("train", "recognition", str(tmp_path / "missing.yaml")),
        ("eval", "verification", str(no_pairs)),
        ("eval", "verification", str(no_checkpoint)),
        ("status", str(engine_run), "--no-such-option"),
    ]
    for args in cases:
        code, out, err = _cli(*args)
        assert code == USER_ERROR == 2, (args, code, out, err)
        assert err.strip(), args
    assert not (tmp_path / "o").exists(), "a refused run wrote something"
    assert not list(tmp_path.glob("*parquet*")), "a refused query left a file"


def test_library_code_never_exits_the_process() -> None:
    """Only pipeline/cli.py turns errors into exit codes (a module's own ``__main__`` block may too)."""
    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", "bench", ".venv", "infra"} or rel == Path("pipeline/cli.py"):
            continue
        tree = ast.parse(path.read_text(), str(rel))
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        skip = {id(x) for b in main_blocks for x in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Raise) else ""
            if isinstance(node, ast.Call) and re.match(r"(sys\.exit|os\._exit|exit|quit)\(", text):
                offenders.append(f"{rel}:{node.lineno}: {text}")
            if isinstance(node, ast.Raise) and re.search(r"\b(SystemExit|typer\.Exit|click\.exceptions)", text):
                offenders.append(f"{rel}:{node.lineno}: {text}")
    assert not offenders, offenders


def test_json_output_writes_iso_8601_timestamps(engine_run: Path) -> None:
    code, out, _ = _cli("query", str(engine_run), "SELECT sample_id, processed_at FROM decisions LIMIT 3",
                        "-f", "json")
    assert code == 0
    rows = json.loads(out)
    for r in rows:
        stamp = datetime.datetime.fromisoformat(r["processed_at"])
        assert "T" in r["processed_at"] and stamp.tzinfo is not None
    code, out, _ = _cli("lineage", str(engine_run), rows[0]["sample_id"], "--json")
    assert code == 0
    trace = json.loads(out)
    assert all(datetime.datetime.fromisoformat(r["processed_at"]) for r in trace if "processed_at" in r)


def test_a_wide_query_result_is_shown_one_block_per_row_with_a_hint(engine_run: Path) -> None:
    code, out, err = _cli("query", str(engine_run), "SELECT * FROM decisions ORDER BY sample_id LIMIT 2")
    assert code == 0
    assert out.count("-[ row ") == 2 and re.search(r"^fingerprint +\| [0-9a-f]+$", out, re.M)
    assert "-f csv or -f json" in err
    assert "…" not in out and "..." not in out
    narrow_code, narrow, narrow_err = _cli("query", str(engine_run), "SELECT stage, count(*) AS n FROM decisions "
                                           "GROUP BY stage ORDER BY stage")
    assert narrow_code == 0 and "-[ row" not in narrow and not narrow_err
    assert LONG_ID in narrow and "pattern" in narrow
    code, forced, _ = _cli("query", str(engine_run), "SELECT stage FROM decisions LIMIT 1", "-x")
    assert code == 0 and "-[ row 1 ]-" in forced


def test_status_names_every_stage_in_full_and_labels_capacity_and_wall_rate(engine_run: Path) -> None:
    code, out, _ = _cli("status", str(engine_run))
    assert code == 0
    assert LONG_ID in out  # never cut, even at the test console's 80 columns
    assert "capacity" in out and "/s/worker" in out and "wall rate" in out
    code, js, _ = _cli("status", str(engine_run), "--json")
    st = json.loads(js)
    meanf = next(s for s in st["stages"] if s["stage"] == LONG_ID)
    rows = pq.read_table(engine_run / "manifests" / LONG_ID)
    busy_s = pc.sum(rows.column("duration_ms")).as_py() / 1000.0
    assert meanf["capacity_per_worker"] == pytest.approx(rows.num_rows / busy_s)
    assert meanf["workers"] == len(set(rows.column("worker").to_pylist()))
    assert meanf["wall_rate"] is not None and meanf["wall_s"] >= busy_s / meanf["workers"] * 0.999
    assert meanf["wall_rate"] == pytest.approx(rows.num_rows / meanf["wall_s"])
    cap = meanf["capacity_per_worker"]
    assert (f"capacity {cap:.1f} /s/worker" in out) or (f"capacity {cap:,.0f} /s/worker" in out), out


def test_status_is_a_table_when_the_stage_names_fit(small_quickstart_run: Path) -> None:
    code, out, _ = _cli("status", str(small_quickstart_run))
    assert code == 0
    header = next(ln for ln in out.splitlines() if ln.startswith("stage "))
    assert header.split()[:7] == ["stage", "shards", "rows", "kept", "dropped", "errors", "workers"]
    assert "…" not in out
    for stage in ("image_stats", "consistency", "separation", "fingerprint"):
        assert re.search(rf"^{stage} +\d+/\d+ ", out, re.M), stage


def test_stages_lists_every_registered_stage_on_one_line_each() -> None:
    from stages.registry import known_stage_names

    code, out, _ = _cli("stages")
    assert code == 0
    lines = out.splitlines()
    assert sorted(line.split()[0] for line in lines) == known_stage_names()
    assert all(line.split()[1] in {"source", "mapper", "filter", "global", "sink"} for line in lines)


def test_stages_detect_shows_backend_with_the_default_the_model_has() -> None:
    from stages.mappers.detect import DetectParams

    code, out, _ = _cli("stages", "detect")
    assert code == 0
    default = json.dumps(DetectParams.model_fields["backend"].default)
    assert f"  backend: str = {default}\n" in out
    for part in ("min_face_size", "columns:", "face_box", "resources: cpus=", "version"):
        assert part in out


def test_an_unknown_stage_name_exits_2_naming_the_close_matches() -> None:
    code, out, err = _cli("stages", "quallity")
    assert code == USER_ERROR and out == ""
    assert err.count("\n") == 1 and "error:" in err and "quality" in err


def test_a_nan_or_infinite_float_in_a_run_config_exits_2_before_any_work_naming_the_key(tmp_path: Path) -> None:
    quickstart, folder = str(REPO / "examples" / "quickstart.yaml"), str(REPO / "examples" / "curate-folder.yaml")
    cases = [
        (quickstart, "stages.quality.params.min_det_score=.nan", "stages[6] (quality).params.min_det_score"),
        (quickstart, "export.thresholds.quality.yaw.max_abs=.nan", 'export.thresholds.quality.yaw.max_abs'),
        (quickstart, "export.thresholds={detect.det_score: {min: .inf}}", "export.thresholds.detect.det_score.min"),
        (folder, "stages.grouping.params.threshold=-.inf", "stages[8] (grouping).params.threshold"),
    ]
    for config, override, key in cases:
        code, _, err = _cli("run", config, "--output", str(tmp_path / "o"), "--set", override, "--no-progress")
        text = " ".join(err.split())
        assert code == USER_ERROR, (override, err)
        assert f"{key}: expected a finite number: NaN and infinity are not numbers" in text, (override, err)
    assert not (tmp_path / "o").exists(), "a refused run wrote something"


# ------------------------------------------------------------------ text from users and data is printed as it is

# Folder names (nested where they hold "/") that rich would read as markup or emoji codes, unbalanced
# and escaped brackets included.
MARKUP_NAMES = ("[/x]", "[bold]p[/bold]", "q[", "\\[b]", ":smile:")
MARKUP_ARGS = ("[bold red]hi[/bold red]", "[link=file:///etc]x[/link]", *MARKUP_NAMES)


def _flat(text: str) -> str:
    """Without the line breaks and padding a narrow terminal adds: the characters themselves must be kept."""
    return re.sub(r"\s+", "", text)


def _png(seed: int) -> bytes:
    import numpy as np

    from facekit.imaging import encode_png

    rng = np.random.default_rng(seed)
    return encode_png(np.clip(rng.normal(128, 30, (48, 48, 3)), 0, 255).astype(np.uint8))


def _corpus_config(tmp: Path, root: Path) -> Path:
    import yaml

    raw = {"name": "markup", "run": {"seed": 0, "shard_size": 6},
           "stages": [{"stage": "ingest", "params": {"root": str(root), "labels_from_dirs": True}},
                      {"stage": "image_stats"}],
           "export": {"enabled": False}}
    path = tmp / "markup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def markup_corpus_run(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> tuple[Path, Path]:
    """A run through the CLI of a corpus whose folders are named like markup (one zero-byte file: an
    error row), with the export turned off; and the corpus folder."""
    tmp = tmp_path_factory.mktemp("markup")
    root = tmp / "corpus"
    for i, name in enumerate(MARKUP_NAMES):
        (root / name).mkdir(parents=True)
        for j in range(2):
            (root / name / f"{j}.png").write_bytes(_png(10 * i + j))
    (root / "[/x]" / "empty.jpg").write_bytes(b"")
    out = tmp / "run"
    code, _, err = _cli("run", str(_corpus_config(tmp, root)), "-o", str(out))
    assert code == 0, err
    return out, root


def test_markup_in_a_corpus_is_printed_verbatim_by_status_and_lineage(markup_corpus_run: tuple[Path, Path]) -> None:
    out, _ = markup_corpus_run
    code, text, err = _cli("status", str(out))
    assert code == 0, err
    assert "complete" in text.splitlines()[0] and "incomplete" not in text, "export off: complete without one"
    code, js, _ = _cli("status", str(out), "--json")
    assert json.loads(js)["complete"] is True
    rows = pq.read_table(out / "manifests" / "ingest", columns=["sample_id", "source_path", "status"]).to_pylist()
    seen = set()
    for r in rows:
        code, text, err = _cli("lineage", str(out), r["sample_id"])
        assert code == 0 and not err, err
        assert _flat(f"source_path={r['source_path']}") in _flat(text), (r["source_path"], text)
        seen.add(r["source_path"].rsplit("/", 1)[0])
        if r["status"] != "ok":
            assert "error (" in text
    assert seen == set(MARKUP_NAMES)


def test_markup_in_a_run_path_is_printed_verbatim_from_the_run_to_its_status(
        tmp_path: Path, markup_corpus_run: tuple[Path, Path]) -> None:
    """The run's closing lines name only what exists: here the report cannot be written (a file holds its place)."""
    out = tmp_path / "[/x][bold]p[/bold]q[:smile:"
    out.mkdir(parents=True)
    (out / "report").write_text("not a folder")
    cfg = _corpus_config(tmp_path, markup_corpus_run[1])
    res = CliRunner().invoke(app, ["run", str(cfg), "-o", str(out), "--no-progress"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code in (0, 1) and "Traceback" not in res.stderr
    assert _flat(f"run {out}: ") in _flat(res.stderr)
    assert "report not written" in res.stderr and "index.html" not in res.stderr
    assert "facefoundrystatus" + _flat(str(out)) in _flat(res.stderr).replace("'", "")
    code, text, err = _cli("status", str(out))
    assert code == 0 and "Traceback" not in err
    assert _flat(str(out)) in _flat(text)


def _one_line_error(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == USER_ERROR, (args, res.exit_code, res.stderr, res.exception)
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.stderr)
    assert not res.stdout, (args, res.stdout)
    return lines[0]


def test_markup_in_arguments_is_printed_verbatim_in_error_lines(engine_run: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for text in MARKUP_ARGS:
        assert repr(text) in _one_line_error("lineage", str(engine_run), text), text
        missing, under_a_file = f"{tmp_path}/{text}", f"{a_file}/{text}"
        for args in (("status", missing), ("lineage", missing, "x"),
                     ("run", str(REPO / "examples" / "quickstart.yaml"), "-o", under_a_file)):
            assert args[-1 if args[0] == "run" else 1] in _one_line_error(*args), args
        if "://" not in text:  # query opens its run outside its error handling (a URL-like path is refused there)
            assert missing in _one_line_error("query", missing, "SELECT 1")


# ------------------------------------------------------------------ user errors: exit 2, one line, before any work


def test_an_output_that_cannot_be_a_writable_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import ENGINE_CONFIG

    cfg = tmp_path / "engine.yaml"
    cfg.write_text(yaml.safe_dump(ENGINE_CONFIG))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {str(a_file): "is not a folder", str(a_file / "run"): "Not a directory",
             "/dev/null": "is not a folder", "/proc/ff-no-such/run": "cannot create",
             "/sys/kernel/ff-run": "cannot create", "/proc/self": "cannot write in"}
    if os.geteuid() != 0:  # root writes into a 0555 folder: the filesystem, not the mode, decides
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases[str(locked / "run")] = "Permission denied"
    for output, why in cases.items():
        line = _one_line_error("run", str(cfg), "-o", output, "--no-progress")
        assert output in line and why in line, (output, line)
    assert not Path("/sys/kernel/ff-run").exists() and a_file.read_text() == "x"
    for cpus in ("-1", "0"):
        line = _one_line_error("run", str(cfg), "-o", str(tmp_path / "o"), "--num-cpus", cpus)
        assert "1 or more" in line and f"got {cpus}" in line
    assert not (tmp_path / "o").exists()


CORRUPT_RUN_FILES = (b"", b"config_hash: [unclosed\n", b"- a list\n- of items\n", b"\xff\xfe\x00",
                     b"config_hash: abc\n", b"config: {stages: [{stage: x}]}\nfingerprints: [a]\n",
                     b"config_hash: abc\nfingerprints: {}\nconfig: {stages: []}\n",
                     b"config_hash: abc\nfingerprints: {}\nconfig: {stages: [{id: x}]}\n")


@pytest.mark.parametrize("content", CORRUPT_RUN_FILES)
def test_a_corrupt_or_empty_run_yaml_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    import yaml

    from tests.conftest import ENGINE_CONFIG

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_bytes(content)
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(yaml.safe_dump(ENGINE_CONFIG))
    for args in (("status", str(run)), ("status", str(run), "--json"), ("query", str(run), "SELECT 1"),
                 ("lineage", str(run), "x"), ("run", str(cfg), "-o", str(run), "--no-progress")):
        line = _one_line_error(*args)
        assert f"{run}/run.yaml is not a facefoundry run file" in line, (args, line)
    assert (run / "run.yaml").read_bytes() == content, "a refused resume rewrote the run file"


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly_with_the_resume_hint_and_the_run_then_resumes(tmp_path: Path) -> None:
    from tests.pipeline.engine.test_resume import _cli as run_cli
    from tests.pipeline.engine.test_resume import _committed, _finish, _running_with_commits

    config, out, proc = _running_with_commits(tmp_path)
    proc.send_signal(signal.SIGTERM)  # the driver only, as a service manager or `kill PID` sends it
    try:
        text = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "terminated: committed shards are kept; run the same command again to resume." in text
    assert "SIGTERM received" not in text and "absl" not in text and "Traceback" not in text, text[-3000:]
    assert _committed(out, "busy") >= 2 and not (out / "export" / "export.json").exists()
    _finish(run_cli(config, out))
    assert (out / "export" / "export.json").exists()


LONG_QUERY = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM t) SELECT count(*) FROM t"


def test_columns_of_the_same_name_keep_distinct_names_in_every_format(engine_run: Path, tmp_path: Path) -> None:
    run = str(engine_run)
    code, out, _ = _cli("query", run, "SELECT 1 AS a, 2 AS a")
    assert code == 0 and re.search(r"\ba\b.*\ba_2\b", out) and re.search(r"1 +│ +2 ", out), out
    assert _cli("query", run, "SELECT 1 AS a, 2 AS a, 3 AS a_2", "-f", "csv")[1] == "a,a_3,a_2\n1,2,3\n"
    assert json.loads(_cli("query", run, "SELECT 1 AS a, 2 AS a", "-f", "json")[1]) == [{"a": 1, "a_2": 2}]
    nan = "SELECT 'nan'::DOUBLE AS a, ['-inf'::DOUBLE, 1.5] AS a"
    strict = json.loads(_cli("query", run, nan, "-f", "json")[1], parse_constant=lambda c: pytest.fail(c))
    assert strict == [{"a": None, "a_2": [None, 1.5]}]
    code, _, _ = _cli("query", run, "SELECT 1 AS a, 2 AS a", "-f", "parquet", "--out", str(tmp_path / "a.parquet"))
    assert code == 0 and pq.read_table(tmp_path / "a.parquet").to_pylist() == [{"a": 1, "a_2": 2}]
    join = f'FROM pattern q JOIN "{LONG_ID}" d USING (sample_id) WHERE q.keep <> d.keep'
    code, out, _ = _cli("query", run, f"SELECT q.keep, d.keep {join}", "-f", "json")
    rows = json.loads(out)
    n = json.loads(_cli("query", run, f"SELECT count(*) AS n {join}", "-f", "json")[1])[0]["n"]
    assert code == 0 and n > 0 and len(rows) == n
    assert all(r["keep"] is True and r["keep_2"] is False for r in rows), rows


def test_out_into_the_run_onto_a_folder_or_under_a_missing_one_is_refused_before_the_query(
        engine_run: Path, tmp_path: Path) -> None:
    files = {p: p.read_bytes() for p in sorted(engine_run.rglob("*")) if p.is_file()}
    fragment = next(p for p in files if p.parent.name == "pattern" and p.suffix == ".parquet")
    (tmp_path / "into-run.parquet").symlink_to(fragment)
    cases = [
        ("-f", "parquet", "--out", str(fragment)),
        ("-f", "csv", "--out", str(engine_run / "result.csv")),
        ("-f", "parquet", "--out", str(tmp_path / "into-run.parquet")),
        ("-f", "json", "--out", str(tmp_path)),
        ("-f", "csv", "--out", str(tmp_path / "missing" / "x.csv")),
        ("--out", str(tmp_path / "table.txt")),
    ]
    for args in cases:
        code, out, err = _cli("query", str(engine_run), "SELECT * FROM pattern", *args)
        assert code == USER_ERROR and err.count("error:") == 1 and "--out" in err and not out, (args, err)
    assert {p: p.read_bytes() for p in sorted(engine_run.rglob("*")) if p.is_file()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["into-run.parquet"]


def test_a_table_with_a_limit_reads_only_what_it_shows_at_flat_memory(engine_run: Path) -> None:
    code, out, _ = _cli("query", str(engine_run), "SELECT * FROM range(5)", "--limit", "3")
    assert code == 0 and "first 3 rows shown; more rows exist" in out
    code, out, _ = _cli("query", str(engine_run), "SELECT * FROM range(5)", "--limit", "5")
    assert code == 0 and "5 rows" in out and "more rows" not in out
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_query.py"), str(engine_run),
                          "--sizes", "1000000", "10000000"], capture_output=True, text=True, check=True)
    small, large = json.loads(res.stdout)["peak_rss_mb"]
    assert large < 1.5 * small + 100, (small, large)


def _query_process(run: Path, tmp: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "query", str(run), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_running_query_with_one_line_and_removes_its_temp_folder(
        engine_run: Path, tmp_path: Path, sig: signal.Signals, code: int) -> None:
    proc = _query_process(engine_run, tmp_path, LONG_QUERY, "--timeout", "0")
    for _ in range(600):  # the catalog's folder appears once the CLI is up: the query starts right after
        if list(tmp_path.glob("ff-catalog-*/catalog.duckdb")) or proc.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(sig)
    rc, err = _finish(proc)
    assert rc == code and err.strip() == f"error: query stopped by {sig.name}", (rc, err)
    assert not list(tmp_path.iterdir())


def test_a_timeout_and_the_memory_limit_stop_a_query_with_one_line(engine_run: Path, tmp_path: Path) -> None:
    rc, err = _finish(_query_process(engine_run, tmp_path, LONG_QUERY, "--timeout", "1"))
    assert rc == 124 and err.strip() == "error: query stopped after 1 s (--timeout)", (rc, err)
    # 20 strings of 100 MB: DuckDB's own memory_limit does not count the rows it hands to Arrow.
    big = "SELECT repeat('x', 100000000) AS s FROM range(20)"
    rc, err = _finish(_query_process(engine_run, tmp_path, big, "-f", "csv", "--memory-limit", "400MB"))
    stopped = re.fullmatch(r"error: query stopped: memory \d+ MB > 400 MB \(--memory-limit\)\n", err)
    assert rc == USER_ERROR and stopped, (rc, err)
    assert not list(tmp_path.iterdir())


def test_the_memory_limit_counts_what_the_query_adds_not_what_its_process_already_held(engine_run: Path) -> None:
    """A process that already holds more than the cap (a notebook, a test process with models loaded)
    still runs a small query: the cap is on the query's own memory."""
    held = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident before the query starts
    code, out, err = _cli("query", str(engine_run), "SELECT count(*) AS n FROM decisions", "-f", "csv",
                          "--memory-limit", "200MB")
    assert code == 0 and out.splitlines()[0] == "n" and int(out.splitlines()[1]) > 0, (code, out, err)
    assert held.sum() == held.size
