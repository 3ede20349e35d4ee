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
