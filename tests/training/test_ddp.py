"""Two Ray Train workers run real DDP: gradients are all-reduced, so different data gives equal weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fixtures.procedural_export import ProceduralExportSpec, tiny_recognition_job, write_procedural_export
from training.config import RecognitionTrainConfig
from training.recognition import train_recognition

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def local_ray(ray_session: object) -> Iterator[None]:
    """The session's 2-CPU local Ray (one per test session: a second ray.init would fail)."""
    yield


def test_two_workers_hold_identical_weights_after_a_step_on_different_samples(
    local_ray: None, tmp_path: Path
) -> None:
    export = write_procedural_export(
        tmp_path,
        ProceduralExportSpec(train_identities=6, val_identities=2, images_per_identity=4, shard_size=6),
    )
    cfg = RecognitionTrainConfig.model_validate(
        tiny_recognition_job(
            tmp_path, "ddp", 2, input_size=32, batch_size=4, embedding_size=16,
            log_every=1,
            loss={"kind": "arcface", "scale": 16.0, "sample_rate": 0.5},  # PartialFC draws agree across ranks
            optimizer={"name": "sgd", "lr": 0.1},
            checkpoint={"every_steps": 2},
            scaling={"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
        )
    )
    result = train_recognition(cfg)
    assert result.world_size == 2 and result.final_step == 2
    rank0, rank1 = result.ddp_check
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert not set(rank0["batch_keys"]) & set(rank1["batch_keys"])  # each rank trained on its own samples
    assert rank0["params_before"] == rank1["params_before"]  # DDP broadcast rank 0's initial weights
    assert rank0["params_after"] == rank1["params_after"]  # ... and averaged the gradients of the step
    assert rank0["params_after"] != rank0["params_before"]  # the step did change the weights
    assert json.loads((Path(result.job_dir) / "ddp_check.json").read_text()) == result.ddp_check
    assert result.export_sha256 == export.sha256
