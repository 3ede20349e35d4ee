"""Face geometry shared by the face stages: landmark conventions, template alignment and head pose.

Pure numpy / OpenCV, no model: the same code serves every detector backend, so dlib and insightface
crops are aligned to the same template and their poses are measured the same way.

Conventions (image coordinates: x right, y down, pixels):
- 5 points, in this order: image-left eye centre, image-right eye centre, nose tip, image-left mouth
  corner, image-right mouth corner (insightface's order). From dlib's 68 points: the eye centres are
  the means of the eye rings 36-41 and 42-47, the nose tip is 30, the mouth corners are 48 and 54.
- Head pose in degrees, camera frame: yaw > 0 when the nose points toward image right, pitch > 0
  when it points up, roll > 0 when the face is turned clockwise in the image. 0, 0, 0 is frontal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# The ArcFace / insightface 112x112 template (arcface_torch, insightface.utils.face_align.arcface_dst).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_SIZE = 112

LEFT_EYE_RING = slice(36, 42)
RIGHT_EYE_RING = slice(42, 48)
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


def landmarks5_from_68(points68: np.ndarray) -> np.ndarray:
    """The 5 alignment points from dlib's 68 (dlib's own 5-point model has no mouth corners)."""
    p = np.asarray(points68, dtype=np.float64).reshape(68, 2)
    return np.stack([
        p[LEFT_EYE_RING].mean(axis=0),
        p[RIGHT_EYE_RING].mean(axis=0),
        p[NOSE_TIP],
        p[MOUTH_LEFT],
        p[MOUTH_RIGHT],
    ])


def template(size: int = ARCFACE_SIZE) -> np.ndarray:
    """The ArcFace template scaled to a square crop of ``size``: the same framing at any resolution."""
    return ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)


# ---------------------------------------------------------------------------------------- alignment


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``.

    Umeyama's closed form, as skimage's SimilarityTransform and insightface's norm_crop use: exact and
    deterministic, unlike cv2.estimateAffinePartial2D, whose default RANSAC discards points.
    Returns the 2x3 matrix for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def scale_transform(matrix: np.ndarray, factor: float) -> np.ndarray:
    """The same alignment rendered ``factor`` times larger (a 256 crop of a 112 transform: 256/112)."""
    return np.asarray(matrix, dtype=np.float64) * factor


def transform_scale(matrix: np.ndarray) -> float:
    return float(math.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))


@dataclass(frozen=True)
class Alignment:
    """A face's similarity transform to the 112 template and how well its 5 points fit it."""

    matrix: np.ndarray  # 2x3, image -> 112 template crop
    residual: float  # RMS distance (px in the 112 crop) between the mapped 5 points and the template

    def for_size(self, size: int) -> np.ndarray:
        return scale_transform(self.matrix, size / ARCFACE_SIZE)


def align_to_template(landmarks5: np.ndarray) -> Alignment:
    """Fit the 5 points to the ArcFace template. A large residual means the face does not look like a
    frontal template face under a similarity (profile, extreme expression, bad landmarks)."""
    pts = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    matrix = estimate_similarity(pts, ARCFACE_TEMPLATE)
    err = apply_transform(matrix, pts) - ARCFACE_TEMPLATE
    return Alignment(matrix, float(np.sqrt((err**2).sum(axis=1).mean())))


def warp(rgb: np.ndarray, matrix: np.ndarray, size: int, border_value: int = 0) -> np.ndarray:
    """Warp to a ``size`` square crop. When the warp shrinks more than 2x, the image is first reduced
    with area averaging so the crop is not aliased (cv2.warpAffine samples, it does not average)."""
    m = np.asarray(matrix, dtype=np.float64).copy()
    s = transform_scale(m)
    if s < 0.5:
        factor = min(1.0, 2.0 * s)
        h, w = rgb.shape[:2]
        nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        # Pixel centres: x_small = (x + 0.5) * fx - 0.5, so x = (x_small + 0.5) / fx - 0.5.
        fx, fy = nw / w, nh / h
        m[:, 0] /= fx
        m[:, 1] /= fy
        m[:, 2] += m[:, 0] * (0.5 - 0.5 * fx) + m[:, 1] * (0.5 - 0.5 * fy)
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(border_value,) * 3)


# ---------------------------------------------------------------------------------------- head pose

# A generic 3D face in the camera-aligned frame of a frontal face (x right, y down, z away from the
# camera; units about 9 mm, inter-pupil distance 7.1). Rigid points only (no jaw line, which slides
# with the head outline). Positions are the 14-point model popularised by lincolnhard's
# head-pose-estimation (brow and eye corners, nostril wings, mouth corners and bottom, chin), mirrored
# into this frame. The 5-point variant's eye centres and nose tip were triangulated from dlib's 68
# points on insightface's t1.jpg (6 faces and their mirror images, posed with the 14-point model), so
# 5-point and 68-point poses agree.
MODEL_68_INDEX = (17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8)
MODEL_68 = np.array(
    [
        [-6.825897, -6.760612, -4.402142],  # 17 image-left brow, outer end
        [-1.330353, -7.122144, -6.903745],  # 21 image-left brow, inner end
        [1.330353, -7.122144, -6.903745],  # 22 image-right brow, inner end
        [6.825897, -6.760612, -4.402142],  # 26 image-right brow, outer end
        [-5.311432, -5.485328, -3.987654],  # 36 image-left eye, outer corner
        [-1.789930, -5.393625, -4.413414],  # 39 image-left eye, inner corner
        [1.789930, -5.393625, -4.413414],  # 42 image-right eye, inner corner
        [5.311432, -5.485328, -3.987654],  # 45 image-right eye, outer corner
        [-2.005628, -1.949216, -6.340656],  # 31 nostril wing, image left
        [2.005628, -1.949216, -6.340656],  # 35 nostril wing, image right
        [-2.774015, 2.080775, -5.048531],  # 48 mouth corner, image left
        [2.774015, 2.080775, -5.048531],  # 54 mouth corner, image right
        [0.000000, 3.116408, -6.097667],  # 57 lower lip, centre
        [0.000000, 7.415691, -4.070434],  # 8 chin
    ],
    dtype=np.float64,
)
MODEL_5 = np.array(
    [
        [-3.51, -5.44, -4.69],  # image-left eye centre (mean of the eye ring)
        [3.51, -5.44, -4.69],  # image-right eye centre
        [0.0, -1.95, -8.19],  # nose tip (68-point index 30)
        MODEL_68[10],  # mouth corners, as in the 68-point model
        MODEL_68[11],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class HeadPose:
    yaw: float
    pitch: float
    roll: float
    reprojection_error: float  # RMS px: how well the generic model explains the landmarks


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Model -> camera rotation for the documented angles (degrees): yaw, then pitch, then roll."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def euler_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of ``rotation_matrix``: (yaw, pitch, roll) in degrees."""
    r = np.asarray(rot, dtype=np.float64)
    pitch = -math.degrees(math.asin(float(np.clip(r[2, 1], -1.0, 1.0))))
    yaw = math.degrees(math.atan2(float(r[2, 0]), float(r[2, 2])))
    roll = math.degrees(math.atan2(float(-r[0, 1]), float(r[1, 1])))
    return yaw, pitch, roll


def pose_camera(points2d: np.ndarray, focal_factor: float = 6.0) -> np.ndarray:
    """A virtual camera looking straight at the face: principal point at the landmarks' centre and a
    long focal length (``focal_factor`` times the landmarks' extent). Angles then describe how turned
    the face looks, independent of where it sits in the photo and of the unknown real lens."""
    pts = np.asarray(points2d, dtype=np.float64)
    centre = pts.mean(axis=0)
    extent = float(np.ptp(pts, axis=0).max())
    f = focal_factor * max(extent, 1.0)
    return np.array([[f, 0, centre[0]], [0, f, centre[1]], [0, 0, 1]], dtype=np.float64)


def head_pose(landmarks: np.ndarray, focal_factor: float = 6.0) -> HeadPose:
    """Yaw, pitch and roll from 68 landmarks (dlib order) or, failing those, 5 points, by solvePnP
    against the generic 3D face. Good to a few degrees up to about 45 degrees of yaw; a landmark model
    that fails on profiles makes this fail with it."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 68:
        image_pts, model = pts[list(MODEL_68_INDEX)], MODEL_68
    elif len(pts) == 5:
        image_pts, model = pts, MODEL_5
    else:
        raise ValueError(f"head_pose needs 68 or 5 landmarks, got {len(pts)}")
    camera = pose_camera(image_pts, focal_factor)
    # Start from frontal at the distance where the model's size matches the landmarks' size.
    model_extent = float(np.ptp(model[:, :2], axis=0).max())
    image_extent = max(float(np.ptp(image_pts, axis=0).max()), 1.0)
    z0 = camera[0, 0] * model_extent / image_extent
    rvec: np.ndarray = np.zeros((3, 1))
    tvec: np.ndarray = np.array([[0.0], [0.0], [z0]])
    ok, rvec, tvec = cv2.solvePnP(model, image_pts, camera, None, rvec, tvec, useExtrinsicGuess=True,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise ValueError("solvePnP did not converge")
    rot, _ = cv2.Rodrigues(rvec)
    projected, _ = cv2.projectPoints(model, rvec, tvec, camera, None)
    err = float(np.sqrt(((projected.reshape(-1, 2) - image_pts) ** 2).sum(axis=1).mean()))
    yaw, pitch, roll = euler_angles(rot)
    return HeadPose(yaw, pitch, roll, err)


def project_model(yaw: float, pitch: float, roll: float, camera: np.ndarray, distance: float,
                  model: np.ndarray = MODEL_68) -> np.ndarray:
    """Project the generic model at a known pose (for tests and for drawing a pose axis)."""
    rvec, _ = cv2.Rodrigues(rotation_matrix(yaw, pitch, roll))
    tvec = np.array([[0.0], [0.0], [distance]])
    pts, _ = cv2.projectPoints(model, rvec, tvec, camera, None)
    return pts.reshape(-1, 2)


def landmarks_array(flat: list[float] | None, points: int) -> np.ndarray | None:
    """A flattened landmark column value back to (points, 2), or None."""
    if flat is None:
        return None
    arr = np.asarray(flat, dtype=np.float64)
    if arr.size != points * 2:
        raise ValueError(f"expected {points * 2} landmark values, got {arr.size}")
    return arr.reshape(points, 2)
