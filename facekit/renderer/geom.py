"""Drawing primitives for the procedural face renderer: a head-fixed 3D frame projected to pixels.

Every facial feature is laid out in a frontal face frame (x right, y down, z toward the camera, in
fractions of the image side, origin at the face centre). Points get a depth from a head ellipsoid, so
rotating the frame by yaw and pitch moves the nose and eyes more than the cheeks: pose comes out of
one projection instead of per-feature hacks, and the same code draws every pose.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

Color = tuple[float, float, float]

SHIFT = 4  # sub-pixel bits for OpenCV polygon vertices
_ONE = 1 << SHIFT


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation (degrees): yaw turns toward image right, pitch tilts up, roll tilts clockwise."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rp = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rr = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rr @ rp @ ry


class Canvas:
    """An RGB uint8 canvas, a foreground mask and the head's projection; parts draw through it."""

    def __init__(self, size: int, centre: tuple[float, float], scale: float, rot: np.ndarray,
                 depth: tuple[float, float, float]) -> None:
        self.size = size
        self.img = np.zeros((size, size, 3), np.uint8)
        self.mask = np.zeros((size, size), np.uint8)  # foreground (head, hair, body) coverage
        self.centre = np.array(centre, np.float64) * size
        self.px = scale * size  # pixels per face unit
        self.rot = rot
        self.rx, self.ry, self.rz = depth  # head ellipsoid semi-axes (face units)

    def surface_z(self, xy: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
        """Depth of the head surface under frontal points (N,2) plus a constant lift."""
        q = 1.0 - (xy[:, 0] / self.rx) ** 2 - (xy[:, 1] / self.ry) ** 2
        return self.rz * np.sqrt(np.clip(q, 0.04, 1.0)) + lift

    def on_surface(self, xy: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
        return np.column_stack([xy, self.surface_z(xy, lift)])

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """Face-frame points (N,3) to pixel coordinates (N,2), orthographic."""
        return (xyz @ self.rot.T)[:, :2] * self.px + self.centre

    def surf(self, xy: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
        """Frontal points lying on the head surface, projected to pixels."""
        return self.project(self.on_surface(xy, lift))

    def pw(self, pixels_at_256: float) -> float:
        """A line width or blur given for a 256-px face, at this canvas's scale."""
        return pixels_at_256 * self.px / 256.0

    # -- drawing ---------------------------------------------------------------------------------

    def fill(self, pts: np.ndarray, color: Color, mask: bool = False) -> None:
        poly = [np.round(pts * _ONE).astype(np.int32)]
        cv2.fillPoly(self.img, poly, color, cv2.LINE_AA, shift=SHIFT)
        if mask:
            cv2.fillPoly(self.mask, poly, 255, cv2.LINE_AA, shift=SHIFT)

    def line(self, pts: np.ndarray, color: Color, width: float, closed: bool = False) -> None:
        poly = [np.round(pts * _ONE).astype(np.int32)]
        cv2.polylines(self.img, poly, closed, color, max(1, round(width)), cv2.LINE_AA, shift=SHIFT)

    def blend(self, pts: np.ndarray | list[np.ndarray], color: Color, alpha: float, blur: float = 0.0,
              width: float = 0.0) -> None:
        """Alpha-blend a soft polygon (or a polyline when width > 0) inside its bounding box only."""
        if alpha <= 0.003:
            return
        polys = pts if isinstance(pts, list) else [pts]
        allp = np.concatenate(polys)
        pad = int(3 * blur + width + 3)
        x0 = max(int(allp[:, 0].min()) - pad, 0)
        y0 = max(int(allp[:, 1].min()) - pad, 0)
        x1 = min(int(allp[:, 0].max()) + pad + 1, self.size)
        y1 = min(int(allp[:, 1].max()) + pad + 1, self.size)
        if x1 <= x0 or y1 <= y0:
            return
        # Wide blurs are done on a mask drawn at 1/f resolution, then upsampled: same softness, a
        # fraction of the cost (blurs were most of the render time).
        f = max(1, int(blur / 1.5))
        h, w = (y1 - y0 + f - 1) // f, (x1 - x0 + f - 1) // f
        m: np.ndarray = np.zeros((h, w), np.uint8)
        shifted = [np.round((p - (x0, y0)) * (_ONE / f)).astype(np.int32) for p in polys]
        if width > 0:
            cv2.polylines(m, shifted, False, 255, max(1, round(width / f)), cv2.LINE_AA, shift=SHIFT)
        else:
            cv2.fillPoly(m, shifted, 255, cv2.LINE_AA, shift=SHIFT)
        if blur > 0.3:
            sigma = blur / f
            k = int(sigma * 3) * 2 + 1
            m = cv2.GaussianBlur(m, (k, k), sigma)
        if f > 1:
            m = cv2.resize(m, (w * f, h * f), interpolation=cv2.INTER_LINEAR)[: y1 - y0, : x1 - x0]
        a = m.astype(np.float32)[..., None] * np.float32(alpha / 255.0)
        roi = self.img[y0:y1, x0:x1].astype(np.float32)
        roi += (np.asarray(color, np.float32) - roi) * a
        self.img[y0:y1, x0:x1] = np.clip(roi + 0.5, 0, 255).astype(np.uint8)


def superellipse(a: float, b: float, p: float, t: np.ndarray) -> np.ndarray:
    """Points of |x/a|^p + |y/b|^p = 1 at parameter t (radians, 0 = top, clockwise)."""
    s, c = np.sin(t), -np.cos(t)
    e = 2.0 / p
    return np.column_stack([a * np.sign(s) * np.abs(s) ** e, b * np.sign(c) * np.abs(c) ** e])


def ellipse_pts(cx: float, cy: float, a: float, b: float, n: int = 24, angle: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.column_stack([cx + ca * x - sa * y, cy + sa * x + ca * y])


def mix(c1: Color, c2: Color, t: float) -> Color:
    return (c1[0] + (c2[0] - c1[0]) * t, c1[1] + (c2[1] - c1[1]) * t, c1[2] + (c2[2] - c1[2]) * t)


def scale(c: Color, f: float) -> Color:
    return (min(c[0] * f, 255.0), min(c[1] * f, 255.0), min(c[2] * f, 255.0))


def palette(stops: tuple[Color, ...], t: float) -> Color:
    """Piecewise-linear colour ramp, t in [0, 1]: smooth in t, so nearby identities get nearby colours."""
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return mix(stops[i], stops[i + 1], t - i)
