"""The command line's manners: --version and -h, readable wide results, ISO-8601 JSON, exit code 2 for
every user error, and a status table that names every stage in full with both throughputs."""

from __future__ import annotations

import ast
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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
