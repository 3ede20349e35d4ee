"""Acceptance: a recognition model trained for a few minutes on a procedural export tells apart
identities it never saw (the export's held-out val identities), measured here by the test."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest
import torch

from tests.fixtures import EXAMPLES
from tests.fixtures.procedural_export import ProceduralExportSpec, tiny_recognition_job, write_procedural_export
from training.config import (
    RecognitionTrainConfig,
    TrainConfigError,
    VerificationEvalConfig,
    load_train_config,
)
from training.export_index import load_export
from training.job_layout import TrainResult
from training.recognition import train_recognition
from training.verification import evaluate_verification, export_pairs_to_bin

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    run = tmp_path_factory.mktemp("recognition-run")
    # 40 training identities and 20 held-out identities, 8 crops each (112 px, the export format).
    write_procedural_export(
        run,
        ProceduralExportSpec(train_identities=40, val_identities=20, images_per_identity=8, shard_size=64),
    )
    overrides = tiny_recognition_job(
        run, "recognition", 120, input_size=48, batch_size=32, embedding_size=128,
        data={"shuffle_buffer": 256},
        log_every=20,
        loss={"kind": "cosface", "scale": 32.0},
        optimizer={"name": "adamw", "lr": 0.002, "weight_decay": 0.0005, "warmup_steps": 10, "schedule": "cosine"},
        checkpoint={"every_steps": 60},
        scaling={"num_workers": 0, "torch_threads": 1},  # in-process; DDP is proven in test_training_ddp
    )
    return train_recognition(load_train_config(overrides, RecognitionTrainConfig))


def test_model_separates_held_out_identities_with_ten_fold_accuracy_above_085(trained: TrainResult) -> None:
    summary = evaluate_verification(
        VerificationEvalConfig(
            checkpoint=trained.job_dir, export=trained.run_dir, split="val", pairs={"pairs": 500}
        )
    )
    result = summary["results"]["export:val"]
    print(
        f"held-out verification: accuracy {result['accuracy']:.4f} +- {result['accuracy_std']:.4f}, "
        f"TAR@FAR=1e-3 {result['tar@far=0.001']:.4f} over {result['pairs']} pairs"
    )
    assert result["identities"] == 20 and result["pairs"] == 1000
    assert result["accuracy"] >= 0.85
    assert summary["step"] == 120
    assert (
        json.loads(Path(summary["output"]).read_text())["results"]["export:val"]["accuracy"]
        == result["accuracy"]
    )


def test_held_out_pairs_written_as_an_insightface_bin_score_the_same(
    trained: TrainResult, tmp_path: Path
) -> None:
    export = load_export(trained.run_dir)
    bin_path = str(tmp_path / "heldout.bin")
    assert export_pairs_to_bin(export, "val", bin_path, n_pairs=200, seed=5) == 400
    summary = evaluate_verification(
        VerificationEvalConfig(
            checkpoint=trained.checkpoint,
            bin_files=(bin_path,),
            export=trained.run_dir,
            pairs={"pairs": 200},
            seed=5,
            output=str(tmp_path / "verification.json"),
        )
    )
    from_bin, from_export = summary["results"]["heldout"], summary["results"]["export:val"]
    assert from_bin["pairs"] == from_export["pairs"] == 400
    assert from_bin["accuracy"] == pytest.approx(from_export["accuracy"], abs=1e-9)


def test_checkpoint_records_the_export_it_was_trained_on(trained: TrainResult) -> None:
    meta = json.loads((Path(trained.checkpoint) / "checkpoint.json").read_text())
    export_json = Path(trained.run_dir) / "export" / "export.json"
    assert meta["export"]["export_sha256"] == hashlib.sha256(export_json.read_bytes()).hexdigest()
    assert meta["config"]["model"]["name"] == "iresnet_tiny" and meta["step"] == 120
    assert set(meta["files"]) == {"model.safetensors", "head.safetensors", "optimizer.safetensors"}


def test_training_metrics_are_parquet_that_duckdb_queries(trained: TrainResult) -> None:
    rows = duckdb.sql(
        f"SELECT step, value FROM '{trained.run_dir}/metrics/*/*.parquet' "
        "WHERE job = 'recognition' AND phase = 'train' AND name = 'loss' ORDER BY step"
    ).fetchall()
    assert [step for step, _ in rows] == [20, 40, 60, 80, 100, 120]
    assert rows[-1][1] < rows[0][1] / 4  # the loss fell
    rates = duckdb.sql(
        f"SELECT min(value) FROM '{trained.run_dir}/metrics/*/*.parquet' WHERE name = 'steps_per_s'"
    ).fetchall()
    assert rates[0][0] > 0


def test_example_configs_validate_and_errors_name_the_key_path() -> None:
    cfg = load_train_config(EXAMPLES / "train-recognition.yaml", RecognitionTrainConfig)
    assert cfg.model.name == "iresnet50" and cfg.loss.kind == "arcface"
    with pytest.raises(TrainConfigError, match=r"loss\.kind"):
        load_train_config(
            {"max_steps": 1, "data": {"export": "x"}, "loss": {"kind": "softmax"}}, RecognitionTrainConfig
        )
    with pytest.raises(TrainConfigError, match=r"data\.batchsize"):
        load_train_config({"max_steps": 1, "data": {"export": "x", "batchsize": 3}}, RecognitionTrainConfig)
