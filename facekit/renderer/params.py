"""Identity and nuisance parameters of the procedural face renderer.

Identity: a fixed Gaussian projection of the unit identity vector gives one standard-normal latent per
parameter (a unit vector projected on a N(0, 1) row is N(0, 1) whatever the dimension); the normal CDF
squashes it into the parameter's range, uniformly over random identities. The mapping is linear, then
monotone, so nearby vectors give nearby faces, and random 512-d vectors (nearly orthogonal) give
independent parameters, hence clearly different faces.

Presence switches (hair style, beard, moustache, mole, grey hair) come from the identity vector
only: a per-image perturbation may move a face's proportions a little but must never shave a beard.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np

HAIR_STYLES = ("bald", "buzz", "short", "side_part", "fringe", "long", "curly", "long_fringe")

# name -> (low, high) in face units (fractions of the image side) or unit-free ranges.
RANGES: dict[str, tuple[float, float]] = {
    "face_w": (0.165, 0.215),  # half-width at the cheekbones
    "face_h_top": (0.26, 0.31),  # cheekbone line to top of skull
    "face_h_low": (0.25, 0.325),  # cheekbone line to chin
    "top_square": (1.9, 2.6),  # superellipse exponent of the skull
    "jaw_square": (1.8, 3.1),  # superellipse exponent of the jaw: 2 oval, 3 square
    "jaw_taper": (0.0, 0.45),  # narrows the chin
    "eye_y": (-0.055, 0.0),
    "eye_sep": (0.34, 0.5),  # eye centre to midline, fraction of face_w
    "eye_w": (0.17, 0.225),  # eye half-width, fraction of face_w
    "eye_open": (0.27, 0.55),  # opening height / width
    "eye_tilt": (-9.0, 12.0),  # canthal tilt, degrees, outer corner up
    "iris_frac": (0.36, 0.52),  # iris radius / eye half-width
    "crease": (0.0, 1.0),  # upper lid crease height
    "iris_t": (0.0, 1.0),  # eye colour ramp
    "brow_gap": (0.032, 0.072),
    "brow_thick": (0.008, 0.021),
    "brow_arch": (0.0, 0.028),
    "brow_len": (1.15, 1.65),  # brow length / eye width
    "brow_tilt": (-0.015, 0.018),  # outer end up
    "brow_dark": (0.0, 1.0),
    "nose_len": (0.09, 0.155),  # eye line to nose base
    "nose_w": (0.14, 0.27),  # nostril wing half-width, fraction of face_w
    "nose_proj": (0.04, 0.09),
    "nose_bridge": (0.25, 1.0),  # bridge prominence (side shadow strength)
    "mouth_gap": (0.042, 0.082),  # nose base to mouth line
    "mouth_w": (0.26, 0.44),  # mouth half-width, fraction of face_w
    "lip_upper": (0.005, 0.015),
    "lip_lower": (0.007, 0.024),
    "lip_red": (0.0, 1.0),
    "skin_t": (0.0, 1.0),  # skin tone ramp, dark to light
    "skin_warm": (-1.0, 1.0),  # undertone, olive to ruddy
    "hair_t": (0.0, 1.0),  # hair colour ramp, black to platinum
    "hair_volume": (0.0, 1.0),
    "hairline": (0.0, 1.0),  # hairline height
    "hair_part": (-1.0, 1.0),
    "age": (0.0, 1.0),  # wrinkles, eye bags, grey hair
    "ear_h": (0.04, 0.064),
    "cheek": (0.0, 1.0),  # cheek colour
    "eyeliner": (0.0, 1.0),
    "mole_x": (-1.0, 1.0),
    "mole_y": (0.0, 1.0),
    "neck_w": (0.5, 0.75),  # fraction of face_w
    "socket": (0.0, 1.0),  # eye-socket depth (shadow)
    "cheek_hollow": (0.0, 1.0),  # shadow under the cheekbones
    "nose_tip": (0.0, 1.0),  # tip and wing size
    # Presence switches: from the identity vector only (see module doc).
    "hair_style": (0.0, float(len(HAIR_STYLES))),
    "beard": (0.0, 1.0),
    "moustache": (0.0, 1.0),
    "mole": (0.0, 1.0),
    "grey": (0.0, 1.0),
}
BEARD_ON, MOUSTACHE_ON, MOLE_ON = 0.72, 0.75, 0.7  # presence thresholds on the switches
IDENTITY_ONLY = frozenset({"hair_style", "beard", "moustache", "mole", "grey"})
_PROJECTION_SEED = 0xFACE_F0
# Share of the per-image perturbation in the geometry: enough to vary a person between images, small
# enough that identities stay apart (random identities differ by ~1.4 latent std per parameter; a
# sigma-0.5 perturbation moves a latent by ~0.5 std, this weight turns that into ~0.12).
PERTURB_WEIGHT = 0.25


@dataclass(frozen=True)
class IdentityParams:
    """Face geometry and texture of one person; units and ranges in ``RANGES``."""

    face_w: float
    face_h_top: float
    face_h_low: float
    top_square: float
    jaw_square: float
    jaw_taper: float
    eye_y: float
    eye_sep: float
    eye_w: float
    eye_open: float
    eye_tilt: float
    iris_frac: float
    crease: float
    iris_t: float
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_tilt: float
    brow_dark: float
    nose_len: float
    nose_w: float
    nose_proj: float
    nose_bridge: float
    mouth_gap: float
    mouth_w: float
    lip_upper: float
    lip_lower: float
    lip_red: float
    skin_t: float
    skin_warm: float
    hair_t: float
    hair_volume: float
    hairline: float
    hair_part: float
    age: float
    ear_h: float
    cheek: float
    eyeliner: float
    mole_x: float
    mole_y: float
    neck_w: float
    socket: float
    cheek_hollow: float
    nose_tip: float
    hair_style: int
    beard: float
    moustache: float
    mole: float
    grey: float

    @property
    def hair_style_name(self) -> str:
        return HAIR_STYLES[self.hair_style]

    @property
    def has_beard(self) -> bool:
        return self.beard > BEARD_ON

    @property
    def has_moustache(self) -> bool:
        return self.moustache > MOUSTACHE_ON


PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(IdentityParams))
assert set(PARAM_NAMES) == set(RANGES), "every identity parameter needs a range"


@functools.lru_cache(maxsize=8)
def _projection(dim: int) -> np.ndarray:
    """Fixed (constant-seeded) Gaussian projection for vectors of this dimension."""
    rng = np.random.default_rng([_PROJECTION_SEED, dim])
    w = rng.standard_normal((len(PARAM_NAMES), dim))
    w.setflags(write=False)
    return w


def identity_latent(vec: np.ndarray) -> np.ndarray:
    """One N(0, 1) latent per parameter for a unit vector (normalised here for safety)."""
    v = np.asarray(vec, np.float64).ravel()
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("identity vector must be finite and non-zero")
    return _projection(v.size) @ (v / norm)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def params_from_latent(z: np.ndarray, z_identity: np.ndarray | None = None) -> IdentityParams:
    """Squash latents into ranges; switches come from ``z_identity`` when given."""
    zi = z if z_identity is None else z_identity
    values: dict[str, float | int] = {}
    for k, name in enumerate(PARAM_NAMES):
        lo, hi = RANGES[name]
        src = zi[k] if name in IDENTITY_ONLY else z[k]
        values[name] = lo + (hi - lo) * _phi(float(src))
    values["hair_style"] = min(int(values["hair_style"]), len(HAIR_STYLES) - 1)
    return IdentityParams(**values)  # type: ignore[arg-type]


def identity_params(vec: np.ndarray, perturbed: np.ndarray | None = None,
                    perturb_weight: float = PERTURB_WEIGHT) -> IdentityParams:
    """Parameters of the person ``vec``; with ``perturbed``, proportions move ``perturb_weight`` of the
    way toward the perturbed vector's (a per-image variation of the same person)."""
    z = identity_latent(vec)
    if perturbed is None:
        return params_from_latent(z)
    if np.shape(perturbed) != np.shape(vec):
        raise ValueError(f"perturbed vector has shape {np.shape(perturbed)}, identity vector {np.shape(vec)}")
    zp = identity_latent(perturbed)
    return params_from_latent(z + perturb_weight * (zp - z), z)


@dataclass(frozen=True)
class Nuisance:
    """Everything about one image that is not the person: pose, expression, light, scene, accessories."""

    yaw: float = 0.0  # degrees, + turns toward image right
    pitch: float = 0.0  # degrees, + looks up
    roll: float = 0.0  # degrees, + clockwise in the image
    smile: float = 0.0  # 0-1
    mouth_open: float = 0.0  # 0-1
    eyes_closed: float = 0.0  # 0-1
    gaze_x: float = 0.0  # -1..1
    gaze_y: float = 0.0  # -1..1
    light_azimuth: float = 0.0  # degrees, + from image right
    light_elevation: float = 25.0  # degrees above the camera
    light_intensity: float = 1.0  # overall exposure multiplier
    bg_top: tuple[float, float, float] = (128.0, 128.0, 128.0)
    bg_bottom: tuple[float, float, float] = (110.0, 110.0, 110.0)
    clothes: tuple[float, float, float] = (70.0, 80.0, 100.0)
    glasses: bool = False
    glasses_style: int = 0  # 0 round, 1 rectangular
    glasses_color: tuple[float, float, float] = (30.0, 30.0, 35.0)
    hair_lock: float = 0.0  # a lock of hair falling over the forehead, 0-1
    scale: float = 1.0  # face size multiplier
    shift_x: float = 0.0  # face centre offset, fraction of the image side
    shift_y: float = 0.0
    blur: float = 0.0  # Gaussian sigma in pixels at 256 px
    noise: float = 0.0  # sensor noise std in grey levels


# Frame colours people wear (black, brown, tortoiseshell, gunmetal, gold, navy): vivid random colours
# read as paint over the eyes and cost the embedder more than real glasses do.
FRAMES: tuple[tuple[float, float, float], ...] = (
    (20.0, 20.0, 22.0), (55.0, 35.0, 25.0), (95.0, 60.0, 30.0), (90.0, 92.0, 98.0), (170.0, 140.0, 80.0),
    (30.0, 35.0, 60.0),
)


def _colour(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float, float]:
    c = rng.uniform(lo, hi, 3)
    return (float(c[0]), float(c[1]), float(c[2]))


def sample_nuisance(rng: np.random.Generator, strength: float, max_yaw: float = 20.0) -> Nuisance:
    """Random pose, expression, light and scene; ``strength`` (0-1) scales every variation, so 0 is a
    frontal, neutral, evenly lit face on grey. Always draws the same number of values, so one
    switch never shifts the others."""
    s = float(np.clip(strength, 0.0, 1.0))
    u = rng.random(20)
    grey = (128.0, 128.0, 128.0)
    top, bottom, clothes = _colour(rng, 25, 190), _colour(rng, 20, 180), _colour(rng, 25, 200)
    frame = FRAMES[int(rng.integers(len(FRAMES)))]

    def sym(i: int) -> float:
        return float(2.0 * u[i] - 1.0)

    def towards(c: tuple[float, float, float]) -> tuple[float, float, float]:
        return (grey[0] + (c[0] - grey[0]) * s, grey[1] + (c[1] - grey[1]) * s,
                grey[2] + (c[2] - grey[2]) * s)

    return Nuisance(
        yaw=sym(0) * max_yaw * s,
        pitch=sym(1) * 10.0 * s,
        roll=sym(2) * 8.0 * s,
        smile=float(u[3]) * s,
        mouth_open=float(u[4]) ** 2 * s,
        eyes_closed=float(u[5]) ** 6 * s,
        gaze_x=sym(6) * s,
        gaze_y=sym(7) * s * 0.6,
        light_azimuth=sym(8) * 60.0 * s,
        light_elevation=25.0 + sym(9) * 25.0 * s,
        light_intensity=1.0 + sym(10) * 0.25 * s,
        bg_top=towards(top),
        bg_bottom=towards(bottom),
        clothes=clothes,
        glasses=bool(u[11] < 0.2 * s),
        glasses_style=int(u[12] < 0.5),
        glasses_color=frame,
        hair_lock=float(max(0.0, u[13] - 0.8) * 5.0 * s),
        scale=1.0 + sym(14) * 0.07 * s,
        shift_x=sym(15) * 0.03 * s,
        shift_y=sym(16) * 0.03 * s,
        blur=float(u[17]) * 1.2 * s,
        noise=float(u[18]) * 4.0 * s,
    )
