"""The dlib backend on its real weights (face_recognition_models) and a real group photo.

insightface ships t1.jpg, six people around a table, faces about 110 px wide.
"""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekit.backends.base import FaceDetector, FaceEmbedder
from facekit.backends.dlib import (
    DIM,
    PREDICTOR_68,
    RESNET,
    SPACE,
    DlibDetector,
    DlibEmbedder,
    file_sha256,
    model_path,
)
from facekit.geometry import align_to_template, warp
from tests.fixtures import REPO

T1_FACES = 6  # dlib HOG finds all six with upsample 0, 1 and 2 at full resolution


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector({"upsample": 1})


@pytest.fixture(scope="module")
def embedder() -> DlibEmbedder:
    return DlibEmbedder()


def _crops(img: np.ndarray, detector: DlibDetector, size: int = 112) -> list[np.ndarray]:
    return [warp(img, align_to_template(f.landmarks5).for_size(size), size) for f in detector.detect(img)]


def test_model_files_are_found_without_importing_face_recognition_models() -> None:
    code = ("import sys; from facekit.backends.dlib import model_path, PREDICTOR_68; "
            "assert model_path(PREDICTOR_68).is_file(); "
            "assert 'face_recognition_models' not in sys.modules and 'pkg_resources' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_missing_model_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        DlibDetector({"model_dir": str(tmp_path)})


def test_backends_satisfy_the_face_protocols(detector: DlibDetector, embedder: DlibEmbedder) -> None:
    assert isinstance(detector, FaceDetector)
    assert isinstance(embedder, FaceEmbedder)
    described = (embedder.space, embedder.dim, embedder.metric, embedder.input_size)
    assert described == (SPACE, DIM, "euclidean", 112)


def test_model_info_names_the_file_and_its_sha256(detector: DlibDetector, embedder: DlibEmbedder) -> None:
    for info, name in ((detector.model_info(), PREDICTOR_68), (embedder.model_info(), RESNET)):
        assert name in info.name and info.name.startswith("dlib-")
        assert info.revision == file_sha256(model_path(name))[:16]
    assert detector.model_info() == detector.model_info()


def test_group_photo_gives_every_face_with_68_and_5_points(photo: np.ndarray, detector: DlibDetector) -> None:
    faces = detector.detect(photo)
    assert len(faces) == T1_FACES
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    for f in faces:
        x0, y0, x1, y1 = f.box
        assert f.landmarks68 is not None and f.landmarks68.shape == (68, 2)
        assert f.landmarks5.shape == (5, 2)
        centre = f.landmarks5.mean(axis=0)
        assert x0 <= centre[0] <= x1 and y0 <= centre[1] <= y1
        assert f.landmarks5[0, 0] < f.landmarks5[1, 0]  # image-left eye first
        assert f.landmarks5[3, 0] < f.landmarks5[4, 0]


def test_upsampling_finds_small_faces_that_plain_hog_misses(photo: np.ndarray) -> None:
    small = cv2.resize(photo, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)  # faces ~44 px
    assert len(DlibDetector({"upsample": 0}).detect(small)) < T1_FACES
    assert len(DlibDetector({"upsample": 1}).detect(small)) == T1_FACES


def _centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def test_large_images_are_reduced_for_hog_but_boxes_stay_in_input_pixels(photo: np.ndarray) -> None:
    big = cv2.resize(photo, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR)
    faces = DlibDetector({"upsample": 0, "max_image_side": 1280}).detect(big)
    ref = DlibDetector({"upsample": 0, "max_image_side": None}).detect(photo)
    assert len(faces) == len(ref) == T1_FACES
    for r in ref:
        width = 2 * (r.box[2] - r.box[0])
        gaps = [np.linalg.norm(_centre(f.box) - 2 * _centre(r.box)) for f in faces]
        match = faces[int(np.argmin(gaps))]
        assert min(gaps) < 0.15 * width  # HOG's pyramid quantises boxes by ~10%
        assert 0.8 < (match.box[2] - match.box[0]) / width < 1.25


def test_embedding_the_same_crop_twice_is_identical(photo: np.ndarray, detector: DlibDetector,
                                                    embedder: DlibEmbedder) -> None:
    crops = _crops(photo, detector)
    a, b = embedder.embed(crops), embedder.embed(list(reversed(crops)))[::-1]
    assert a.shape == (T1_FACES, DIM) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_mirrored_and_rotated_faces_stay_near_and_people_stay_apart(photo: np.ndarray, detector: DlibDetector,
                                                                   embedder: DlibEmbedder) -> None:
    """Each face found again in a mirrored and in a 10-degree rotated copy of the photo (matched by
    where it must be) embeds within dlib's same-person distance of the original."""
    h, w = photo.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 10, 1.0)
    variants = ((photo[:, ::-1].copy(), lambda c: np.array([w - 1 - c[0], c[1]])),
                (cv2.warpAffine(photo, turn, (w, h)), lambda c: turn[:, :2] @ c + turn[:, 2]))
    faces = detector.detect(photo)
    base = embedder.embed(_crops(photo, detector))
    same = []
    for image, move in variants:
        found = detector.detect(image)
        emb = embedder.embed([warp(image, align_to_template(f.landmarks5).matrix, 112) for f in found])
        for i, face in enumerate(faces):
            gaps = [np.linalg.norm(_centre(f.box) - move(_centre(face.box))) for f in found]
            if gaps and min(gaps) < 0.3 * (face.box[2] - face.box[0]):
                same.append(float(np.linalg.norm(base[i] - emb[int(np.argmin(gaps))])))
    between = [float(np.linalg.norm(base[i] - base[j])) for i, j in combinations(range(len(base)), 2)]
    assert len(same) >= 2 * T1_FACES - 2  # a strongly rolled face may be lost by HOG after the turn
    assert max(same) < 0.6  # dlib's same-person threshold on photos
    assert min(between) > 0.55
    assert np.mean(same) < 0.5 * np.mean(between)


def test_crop_path_stays_close_to_dlibs_canonical_chip(photo: np.ndarray, detector: DlibDetector,
                                                       embedder: DlibEmbedder) -> None:
    """The crop path loses only the chin strip outside the ArcFace crop (measured 0.10-0.20)."""
    faces = detector.detect(photo)
    canonical = np.stack([embedder.embed_from_landmarks(photo, f.landmarks68) for f in faces])
    via_crop = embedder.embed(_crops(photo, detector))
    assert np.linalg.norm(canonical - via_crop, axis=1).max() < 0.25


def test_a_larger_crop_with_the_same_framing_embeds_alike(photo: np.ndarray, detector: DlibDetector,
                                                          embedder: DlibEmbedder) -> None:
    small = embedder.embed(_crops(photo, detector, 112))
    large = embedder.embed(_crops(photo, detector, 256))
    assert np.linalg.norm(small - large, axis=1).max() < 0.15
