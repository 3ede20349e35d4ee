"""The run engine end to end on a real local Ray: commit protocol, catalog, lineage, reruns, export."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from manifests.catalog import Catalog, QueryError
from manifests.lineage import trace
from manifests.storage import RunStorage
from pipeline.config import load_config
from pipeline.engine.execution import PreparedStage, write_pixels
from pipeline.engine.rundir import RunConflictError, RunLockedError, run_lock
from pipeline.engine.runner import Runner
from tests.fixtures import completed_run, run_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _manifest_rows(out: Path, stage: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in sorted(glob.glob(str(out / "manifests" / stage / "*.parquet"))):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import ENGINE_CONFIG

    return completed_run(ENGINE_CONFIG, tmp_path_factory.mktemp("engine") / "run")


def test_every_sample_has_one_row_per_stage_and_the_filter_decides(finished_run: Path) -> None:
    pattern = _manifest_rows(finished_run, "pattern")
    meanf = _manifest_rows(finished_run, "meanf")
    assert len(pattern) == 24 and len({r["sample_id"] for r in pattern}) == 24
    assert {r["sample_id"] for r in meanf} == {r["sample_id"] for r in pattern}
    dropped = [r for r in meanf if not r["keep"]]
    assert all(r["mean"] < 60 and r["reason"] == "mean_below_min" and "< 60" in r["detail"] for r in dropped)
    assert all(r["mean"] >= 60 for r in meanf if r["keep"])
    assert all(r["params_hash"] and r["fingerprint"] and r["worker"] for r in meanf)


def test_exported_shards_read_back_with_webdataset_and_ray_data(finished_run: Path) -> None:
    import ray.data

    done = json.loads((finished_run / "export" / "export.json").read_text())
    # export.json (the commit) names the shards of the committed version, relative to the run.
    train = [str(finished_run / p) for p in done["splits"]["train"]["shards"]]
    assert train and train == sorted(glob.glob(str(finished_run / "export" / done["version"] / "train" / "*.tar")))
    samples = list(wds.WebDataset(train, shardshuffle=False).decode("rgb8"))
    assert len(samples) == done["splits"]["train"]["samples"]
    labels = {int(s["cls"]) for s in samples}
    assert labels == set(range(done["splits"]["train"]["identities"]))
    assert all(s["png"].shape == (32, 32, 3) for s in samples)
    val_ids = {s["json"]["identity_id"] for s in wds.WebDataset(
        [str(finished_run / p) for p in done["splits"]["val"]["shards"]], shardshuffle=False).decode("rgb8")}
    train_ids = {s["json"]["identity_id"] for s in samples}
    assert val_ids and not (val_ids & train_ids), "an identity is in two splits"
    ds = ray.data.read_webdataset(train)
    assert ds.count() == len(samples)


def test_manifests_are_plain_parquet_for_duckdb_and_pyarrow(finished_run: Path) -> None:
    files = sorted(glob.glob(str(finished_run / "manifests" / "meanf" / "*.parquet")))
    n_arrow = sum(pq.read_table(f).num_rows for f in files)
    n_duck = duckdb.sql(f"SELECT count(*) FROM read_parquet('{finished_run}/manifests/meanf/*.parquet')").fetchall()
    assert n_arrow == n_duck[0][0] == 24


def test_catalog_views_and_struct_columns(finished_run: Path) -> None:
    cat = Catalog(RunStorage(str(finished_run)), ["pattern", "meanf"])
    t = cat.query("SELECT sample_id, meanf.mean AS m, meanf.keep AS k, pattern.variant AS v FROM samples")
    assert t.num_rows == 24
    assert cat.query("SELECT count(*) AS n FROM decisions").column("n")[0].as_py() == 48
    assert cat.query("SELECT count(*) AS n FROM identities").column("n")[0].as_py() == 6


def test_user_sql_cannot_write(finished_run: Path, tmp_path: Path) -> None:
    cat = Catalog(RunStorage(str(finished_run)), ["pattern", "meanf"])
    with pytest.raises(QueryError, match="only SELECT"):
        cat.query(f"COPY (SELECT 1) TO '{finished_run}/manifests/meanf/evil.parquet'")
    with pytest.raises(QueryError, match="only SELECT"):
        cat.query("CREATE TABLE t AS SELECT 1")
    with pytest.raises(duckdb.Error):
        cat.query("SELECT * FROM read_csv('/etc/passwd')")
    assert not (finished_run / "manifests" / "meanf" / "evil.parquet").exists()


def test_lineage_traces_a_sample_through_every_stage_to_its_training_shard(finished_run: Path) -> None:
    store = RunStorage(str(finished_run))
    exported = pq.read_table(finished_run / "export" / "manifest.parquet").to_pylist()
    sid = exported[0]["sample_id"]
    rows = trace(store, ["pattern", "meanf"], sid)
    assert [r["stage"] for r in rows] == ["pattern", "meanf", "export"]
    assert rows[0]["output_shard"].startswith("shards/pattern/")
    assert rows[1]["input_shard"] == rows[0]["output_shard"]
    assert rows[2]["export_shard"] == exported[0]["export_shard"]


def test_a_sample_whose_processing_raises_gets_an_error_row_and_the_run_goes_on(
        tmp_path: Path, engine_config: dict) -> None:
    first = run_config(engine_config, tmp_path / "probe", overrides=["export.enabled=false"])
    assert first.complete
    victim = _manifest_rows(tmp_path / "probe", "pattern")[5]["sample_id"]
    engine_config["stages"][1]["params"]["fail_on"] = [victim]
    res = run_config(engine_config, tmp_path / "run")
    assert res.complete
    rows = {r["sample_id"]: r for r in _manifest_rows(tmp_path / "run", "meanf")}
    assert len(rows) == 24
    assert rows[victim]["status"] == "error" and rows[victim]["reason"] == "stage_error"
    assert "planted failure" in rows[victim]["detail"]
    assert sum(r["status"] == "error" for r in rows.values()) == 1


def test_a_tar_without_its_manifest_is_invisible_and_recomputed_identically(tmp_path: Path,
                                                                             engine_config: dict) -> None:
    out = tmp_path / "run"
    assert run_config(engine_config, out, overrides=["export.enabled=false"]).complete
    tar = out / "shards" / "pattern" / "000001.tar"
    manifest = out / "manifests" / "pattern" / "000001.parquet"
    original = tar.read_bytes()
    # Simulate a crash after the shard was written and before its manifest was committed.
    manifest.unlink()
    for later in glob.glob(str(out / "manifests" / "meanf" / "000001.parquet")):
        os.unlink(later)
    tar.write_bytes(b"half-written garbage")
    cat = Catalog(RunStorage(str(out)), ["pattern", "meanf"])
    assert cat.query("SELECT count(*) AS n FROM pattern").column("n")[0].as_py() == 16
    res = run_config(engine_config, out, overrides=["export.enabled=false"])
    assert res.stages["pattern"]["computed"] == 1 and res.stages["pattern"]["resumed"] == 2
    assert tar.read_bytes() == original


def test_executor_commits_manifest_last(tmp_path: Path, engine_config: dict) -> None:
    cfg, stages = load_config(raw=engine_config)
    runner = Runner(cfg, stages, str(tmp_path / "run"), show_progress=False)
    runner.prepare(force=False, new=False)
    runner.prepare_source()
    plan = runner.shard_plan()
    ex = PreparedStage(runner.spec(stages[0]))
    out = {}
    for part in ex.stage.read(plan[0]["spec"]):  # type: ignore[attr-defined]
        out = part
    out.update(status=["ok"] * len(out["sample_id"]), keep=[True] * len(out["sample_id"]),
               reason=[None] * len(out["sample_id"]), parent_id=[None] * len(out["sample_id"]))
    write_pixels(ex.store, ex.spec, "000000", out)
    assert (tmp_path / "run" / "shards" / "pattern" / "000000.tar").exists()
    assert Catalog(ex.store, ["pattern"]).query("SELECT count(*) AS n FROM pattern").column("n")[0].as_py() == 0


def test_changed_config_is_refused_then_force_recomputes_from_the_changed_stage(tmp_path: Path,
                                                                                engine_config: dict) -> None:
    out = tmp_path / "run"
    assert run_config(engine_config, out).complete
    with pytest.raises(RunConflictError, match=r"(?s)stage .meanf. changed.*--force.*--new"):
        run_config(engine_config, out, overrides=["stages.meanf.params.min_mean=90"])
    res = run_config(engine_config, out, overrides=["stages.meanf.params.min_mean=90"], force=True)
    assert res.stages["pattern"] == {**res.stages["pattern"], "computed": 0, "resumed": 3}
    assert res.stages["meanf"]["computed"] == 3
    res = run_config(engine_config, out, overrides=["run.seed=9"], new=True)
    assert res.stages["pattern"]["computed"] == 3


def test_changing_only_an_export_threshold_reruns_only_the_export(tmp_path: Path, engine_config: dict) -> None:
    out = tmp_path / "run"
    first = run_config(engine_config, out)
    assert first.export_ran
    again = run_config(engine_config, out)
    assert not again.export_ran and all(s["computed"] == 0 for s in again.stages.values())
    looser = run_config(engine_config, out, overrides=['export.thresholds={"meanf.mean": {"min": 10}}'])
    assert looser.export_ran and all(s["computed"] == 0 for s in looser.stages.values())
    assert looser.export is not None and first.export is not None
    n_first = sum(s["samples"] for s in first.export["splits"].values())
    n_loose = sum(s["samples"] for s in looser.export["splits"].values())
    assert n_loose > n_first


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_the_lock(tmp_path: Path,
                                                                                   engine_config: dict) -> None:
    out = tmp_path / "run"
    with run_lock(RunStorage(str(out))), pytest.raises(RunLockedError, match="in use by"):
        run_config(engine_config, out)


def test_a_finished_run_has_every_stage_compacted_and_the_catalog_reads_the_copy(finished_run: Path) -> None:
    from manifests.compaction import valid_compaction

    store = RunStorage(str(finished_run))
    for sid in ("pattern", "meanf"):
        pointer = valid_compaction(store, sid)
        assert pointer is not None and pointer["rows"] == 24 and len(pointer["fragments"]) == 3
    cat = Catalog(store, ["pattern", "meanf"])
    assert cat.source("meanf").compacted is not None
    assert cat.query("SELECT count(*) AS n FROM meanf").column("n")[0].as_py() == 24
