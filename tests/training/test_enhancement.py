"""Acceptance: the enhancement U-Net, trained on (degraded, clean) pairs made by the degrade stage,
restores held-out samples better than the degraded input, by PSNR (and SSIM, and identity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.mappers.degrade import DegradeParams
from tests.fixtures import EXAMPLES
from tests.fixtures.procedural_export import ProceduralExportSpec, write_procedural_export
from training.config import EnhancementTrainConfig, load_train_config
from training.enhancement import (
    DlibIdentityEmbedder,
    evaluate_enhancement,
    load_enhancer,
    train_enhancement,
)
from training.export_index import load_export
from training.job_layout import TrainResult
from training.shard_loader import iter_shard_samples

torch.set_num_threads(1)

DEGRADE = DegradeParams(
    blur_sigma=(0.2, 1.0), downsample=(1.0, 2.0), noise_sigma=(10.0, 25.0), jpeg_quality=(50, 90)
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    run = tmp_path_factory.mktemp("enhancement-run")
    # 64 px crops keep this CPU test short; the degradations are drawn and applied at that size.
    write_procedural_export(
        run,
        ProceduralExportSpec(
            train_identities=24,
            val_identities=8,
            images_per_identity=6,
            image_size=64,
            shard_size=64,
            degrade=DEGRADE,
        ),
    )
    cfg = load_train_config(
        {
            "job": "enhancement",
            "max_steps": 120,
            "log_every": 20,
            "data": {
                "export": str(run),
                "image_size": 64,
                "batch_size": 8,
                "loader_workers": 0,
                "shuffle_buffer": 64,
                "eval_samples": 48,
            },
            "model": {"base_channels": 16, "levels": 3},
            "optimizer": {
                "name": "adamw",
                "lr": 0.001,
                "weight_decay": 0.0,
                "warmup_steps": 15,
                "schedule": "cosine",
            },
            "identity_model": None,  # dlib's identity score is checked separately below, on fewer samples
            "checkpoint": {"every_steps": 120},
            "scaling": {"num_workers": 0, "torch_threads": 1},
        },
        EnhancementTrainConfig,
    )
    return train_enhancement(cfg)


def test_export_holds_degraded_and_clean_crops_under_one_key(trained: TrainResult) -> None:
    export = load_export(trained.run_dir)
    sample = next(iter_shard_samples(export.split("val").shards[:1]))
    assert {"png", "degraded.png", "cls", "json"} <= set(sample)


def test_restored_held_out_samples_beat_the_degraded_input_on_psnr(trained: TrainResult) -> None:
    result = trained.eval
    print(
        f"held-out PSNR degraded {result['psnr']['degraded']:.2f} -> "
        f"restored {result['psnr']['restored']:.2f} dB, "
        f"SSIM {result['ssim']['degraded']:.3f} -> {result['ssim']['restored']:.3f}"
    )
    assert result["samples"] == 48 and result["dataset"] == "export:val"
    assert result["psnr"]["restored"] > result["psnr"]["degraded"] + 0.5
    assert result["ssim"]["restored"] > result["ssim"]["degraded"]
    written = json.loads((Path(trained.job_dir) / "eval" / "enhancement-step-00000120.json").read_text())
    assert written["psnr"] == result["psnr"]


def test_identity_similarity_is_reported_next_to_the_degraded_baseline(trained: TrainResult) -> None:
    export = load_export(trained.run_dir)
    cfg = EnhancementTrainConfig.model_validate(
        json.loads((Path(trained.checkpoint) / "checkpoint.json").read_text())["config"]
    )
    model = load_enhancer(trained.job_dir)
    data = cfg.data.model_copy(update={"eval_samples": 6})
    result = evaluate_enhancement(model, export, data, DlibIdentityEmbedder())
    assert result["identity_model"] == "dlib-resnet-128"
    for name in ("degraded", "restored"):
        assert 0.5 < result["identity_cosine"][name] <= 1.0 + 1e-6


def test_example_config_validates() -> None:
    cfg = load_train_config(EXAMPLES / "train-enhancement.yaml", EnhancementTrainConfig)
    assert cfg.data.input_member == "degraded.png" and cfg.identity_model == "dlib"
