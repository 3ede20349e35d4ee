"""The insightface backend loads a buffalo_l-layout pack through insightface's own model router.

The pack is tiny (tests/fixtures/tiny_onnx.py) but has the real files' input sizes and output counts, so
insightface routes each file to the class it would route the released model to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import insightface
import numpy as np
import pyarrow as pa
import pytest

from facekit.backends.base import FaceDetector, FaceEmbedder
from facekit.backends.insightface import (
    InsightFaceDetector,
    InsightFaceEmbedder,
    InsightFaceSpec,
    ModelPackError,
    check_files,
    load_model,
)
from facekit.imaging import encode_png
from facekit.labelers.genderage import GenderAgeLabeler, age_group
from facekit.labelers.genderage import check_files as genderage_check_files
from stages.base import StageContext
from stages.labelers.labels import Labeler, LabelParams, LabelStage
from stages.mappers.detect import DetectParams, DetectStage
from stages.mappers.embed import EmbedParams, EmbedStage
from tests.fixtures import tiny_onnx


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx.build_buffalo_pack(tmp_path_factory.mktemp("buffalo_l"))


@pytest.mark.parametrize(
    ("role", "cls", "task"),
    [
        ("detector", "SCRFD", "detection"),
        ("recognizer", "ArcFaceONNX", "recognition"),
        ("genderage", "Attribute", "genderage"),
        ("landmark_3d", "Landmark", "landmark_3d_68"),
    ],
)
def test_each_pack_file_routes_to_the_insightface_class_of_the_real_model(
    pack: Path, role: str, cls: str, task: str
) -> None:
    model = load_model(InsightFaceSpec(model_dir=str(pack)), role)
    assert (type(model).__name__, model.taskname) == (cls, task)


def test_detector_finds_faces_with_five_points_68_points_and_pose_on_a_photo(
    pack: Path, photo: np.ndarray
) -> None:
    detector = InsightFaceDetector({"model_dir": str(pack), "providers": ["CPUExecutionProvider"]})
    assert isinstance(detector, FaceDetector)
    faces = detector.detect(photo)
    assert faces
    scale = max(photo.shape[:2]) / tiny_onnx.DET_SIZE
    for face in faces:
        x0, y0, x1, y1 = face.box
        assert 0 <= face.score <= 1 and x1 > x0 and y1 > y0
        assert face.landmarks5.shape == (5, 2)
        # Boxes and points come back in the photo's own coordinates, not the 640x640 detector input.
        assert x1 - x0 == pytest.approx(2 * tiny_onnx.BOX_HALF * tiny_onnx.STRIDES[-1] * scale, rel=0.01)
        assert x0 - 1 <= face.landmarks5[:, 0].min() and face.landmarks5[:, 0].max() <= x1 + 1
        assert face.landmarks68 is not None and face.landmarks68.shape == (68, 2)
        assert set(face.extra["pose"]) == {"pitch", "yaw", "roll"}
        assert all(np.isfinite(v) for v in face.extra["pose"].values())
    assert detector.detect(photo)[0].box == faces[0].box  # deterministic


def test_detector_returns_no_face_for_a_flat_image_without_failing(pack: Path) -> None:
    detector = InsightFaceDetector({"model_dir": str(pack), "with_pose": False})
    assert detector.detect(np.full((200, 300, 3), 127, np.uint8)) == []


def test_embedder_returns_unit_norm_512d_vectors_in_a_named_cosine_space(
    pack: Path, photo: np.ndarray
) -> None:
    embedder = InsightFaceEmbedder({"model_dir": str(pack)})
    assert isinstance(embedder, FaceEmbedder)
    assert (embedder.space, embedder.dim, embedder.metric, embedder.input_size) == (
        "arcface-w600k_r50-512", 512, "cosine", 112)
    crops = [photo[i * 112:(i + 1) * 112, :112].copy() for i in range(3)]
    vecs = embedder.embed(crops)
    assert vecs.shape == (3, 512) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embedder.embed(crops[1:2])[0], vecs[1], rtol=1e-5, atol=1e-6)
    assert embedder.embed([]).shape == (0, 512)
    info = embedder.model_info()
    assert info.name == "insightface:w600k_r50.onnx" and len(info.revision) == 16


def test_antelopev2_file_names_are_found_and_name_the_space(pack: Path, tmp_path: Path) -> None:
    antelope = tmp_path / "antelopev2"
    antelope.mkdir()
    shutil.copy(pack / "det_10g.onnx", antelope / "scrfd_10g_bnkps.onnx")
    shutil.copy(pack / "w600k_r50.onnx", antelope / "glintr100.onnx")
    assert check_files({"model_dir": str(antelope), "with_pose": False}) == []
    assert InsightFaceEmbedder({"model_dir": str(antelope)}).space == "arcface-glintr100-512"


def test_missing_file_names_the_folder_the_files_tried_and_the_fix(pack: Path, tmp_path: Path) -> None:
    partial = tmp_path / "buffalo_l"
    partial.mkdir()
    shutil.copy(pack / "det_10g.onnx", partial / "det_10g.onnx")
    problems = check_files({"model_dir": str(partial)})
    assert len(problems) == 2  # recognizer and 1k3d68; the detector is there
    recognizer = next(p for p in problems if "recognizer" in p)
    assert str(partial) in recognizer and "w600k_r50.onnx" in recognizer and "glintr100.onnx" in recognizer
    assert "buffalo_l.zip" in recognizer
    assert check_files({"model_dir": str(partial), "with_pose": False}, uses=("detector",)) == []
    assert len(check_files({"model_dir": str(partial)}, uses=("genderage",))) == 1
    with pytest.raises(ModelPackError, match=r"w600k_r50\.onnx") as err:
        InsightFaceEmbedder({"model_dir": str(partial)})
    assert str(partial) in str(err.value)


def test_missing_folder_and_nested_unzip_are_reported_with_a_fix(pack: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    (problem,) = check_files({"model_dir": str(missing)})
    assert str(missing) in problem and "does not exist" in problem
    outer = tmp_path / "antelopev2"
    shutil.copytree(pack, outer / "antelopev2")
    problems = check_files({"model_dir": str(outer)})
    assert problems and all(str(outer / "antelopev2") in p and "nested" in p for p in problems)


def test_a_file_in_the_wrong_role_is_refused_with_what_it_routed_to(pack: Path) -> None:
    with pytest.raises(ModelPackError, match=r"routed to Attribute \(genderage\), expected ArcFaceONNX"):
        InsightFaceEmbedder({"model_dir": str(pack), "recognizer": "genderage.onnx"})


def test_genderage_labels_each_face_with_gender_probability_and_age_group(
    pack: Path, photo: np.ndarray
) -> None:
    labeler = GenderAgeLabeler({"model_dir": str(pack)})
    assert isinstance(labeler, Labeler)
    labeler.setup()
    detector = InsightFaceDetector({"model_dir": str(pack), "with_pose": False})
    faces = detector.detect(photo)[:3]
    rows = labeler.label([photo] * len(faces), boxes=[f.box for f in faces])
    crops = [photo[:112, :112].copy(), photo[112:224, 112:224].copy()]
    rows += labeler.label(crops)  # aligned crops: the whole crop stands in for the box
    assert len(rows) == len(faces) + 2
    assert set(rows[0]) == {f.name for f in labeler.fields()}
    for row in rows:
        assert row["genderage_gender"] in {"female", "male"} and 0.5 <= row["genderage_gender_prob"] <= 1.0
        assert row["genderage_age_group"] == age_group(row["genderage_age"])
    (alone,) = labeler.label(crops[1:])  # batching does not change a face's labels
    assert alone["genderage_gender"] == rows[-1]["genderage_gender"]
    assert alone["genderage_age"] == rows[-1]["genderage_age"]
    assert alone["genderage_gender_prob"] == pytest.approx(rows[-1]["genderage_gender_prob"], abs=1e-5)
    assert [age_group(a) for a in (5, 13, 19.5, 35, 36, 59, 60)] == [
        "child", "teenager", "teenager", "young_adult", "middle_aged", "middle_aged", "senior"]


def test_the_labels_stage_runs_the_genderage_labeler_and_keeps_undecodable_rows(
    pack: Path, photo: np.ndarray, tmp_path: Path
) -> None:
    params = LabelParams.model_validate({"labelers": [
        {"kind": "facekit.labelers.genderage:GenderAgeLabeler", "params": {"model_dir": str(pack)}}]})
    stage = LabelStage(params, StageContext(run_dir=str(tmp_path), stage_id="labels", seed=0))
    stage.setup()
    batch = {"sample_id": ["a", "bad"], "key": ["a", "bad"], "identity_id": [None, None],
             "parent_id": [None, None], "image": [encode_png(photo[:112, :112].copy()), b""],
             "image_ext": ["png", "png"]}
    out = stage.process(batch)
    assert out["status"] == ["ok", "ok"] and out["genderage_gender"][0] in {"female", "male"}
    assert out["genderage_gender"][1] is None and out["genderage_age"][1] is None
    assert stage.model_info().name == "insightface:genderage.onnx"
    assert genderage_check_files({"model_dir": str(pack)}) == []
    assert "genderage.onnx" in genderage_check_files({"model_dir": str(tmp_path)})[0]


def test_a_detector_with_free_input_size_runs_at_the_configured_size(pack: Path, tmp_path: Path) -> None:
    dynamic = tmp_path / "dynamic"
    dynamic.mkdir()
    tiny_onnx.build_scrfd(dynamic / "det_10g.onnx", dynamic=True)
    detector = InsightFaceDetector({"model_dir": str(dynamic), "with_pose": False, "det_size": 320})
    assert detector.detector.static_input_size is None  # routed like the released det_10g
    flat = np.full((240, 320, 3), 127, np.uint8)
    assert detector.detect(flat) == []
    textured = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    faces = detector.detect(textured)
    assert faces and all(f.landmarks5.shape == (5, 2) for f in faces)
    assert faces[0].box[2] - faces[0].box[0] == pytest.approx(2 * tiny_onnx.BOX_HALF * 32)  # 320 px: scale 1


def test_the_detect_stage_runs_on_the_insightface_backend_without_changes(pack: Path, tmp_path: Path) -> None:
    photo_bytes = (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()
    params = DetectParams.model_validate({"backend": "insightface", "policy": "sample_per_face",
                                          "options": {"model_dir": str(pack)}})
    stage = DetectStage(params, StageContext(run_dir=str(tmp_path), stage_id="detect", seed=0))
    stage.setup()
    flat_bytes = encode_png(np.full((64, 64, 3), 90, np.uint8))
    batch = {"sample_id": ["photo", "flat"], "key": ["photo", "flat"], "identity_id": [None, None],
             "parent_id": [None, None], "image": [photo_bytes, flat_bytes], "image_ext": ["jpg", "png"]}
    out = stage.process(batch)
    faces = [i for i, p in enumerate(out["parent_id"]) if p == "photo"]
    assert faces and all(out["status"][i] == "ok" and len(out["landmarks68"][i]) == 136 for i in faces)
    assert out["face_index"][faces[0]] == 0 and out["num_faces"][faces[0]] == len(faces)
    flat = out["sample_id"].index("flat")
    assert out["status"][flat] == "error" and out["reason"][flat] == "no_face"
    assert stage.model_info().name == "insightface:det_10g.onnx+1k3d68.onnx"


def test_the_embed_stage_runs_on_the_insightface_backend_without_changes(
    pack: Path, photo: np.ndarray, tmp_path: Path
) -> None:
    params = EmbedParams.model_validate({"backend": "insightface", "options": {"model_dir": str(pack)}})
    stage = EmbedStage(params, StageContext(run_dir=str(tmp_path), stage_id="embed", seed=0))
    stage.setup()
    crops = [encode_png(photo[:112, :112].copy()), encode_png(photo[:256, 300:556].copy())]
    batch = {"sample_id": ["a", "b"], "key": ["a", "b"], "identity_id": [None, None],
             "parent_id": [None, None], "image": crops, "image_ext": ["png", "png"]}
    out = stage.process(batch)
    assert out["status"] == ["ok", "ok"]
    assert out["embedding_space"] == ["arcface-w600k_r50-512"] * 2
    assert out["embedding_metric"] == ["cosine"] * 2
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=1), 1.0, rtol=1e-5)
    assert stage.output_fields()[0].type == pa.list_(pa.float32(), 512)
