"""A truncated manifest, a truncated tar and a silently corrupted tar: reported, never counted as
committed, never breaking status or queries, recomputed; the run completes byte-identical."""

from __future__ import annotations

import glob
import io
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from manifests.catalog import Catalog
from manifests.schema import VOLATILE
from manifests.storage import RunStorage
from pipeline.config import load_config
from pipeline.engine.runner import Runner, RunResult
from pipeline.status import run_status

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(raw: dict[str, Any], out: Path) -> tuple[RunResult, str]:
    cfg, stages = load_config(raw=raw, overrides=["export.enabled=false"])
    text = io.StringIO()
    res = Runner(cfg, stages, str(out), show_progress=False, console=Console(file=text, width=400)).run()
    return res, text.getvalue()


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {os.path.relpath(p, root): Path(p).read_bytes() for p in sorted(glob.glob(str(root / pattern)))}


def _rows(root: Path, stage: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in sorted(glob.glob(str(root / "manifests" / stage / "*.parquet"))):
        rows.extend({k: v for k, v in r.items() if k not in VOLATILE} for r in pq.read_table(f).to_pylist())
    return rows


def _assert_same(ref: Path, out: Path) -> None:
    a, b = _files(ref, "shards/*/*.tar"), _files(out, "shards/*/*.tar")
    assert a.keys() == b.keys() and a == b
    for stage in ("pattern", "meanf"):
        assert _rows(ref, stage) == _rows(out, stage)


def _finished_copy(tmp_path: Path, raw: dict[str, Any]) -> tuple[Path, Path]:
    """A finished run ``ref`` of ``raw`` and a copy of it, ``out``, to damage."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _run(raw, ref)[0].complete
    shutil.copytree(ref, out)
    return ref, out


def test_a_truncated_manifest_and_a_truncated_tar_are_reported_and_recomputed(tmp_path: Path,
                                                                            engine_config: dict) -> None:
    ref, out = _finished_copy(tmp_path, engine_config)
    manifest = out / "manifests" / "meanf" / "000002.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-100])  # a disk that lost the tail
    tar = out / "shards" / "pattern" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:1024])  # the tail of the pixels gone: once silently empty images

    store = RunStorage(str(out))
    status = run_status(store)  # never broken by a bad fragment
    committed = {s["stage"]: s["shards_committed"] for s in status["stages"]}
    assert committed == {"pattern": 2, "meanf": 2} and not status["complete"]
    reported = [m for s in status["stages"] for m in s["not_committed"]]
    assert len(reported) == 2 and any("truncated manifest" in m for m in reported)
    n = Catalog(store, ["pattern", "meanf"]).query("SELECT count(*) AS n FROM meanf").column("n")[0].as_py()
    assert n == 16

    res, text = _run(engine_config, out)
    assert res.complete, res.failures
    assert "manifests/meanf/000002.parquet: truncated manifest" in text
    assert "shards/pattern/000001.tar is 1024 bytes, committed as" in text
    # meanf: its truncated fragment, and the shard whose input tar was rewritten
    assert res.stages["pattern"]["computed"] == 1 and res.stages["meanf"]["computed"] == 2
    _assert_same(ref, out)


@pytest.mark.faults
def test_a_tar_corrupted_in_place_is_caught_by_its_checksum_when_read_and_recomputed(tmp_path: Path,
                                                                                   engine_config: dict) -> None:
    ref, out = _finished_copy(tmp_path, engine_config)
    tar = out / "shards" / "pattern" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size: only the checksum can tell
    tar.write_bytes(bytes(data))
    (out / "manifests" / "meanf" / "000001.parquet").unlink()  # so that a stage reads the tar

    res, _ = _run(engine_config, out)
    # The reader refuses the tar and uncommits the stage that wrote it: never an image from bad bytes.
    assert not res.complete
    assert any("not committed" in f["error"] and f["shard"] == "000001" for f in res.failures), res.failures
    assert not (out / "manifests" / "pattern" / "000001.parquet").exists()
    res, _ = _run(engine_config, out)
    assert res.complete, res.failures
    # Only shard 000001 is left: its source tar is rewritten, and meanf reads the new one.
    assert res.stages["pattern"]["computed"] == 1 and res.stages["meanf"]["computed"] == 1
    _assert_same(ref, out)


@pytest.mark.faults
def test_an_export_never_copies_bytes_damaged_after_their_commit_and_the_rerun_exports_them_right(
        tmp_path: Path, engine_config: dict) -> None:
    ref = tmp_path / "ref"
    res, _ = _run_export(engine_config, ref)
    assert res.complete, res.failures
    out = tmp_path / "run"
    cfg_off, stages = load_config(raw=engine_config, overrides=["export.enabled=false"])
    assert Runner(cfg_off, stages, str(out), show_progress=False, console=Console(file=io.StringIO())).run().complete
    # One image member of a committed tar flipped in place, same size: every stage has already read the
    # tar, so only the export's byte-range read meets it, and only its checksum can tell.
    row = next(r for r in pq.read_table(out / "manifests" / "pattern" / "000001.parquet").to_pylist()
               if r["tar_offset"] is not None)
    tar = out / "shards" / "pattern" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[row["tar_offset"] + row["tar_size"] // 2] ^= 0xFF
    tar.write_bytes(bytes(data))

    res, _ = _run_export(engine_config, out)
    assert not res.complete
    assert any(f["stage"] == "export" and "shards/pattern/000001.tar" in f["error"] and "CRC-32" in f["error"]
               for f in res.failures), res.failures
    assert not (out / "export" / "export.json").exists(), "an export was committed from damaged bytes"
    assert not (out / "manifests" / "pattern" / "000001.parquet").exists(), "the damaged shard stays committed"

    res, _ = _run_export(engine_config, out)
    assert res.complete, res.failures
    assert res.stages["pattern"]["computed"] == 1
    _assert_same(ref, out)
    assert _files(ref, "export/*/*/*.tar") == _files(out, "export/*/*/*.tar")


def _run_export(raw: dict[str, Any], out: Path) -> tuple[RunResult, str]:
    cfg, stages = load_config(raw=raw)
    text = io.StringIO()
    res = Runner(cfg, stages, str(out), show_progress=False, console=Console(file=text, width=400)).run()
    return res, text.getvalue()
