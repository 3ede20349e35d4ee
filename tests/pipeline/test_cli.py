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
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
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


def test_version_and_short_help() -> None:
    code, out, _ = _cli("--version")
    assert code == 0 and re.fullmatch(r"facefoundry \S+.*\n", out)
    for args in (["-h"], ["status", "-h"], ["train", "-h"], ["train", "recognition", "-h"]):
        code, out, _ = _cli(*args)
        assert code == 0 and "Usage" in out, args


def test_every_user_error_exits_2_with_a_message(engine_run: Path, tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [{stage: render, params: {size: tiny}}]\n")
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
