"""Procedural face renderer: the offline default generator (no diffusion weights on these machines).

An identity vector fixes a person (face shape, proportions, skin, eyes, brows, nose, lips, hair,
facial hair, age marks); a seed fixes one photo of that person (pose, expression, light, scene,
glasses). The output must pass dlib's HOG detector and keep persons apart in dlib's ResNet
embedding, because the curation stages downstream are measured on these images. Pure numpy + OpenCV,
no global RNG: the same inputs give the same pixels on every run.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from facekit.renderer.geom import Canvas, Color, rotation
from facekit.renderer.params import (
    HAIR_STYLES,
    IdentityParams,
    Nuisance,
    identity_params,
    sample_nuisance,
)
from facekit.renderer.parts import (
    colours,
    draw_back_hair,
    draw_body,
    draw_brows,
    draw_ears,
    draw_eyes,
    draw_face_marks,
    draw_facial_hair,
    draw_front_hair,
    draw_glasses,
    draw_head,
    draw_mouth,
    draw_nose,
    face_outline,
    luma,
)

__all__ = [
    "HAIR_STYLES",
    "RENDERER_REVISION",
    "IdentityParams",
    "Nuisance",
    "ground_truth",
    "identity_params",
    "nuisance_strength",
    "render_face",
    "render_sample",
    "sample_nuisance",
]

# Bump when a change alters pixels for the same inputs: it is recorded as the model revision in lineage.
RENDERER_REVISION = "1"
_SHADE_GRID = 64  # lighting is smooth: compute it coarse, resize up


def _light_vector(nu: Nuisance) -> np.ndarray:
    az, el = math.radians(nu.light_azimuth), math.radians(nu.light_elevation)
    return np.array([math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)])


def _shading(cv: Canvas, ip: IdentityParams, nu: Nuisance, light: np.ndarray, skin: Color) -> np.ndarray:
    """Lambert shading of a camera-facing ellipsoid fitted to the head, wrapped so the dark side keeps
    some fill light; (size, size, 1) float32, 1.0 = a frontal-lit cheek."""
    g = _SHADE_GRID
    coords = (np.arange(g, dtype=np.float32) + 0.5) * (cv.size / g)
    centre = cv.project(np.array([[0.0, 0.0, 0.0]]))[0]
    ax = ip.face_w * 1.3 * cv.px
    ay = (ip.face_h_top + ip.face_h_low) * 0.6 * cv.px
    nx = (coords[None, :] - centre[0]) / ax
    ny = (coords[:, None] - centre[1]) / ay
    r2 = nx**2 + ny**2
    inv = np.where(r2 > 1.0, 1.0 / np.sqrt(r2), 1.0)
    nx, ny = nx * inv, ny * inv
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.0, 1.0))
    lam = nx * light[0] + ny * light[1] + nz * light[2]
    wrap = 0.35
    shade = 0.5 + 0.65 * np.clip((lam + wrap) / (1 + wrap), 0, None)
    shade *= nu.light_intensity * _exposure(skin) / 1.15
    return cv2.resize(shade.astype(np.float32), (cv.size, cv.size), interpolation=cv2.INTER_LINEAR)[..., None]


def _exposure(skin: Color) -> float:
    """Auto-exposure, as a camera metering on the face: dark skin gets up to 1.6x, so its features
    keep the contrast a detector needs instead of sinking into black."""
    return float(np.clip((150.0 / luma(skin)) ** 0.65, 1.0, 2.0))


def _background(size: int, nu: Nuisance) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = np.asarray(nu.bg_top, np.float32), np.asarray(nu.bg_bottom, np.float32)
    return np.broadcast_to(top + (bottom - top) * t, (size, size, 3))


def render_face(identity: IdentityParams, nuisance: Nuisance, size: int = 256,
                noise_seed: int = 0) -> np.ndarray:
    """One RGB uint8 image (size, size, 3). ``noise_seed`` only seeds the sensor noise, if any."""
    ip, nu = identity, nuisance
    cv = Canvas(size, (0.5 + nu.shift_x, 0.5 + nu.shift_y), nu.scale, rotation(nu.yaw, nu.pitch, nu.roll),
                (ip.face_w * 1.05, (ip.face_h_top + ip.face_h_low) * 0.55, ip.face_w * 1.1))
    pal = colours(ip)
    light = _light_vector(nu)
    draw_body(cv, ip, nu, pal)
    draw_back_hair(cv, ip, pal)
    draw_ears(cv, ip, pal)
    draw_head(cv, ip, pal)
    draw_face_marks(cv, ip, nu, pal)
    draw_facial_hair(cv, ip, pal, face_outline(ip))
    draw_front_hair(cv, ip, nu, pal)
    draw_brows(cv, ip, pal)
    draw_eyes(cv, ip, nu, pal, light)
    draw_nose(cv, ip, nu, pal)
    draw_mouth(cv, ip, nu, pal)
    if nu.glasses:
        draw_glasses(cv, ip, nu)
    # Foreground is drawn on black with anti-aliased coverage in the mask: a premultiplied composite.
    fg = cv.img.astype(np.float32) * _shading(cv, ip, nu, light, pal.skin)
    m = cv.mask.astype(np.float32)[..., None] * np.float32(1 / 255)
    out = _background(size, nu) * (1 - m) + fg
    if nu.blur > 0.25:
        sigma = nu.blur * size / 256
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    if nu.noise > 0.5:
        rng = np.random.default_rng(noise_seed)
        out = out + rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(nu.noise)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def nuisance_strength(perturbation_sigma: float) -> float:
    """Pose/expression/light spread tied to the identity perturbation: the Vec2Face schedule's
    largest sigma (0.7) gets the full range, smaller sigmas proportionally less."""
    return float(np.clip(perturbation_sigma / 0.7, 0.0, 1.0))


def render_sample(identity_vec: np.ndarray, perturbed_vec: np.ndarray | None, seed: int, size: int = 256,
                  perturbation_sigma: float = 0.5,
                  max_yaw: float = 20.0) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one sample: the person from ``identity_vec`` (proportions nudged toward ``perturbed_vec``),
    the photo conditions from ``seed``. Returns the image and its flat ground-truth dict."""
    ip = identity_params(identity_vec, perturbed_vec)
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), 0x5EED]))
    nu = sample_nuisance(rng, nuisance_strength(perturbation_sigma), max_yaw)
    noise_seed = int(rng.integers(0, 1 << 63))
    img = render_face(ip, nu, size, noise_seed)
    return img, ground_truth(ip, nu)


def _hex(c: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(min(max(v, 0.0), 255.0)):02x}" for v in c)


def ground_truth(ip: IdentityParams, nu: Nuisance) -> dict[str, Any]:
    """Flat JSON-able facts about a render: what a detector, a pose or attribute model should find."""
    return {
        "yaw": round(nu.yaw, 3),
        "pitch": round(nu.pitch, 3),
        "roll": round(nu.roll, 3),
        "smile": round(nu.smile, 4),
        "mouth_open": round(nu.mouth_open, 4),
        "eyes_closed": round(nu.eyes_closed, 4),
        "light_azimuth": round(nu.light_azimuth, 3),
        "light_elevation": round(nu.light_elevation, 3),
        "light_intensity": round(nu.light_intensity, 4),
        "glasses": bool(nu.glasses),
        "hair_lock": round(nu.hair_lock, 4),
        "background": _hex(nu.bg_top),
        "blur": round(nu.blur, 4),
        "noise": round(nu.noise, 4),
        "hair_style": ip.hair_style_name,
        "beard": ip.has_beard,
        "moustache": ip.has_moustache,
        "skin_tone": round(ip.skin_t, 4),
        "age": round(ip.age, 4),
    }
