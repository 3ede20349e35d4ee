"""The quickstart config end to end through the CLI, at a tiny size via --set, then the commands a
user tries next: status, query, lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from tests.fixtures import REPO

SMALL = ["--set", "identities.count=10", "--set", "identities.images_per_identity=5", "--set", "run.shard_size=25",
         "--set", "export.val_fraction=0.2", "--set", "export.min_images_per_identity=2"]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "run"
    proc = _cli("run", "examples/quickstart.yaml", "--output", str(out), "--no-progress", *SMALL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "complete" in proc.stderr and "facefoundry lineage" in proc.stderr
    return out


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_exports_aligned_faces(quickstart_run: Path) -> None:
    status = json.loads(_cli("status", str(quickstart_run), "--json").stdout)
    assert status["complete"]
    stages = [s["stage"] for s in status["stages"]]
    assert stages == ["render", "image_stats", "fingerprint", "detect", "align", "embed", "quality", "labels",
                      "consistency", "separation", "dedup"]
    assert all(s["shards_committed"] == s["shards_total"] == 2 for s in status["stages"])
    assert status["stages"][0]["samples"] == 50
    done = json.loads((quickstart_run / "export" / "export.json").read_text())
    train = [str(quickstart_run / p) for p in done["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(train, shardshuffle=False).decode("rgb8"))
    assert samples and all(s["png"].shape == (112, 112, 3) for s in samples)
    assert (quickstart_run / "report" / "index.html").read_text().count("<img") > 0
    card = (quickstart_run / "export" / "dataset_card.md").read_text()
    assert "## Splits (by identity)" in card and "pose_bin" in card


@pytest.mark.slow
def test_quickstart_query_and_lineage_commands(quickstart_run: Path) -> None:
    q = _cli("query", str(quickstart_run), "SELECT sample_id, quality.yaw AS yaw, render.gt_yaw AS gt FROM samples "
             "WHERE quality.status = 'ok' ORDER BY sample_id", "--format", "json")
    assert q.returncode == 0, q.stderr
    rows = json.loads(q.stdout)
    assert len(rows) >= 40
    exported = pq.read_table(quickstart_run / "export" / "manifest.parquet").to_pylist()[0]["sample_id"]
    lin = _cli("lineage", str(quickstart_run), exported, "--json")
    assert lin.returncode == 0, lin.stderr
    trace = json.loads(lin.stdout)
    assert [r["stage"] for r in trace][:3] == ["render", "image_stats", "fingerprint"]
    assert trace[-1]["stage"] == "export"
    detect = next(r for r in trace if r["stage"] == "detect")
    assert detect["model_name"].startswith("opencv_zoo:face_detection_yunet") and detect["model_revision"]
    csv = _cli("query", str(quickstart_run), "SELECT count(*) AS n FROM identities", "-f", "csv")
    assert csv.stdout.strip().splitlines() == ["n", "10"]
    bad = _cli("query", str(quickstart_run), "DROP VIEW samples")
    assert bad.returncode == 2 and "only SELECT" in bad.stderr


@pytest.mark.slow
def test_recognition_training_reads_the_pipeline_export_and_writes_metrics(quickstart_run: Path) -> None:
    proc = _cli("train", "recognition", "examples/train-recognition.yaml",
                "--set", f"data.export={quickstart_run}", "--set", "model.name=iresnet_tiny",
                "--set", "data.input_size=48", "--set", "data.batch_size=16", "--set", "data.loader_workers=0",
                "--set", "scaling.num_workers=0", "--set", "scaling.use_gpu=false", "--set", "max_steps=4",
                "--set", "eval.pairs=20", "--set", "optimizer.name=adamw", "--set", "optimizer.lr=0.001")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = list((quickstart_run / "train").glob("*/checkpoints/step-*/checkpoint.json"))
    assert ckpts, list(quickstart_run.rglob("*"))[:50]
    meta = json.loads(ckpts[-1].read_text())
    import hashlib

    export_hash = hashlib.sha256((quickstart_run / "export" / "export.json").read_bytes()).hexdigest()
    assert export_hash in json.dumps(meta)
    q = _cli("query", str(quickstart_run), "SELECT count(*) AS n FROM metrics", "-f", "csv")
    assert q.returncode == 0 and int(q.stdout.strip().splitlines()[-1]) > 0, q.stderr


@pytest.mark.slow
def test_quickstart_drops_no_render_as_a_duplicate_of_another(quickstart_run: Path) -> None:
    """Every render is a distinct picture: renders of one identity may be close in identity space (reported
    as redundant variants), but none is a duplicate of another."""
    q = _cli("query", str(quickstart_run), "SELECT count(*) AS n FROM decisions WHERE reason = 'duplicate_of'",
             "-f", "csv")
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip().splitlines() == ["n", "0"]
    summary = json.loads((quickstart_run / "report" / "dedup.summary.json").read_text())
    assert summary["dropped"] == 0 and summary["duplicates"] == {"exact": 0, "phash": 0, "embedding": 0}
    assert summary["picture_min_similarity"] > 0 and "redundant_variants" in summary
