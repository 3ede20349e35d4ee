"""Checkpoints: safetensors + JSON round trip, commit marker, integrity, and resuming a job from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures.procedural_export import ProceduralExportSpec, tiny_recognition_job, write_procedural_export
from training.checkpoints import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from training.config import RecognitionTrainConfig
from training.ddp import parameters_digest
from training.export_index import ExportIndex
from training.iresnet import build_iresnet
from training.metrics_store import read_metrics
from training.recognition import train_recognition
from training.recognition_model import build_recognition_module

torch.set_num_threads(1)


def _trained_pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_iresnet("iresnet_tiny", embedding_size=16, input_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_weights_buffers_and_optimizer(tmp_path: Path) -> None:
    model, opt = _trained_pair()
    path = save_checkpoint(
        str(tmp_path / "job"), 7, {"model": model.state_dict()}, {"kind": "test"}, optimizer=opt
    )
    ckpt = load_checkpoint(str(tmp_path / "job"))  # a job folder resolves to its latest checkpoint
    assert ckpt.path == path and ckpt.step == 7 and ckpt.meta["kind"] == "test"
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt.tensors["model"][name], value), name
    _, fresh_opt = _trained_pair()
    fresh_opt.state.clear()
    restore_optimizer(fresh_opt, ckpt)
    before, after = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[i][k], after[i][k]) for i in before for k in before[i])
    assert not list((tmp_path / "job" / "checkpoints").glob("*.tmp-*"))


def test_a_checkpoint_without_its_commit_marker_does_not_exist(tmp_path: Path) -> None:
    model, _ = _trained_pair()
    save_checkpoint(str(tmp_path), 1, {"model": model.state_dict()}, {})
    path = Path(save_checkpoint(str(tmp_path), 2, {"model": model.state_dict()}, {}))
    (path / "checkpoint.json").unlink()  # as if the writer died before committing
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [1]


def test_an_edited_weight_file_is_refused(tmp_path: Path) -> None:
    model, _ = _trained_pair()
    path = Path(save_checkpoint(str(tmp_path), 1, {"model": model.state_dict()}, {}))
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(str(path))


def test_keep_prunes_all_but_the_newest(tmp_path: Path) -> None:
    model, _ = _trained_pair()
    for step in range(1, 5):
        save_checkpoint(str(tmp_path), step, {"model": model.state_dict()}, {}, keep=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [3, 4]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> ExportIndex:
    spec = ProceduralExportSpec(train_identities=4, val_identities=2, images_per_identity=4, shard_size=8)
    return write_procedural_export(tmp_path_factory.mktemp("resume-run"), spec)


def _config(export: ExportIndex, steps: int, job: str = "resume", **extra: object) -> RecognitionTrainConfig:
    return RecognitionTrainConfig.model_validate(
        tiny_recognition_job(
            export.run_dir, job, steps, input_size=32, batch_size=4, embedding_size=16,
            data={"shuffle_buffer": 8},
            log_every=1,
            loss={"kind": "cosface", "scale": 16.0},
            optimizer={"name": "sgd", "lr": 0.05},
            checkpoint={"every_steps": 3, "keep": 0},
            scaling={"num_workers": 0},  # Ray Train local mode: same loop, in this process
            **extra,
        )
    )


def test_training_resumes_from_the_last_checkpoint_with_its_exact_weights(tiny_export: ExportIndex) -> None:
    first = train_recognition(_config(tiny_export, 3))
    assert (first.start_step, first.final_step) == (0, 3)
    ckpt = load_checkpoint(first.job_dir)
    assert ckpt.step == 3 and ckpt.meta["export"]["export_sha256"] == tiny_export.sha256
    saved = build_recognition_module(
        RecognitionTrainConfig.model_validate(ckpt.config), ckpt.meta["num_classes"]
    )
    saved.backbone.load_state_dict(ckpt.tensors["model"])
    saved.head.load_state_dict(ckpt.tensors["head"])

    second = train_recognition(_config(tiny_export, 5))
    assert (second.start_step, second.final_step) == (3, 5)
    # The resumed loop's weights before its first step are exactly the step-3 checkpoint's.
    assert second.ddp_check[0]["params_before"] == parameters_digest(saved)
    losses = read_metrics(second.run_dir, "resume").to_pylist()
    assert sorted(r["step"] for r in losses if r["name"] == "loss") == [1, 2, 3, 4, 5]
    assert [s for s, _ in list_checkpoints(second.job_dir)] == [3, 5]


def test_resume_refuses_a_checkpoint_trained_on_another_export(
    tiny_export: ExportIndex, tmp_path: Path
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(tiny_export.run_dir, run)
    first = train_recognition(_config(tiny_export, 1, job="other", output_dir=str(run)))
    manifest = json.loads((run / "export" / "export.json").read_text())
    manifest["note"] = "re-exported with other thresholds"
    (run / "export" / "export.json").write_text(json.dumps(manifest))
    cfg = _config(tiny_export, 2, job="other", output_dir=str(run))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"export": str(run)})})
    with pytest.raises(CheckpointError, match="trained on export"):  # before any worker starts
        train_recognition(cfg)
    assert first.final_step == 1


def test_a_job_whose_network_changed_refuses_to_resume_and_new_starts_it_over(tiny_export: ExportIndex) -> None:
    first = train_recognition(_config(tiny_export, 1, job="reshaped"))
    wider = _config(tiny_export, 2, job="reshaped")
    wider = wider.model_copy(update={"model": wider.model.model_copy(update={"embedding_size": 8})})
    with pytest.raises(CheckpointError, match=r"model\.embedding_size 16 -> 8.*--new") as refused:
        train_recognition(wider)  # before any worker starts
    assert "\n" not in str(refused.value)
    again = train_recognition(wider, new=True)
    assert (first.final_step, again.start_step, again.final_step) == (1, 0, 2)
    assert load_checkpoint(again.job_dir).config["model"]["embedding_size"] == 8
    losses = read_metrics(again.run_dir, "reshaped").to_pylist()  # the old job's metrics went with it
    assert sorted(r["step"] for r in losses if r["name"] == "loss") == [1, 2]
