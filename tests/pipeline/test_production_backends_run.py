"""`facefoundry run` with the production backends' code paths: a tiny Arc2Face-layout model folder in
place of the procedural renderer, and a tiny insightface pack in place of dlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.engine.runner import Runner
from tests.fixtures import tiny_models, tiny_onnx

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base, models = tiny_models.build_tiny_arc2face(tmp_path_factory.mktemp("arc2face"))
    pack = tiny_onnx.build_buffalo_pack(tmp_path_factory.mktemp("buffalo") / "buffalo_l")
    return base, models, pack


def _arc2face_run(name: str, identities: int, folders: tuple[Path, Path, Path], stages: list[dict[str, Any]],
                  **sections: Any) -> dict[str, Any]:
    """A run of ``identities`` x 2 images from the tiny Arc2Face on the CPU (two steps at 64 px), then ``stages``."""
    base, models, _ = folders
    arc2face = {"stage": "arc2face", "resources": {"cpus": 1, "gpus": 0},
                "params": {"arc2face_dir": str(models / "arc2face"), "encoder_dir": str(models / "encoder"),
                           "base_model": str(base), "dtype": "fp32", "device": "cpu", "steps": 2, "size": 64}}
    return {"name": name, "run": {"seed": 5, "shard_size": 4},
            "identities": {"count": identities, "images_per_identity": 2, "dim": 512, "max_cosine": 0.35},
            "stages": [arc2face, *stages], **sections}


def test_run_with_tiny_arc2face_and_insightface_pack(model_folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    insight = {"backend": "insightface", "options": {"model_dir": str(model_folders[2]), "det_size": 160}}
    raw = _arc2face_run("production-backends", 3, model_folders, [
        {"stage": "image_stats", "params": {"min_sharpness": 0, "min_contrast": 0}},
        {"stage": "detect", "params": {**insight, "policy": "one_face_per_image"}},
        {"stage": "align"},
        {"stage": "embed", "params": {**insight, "dim": 512}},
    ], export={"min_images_per_identity": 1, "val_fraction": 0.0})
    cfg, stages = load_config(raw=raw)
    res = Runner(cfg, stages, str(tmp_path / "run"), show_progress=False).run()
    assert not res.failures, res.failures
    assert res.stages["arc2face"]["computed"] == 2
    gen = pq.read_table(tmp_path / "run" / "manifests" / "arc2face").to_pylist()
    assert len(gen) == 6 and all(r["status"] == "ok" for r in gen)
    assert all(r["model_revision"] and r["steps"] == 2 for r in gen)
    det = pq.read_table(tmp_path / "run" / "manifests" / "detect").to_pylist()
    assert len(det) == 6
    assert all((r["model_name"] and "insightface" in r["model_name"].lower()) or r["status"] == "error" for r in det)
    # Random weights make arbitrary detections: whatever is found is embedded in ArcFace space, the rest
    # are error rows with a reason; nothing vanishes.
    for r in det:
        assert r["status"] == "ok" or r["reason"]
    embedded = list(pq.read_table(tmp_path / "run" / "manifests" / "embed").to_pylist())
    assert {r["sample_id"] for r in embedded} == {r["sample_id"] for r in det if r["status"] == "ok"}
    for r in embedded:
        assert r["embedding_space"].startswith("arcface") and len(r["embedding"]) == 512


def test_refill_rounds_generate_with_arc2face(model_folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Refill goes through the generator base, so Arc2Face makes a round's variants like any others: the
    export's ``where`` keeps odd variants only, so each identity is one short after its first two."""
    import json

    from stages.base import sample_seed

    export = {"min_images_per_identity": 1, "val_fraction": 0.0, "where": "arc2face__variant % 2 = 1"}
    raw = _arc2face_run("arc2face-refill", 2, model_folders, [], export=export,
                        refill={"target_images": 2, "max_rounds": 2})
    cfg, stages = load_config(raw=raw)
    res = Runner(cfg, stages, str(tmp_path / "run"), show_progress=False).run()
    assert res.complete, res.failures
    rows = pq.read_table(tmp_path / "run" / "manifests" / "arc2face").to_pylist()
    refill = [r for r in rows if r["round"] == 1]
    # Short by one with half kept: ceil(1 x 2) = 2 new variants each, the next indices.
    assert sorted((r["identity_id"], r["variant"]) for r in refill) == sorted(
        (i, v) for i in {r["identity_id"] for r in rows} for v in (2, 3))
    assert all(r["status"] == "ok" and r["seed"] == sample_seed(5, r["sample_id"], "arc2face") for r in refill)
    summary = json.loads((tmp_path / "run" / "report" / "refill.json").read_text())
    assert (summary["at_target"], summary["rounds_run"], summary["short"]) == (2, 1, 0)
    assert pq.read_table(tmp_path / "run" / "export" / "manifest.parquet").num_rows == 4
