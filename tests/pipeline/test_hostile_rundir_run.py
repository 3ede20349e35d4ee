"""A run directory whose name holds glob and quote characters, through real runs (Ray, tars, Parquet,
compaction, the report, the export) and the CLI (status, query, lineage): it completes and every
reader gives the counts of a plain-named run of the same config. Beside it sits the directory its
name matches when read as a glob, holding every committed Parquet file twice: a reader that globbed
the unescaped path would read that one instead and count double."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from manifests.layout import EXPORT_DIR, EXPORT_MANIFEST
from manifests.storage import RunStorage
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.engine.runner import Runner
from pipeline.report import build_report
from tests.conftest import ENGINE_CONFIG

pytestmark = pytest.mark.usefixtures("ray_session")

GLOB_NAME = "r[1]*?{a,b}'q"
NEIGHBOUR = "r1xy{a,b}'q"  # what GLOB_NAME names as a glob: [1] -> 1, * -> x, ? -> y
# Two samples of ENGINE_CONFIG's seed whose filter raises: error rows with NULL keep and NULL scores.
FAILING = ("0b3900adca870b269a8c1778", "237dbcb2dc66d4bd5ae074c7")
CONFIG = copy.deepcopy(ENGINE_CONFIG)
CONFIG["stages"][1]["params"]["fail_on"] = list(FAILING)
CONFIG["export"]["where"] = "meanf__mean IS NULL OR pattern__variant >= 0"  # NULL scores must not select


def _run(out: Path) -> None:
    cfg, stages = load_config(raw=CONFIG)
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete and res.export_ran, res


def _double_every_committed_parquet(root: Path) -> None:
    for folder in [*(root / "manifests").iterdir(), *(root / "tables").iterdir()]:
        for f in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            shutil.copy(f, folder / f"dup-{f.name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rundirs")
    plain, hostile = base / "plain", base / GLOB_NAME
    _run(plain)
    shutil.copytree(plain, base / NEIGHBOUR)
    _double_every_committed_parquet(base / NEIGHBOUR)
    _run(hostile)
    return plain, hostile


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout)


def _seen(run: Path) -> dict[str, Any]:
    """What a user sees of a run through every reader."""
    status = _cli("status", str(run), "--json")
    lineage = _cli("lineage", str(run), FAILING[0], "--json")
    exported = pq.read_table(run / EXPORT_DIR / EXPORT_MANIFEST, columns=["sample_id"]).column(0).to_pylist()
    done = json.loads((run / EXPORT_DIR / "export.json").read_text())
    return {
        "status": [{k: s[k] for k in ("stage", "samples", "kept", "dropped", "errors", "shards_committed")}
                   for s in status["stages"]],
        "decisions": _cli("query", str(run), "SELECT stage, status, keep, count(*) AS n FROM decisions "
                          "GROUP BY ALL ORDER BY ALL", "-f", "json"),
        "stage_views": _cli("query", str(run), "SELECT (SELECT count(*) FROM pattern) AS p, "
                            "(SELECT count(*) FROM meanf) AS m, (SELECT count(*) FROM samples) AS s", "-f", "json"),
        "lineage": [(r["stage"], r.get("status"), r.get("reason")) for r in lineage],
        "exported": sorted(exported),
        "splits": {k: (v["samples"], v["identities"]) for k, v in done["splits"].items()},
    }


def test_a_run_directory_with_glob_characters_completes_and_reads_its_own_files_only(runs: tuple[Path, Path]) -> None:
    plain, hostile = runs
    want, got = _seen(plain), _seen(hostile)
    assert got == want
    assert [s["errors"] for s in got["status"]] == [0, len(FAILING)]
    assert got["stage_views"] == [{"p": 24, "m": 24, "s": 24}]
    assert got["lineage"][-1][1] == "error"
    assert got["exported"] and not set(FAILING) & set(got["exported"])  # error rows are never selected
    assert len(set(got["exported"])) == len(got["exported"]) == sum(n for n, _ in got["splits"].values())
    for stage in ("pattern", "meanf"):  # compaction copied the run's own fragments
        pointer = json.loads((hostile / "manifests" / stage / "_compacted" / "current.json").read_text())
        assert pointer["rows"] == 24
    for run in runs:  # the report the run wrote, and one built again, show the error rows' examples
        assert (run / "report" / "index.html").is_file()
        assert FAILING[0] in build_report(RunStorage(str(run)))
