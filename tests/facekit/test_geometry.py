"""Landmark conventions, template alignment and head pose, on exact synthetic geometry."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from facekit.geometry import (
    ARCFACE_TEMPLATE,
    MODEL_5,
    MODEL_68_INDEX,
    align_to_template,
    apply_transform,
    estimate_similarity,
    euler_angles,
    head_pose,
    landmarks5_from_68,
    project_model,
    rotation_matrix,
    template,
    warp,
)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_five_points_are_eye_ring_means_nose_tip_and_mouth_corners() -> None:
    pts = np.arange(136, dtype=np.float64).reshape(68, 2)
    five = landmarks5_from_68(pts)
    np.testing.assert_allclose(five[0], pts[36:42].mean(axis=0))
    np.testing.assert_allclose(five[1], pts[42:48].mean(axis=0))
    np.testing.assert_allclose(five[2:], pts[[30, 48, 54]])


def test_similarity_estimate_recovers_a_known_transform_exactly() -> None:
    truth = _similarity(17.0, 2.5, 40.0, -12.0)
    src = np.random.default_rng(0).uniform(0, 100, (7, 2))
    est = estimate_similarity(src, apply_transform(truth, src))
    np.testing.assert_allclose(est, truth, atol=1e-9)


def test_template_fit_of_a_moved_template_has_zero_residual_and_maps_back() -> None:
    moved = apply_transform(_similarity(-30.0, 3.1, 200.0, 90.0), ARCFACE_TEMPLATE)
    fit = align_to_template(moved)
    assert fit.residual == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(apply_transform(fit.for_size(256), moved), template(256), atol=1e-9)


def test_degenerate_landmarks_are_an_error_not_a_crop() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        align_to_template(np.ones((5, 2)))


@pytest.mark.parametrize(("angle", "scale"), [(12.0, 1.6), (-25.0, 5.0)])  # 5.0: the anti-aliased path
def test_warp_puts_marked_points_on_the_template(angle: float, scale: float) -> None:
    """Dots drawn at a similarity image of the template land on the template after the warp."""
    m = _similarity(angle, scale, 300.0, 150.0)
    points = apply_transform(m, ARCFACE_TEMPLATE)
    img = np.zeros((1100, 1100, 3), np.uint8)
    radius = 2.0 * scale
    for x, y in points:
        centre = (round(x * 16), round(y * 16))  # 4 fractional bits
        cv2.circle(img, centre, round(radius * 16), (255, 255, 255), -1, cv2.LINE_AA, 4)
    crop = warp(img, align_to_template(points).matrix, 112)
    grey = crop[..., 0].astype(np.float64)
    for tx, ty in ARCFACE_TEMPLATE:
        x0, y0 = int(tx) - 5, int(ty) - 5
        patch = grey[y0 : y0 + 11, x0 : x0 + 11]
        ys, xs = np.mgrid[y0 : y0 + 11, x0 : x0 + 11]
        cx, cy = (xs * patch).sum() / patch.sum(), (ys * patch).sum() / patch.sum()
        assert math.hypot(cx - tx, cy - ty) < 0.5


POSES = [(30.0, 0.0, 0.0), (-25.0, 10.0, 5.0), (0.0, -15.0, -20.0), (40.0, 5.0, 0.0), (-45.0, -10.0, 10.0)]


@pytest.mark.parametrize("angles", POSES)
def test_euler_angles_invert_rotation_matrix(angles: tuple[float, float, float]) -> None:
    np.testing.assert_allclose(euler_angles(rotation_matrix(*angles)), angles, atol=1e-9)


def test_positive_yaw_turns_the_nose_toward_image_right_and_positive_pitch_up() -> None:
    camera = np.array([[3000.0, 0, 320], [0, 3000.0, 240], [0, 0, 1]])
    for yaw, pitch, dx_sign, dy_sign in ((25.0, 0.0, 1, 0), (-25.0, 0.0, -1, 0), (0.0, 20.0, 0, -1)):
        five = project_model(yaw, pitch, 0.0, camera, 350.0, MODEL_5)
        nose_offset = five[2] - five[:2].mean(axis=0)
        frontal = project_model(0.0, 0.0, 0.0, camera, 350.0, MODEL_5)
        shift = nose_offset - (frontal[2] - frontal[:2].mean(axis=0))
        if dx_sign:
            assert np.sign(shift[0]) == dx_sign
        if dy_sign:
            assert np.sign(shift[1]) == dy_sign


@pytest.mark.parametrize("angles", POSES)
def test_head_pose_recovers_a_projected_generic_face(angles: tuple[float, float, float]) -> None:
    """Project the 3D model at a known pose through a portrait camera (face ~120 px); solvePnP gets
    the angles back within 2 degrees from 68 points and from 5."""
    camera = np.array([[3000.0, 0, 320], [0, 3000.0, 240], [0, 0, 1]])
    distance = 3000.0 * 14.0 / 120.0
    full = np.zeros((68, 2))
    full[list(MODEL_68_INDEX)] = project_model(*angles, camera, distance)
    for points in (full, project_model(*angles, camera, distance, MODEL_5)):
        pose = head_pose(points)
        np.testing.assert_allclose((pose.yaw, pose.pitch, pose.roll), angles, atol=2.0)
