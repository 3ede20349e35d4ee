"""The parts of a rendered face, drawn back to front on a ``Canvas``.

Shapes are anti-aliased polygons; soft shadows (eye sockets, nose side, under-lip) are blurred
alpha blends, because a HOG detector keys on the dark-eyes / light-cheeks / dark-mouth gradient
layout of real faces and the dlib embedder on proportions, colours and the hair frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facekit.renderer.geom import Canvas, Color, ellipse_pts, mix, palette, scale, superellipse
from facekit.renderer.params import BEARD_ON, MOLE_ON, IdentityParams, Nuisance

SKIN = ((72, 47, 35), (104, 68, 48), (141, 96, 68), (186, 137, 102), (216, 172, 142), (240, 204, 182),
        (250, 224, 208))
HAIR = ((22, 18, 16), (48, 33, 25), (88, 58, 36), (128, 62, 32), (150, 108, 66), (196, 162, 104),
        (232, 214, 170))
IRIS = ((45, 28, 18), (96, 58, 30), (125, 98, 48), (78, 115, 66), (98, 118, 140), (60, 112, 185))
DARK: Color = (22, 16, 16)

# Fixed hair-strand layout (crown jitter, position along the hairline), constant-seeded.
_rs = np.random.default_rng(0x4A1E)
STRANDS = np.column_stack([_rs.uniform(-0.9, 0.9, 18), _rs.uniform(-1.0, 1.0, 18)])


@dataclass(frozen=True)
class Palette:
    skin: Color
    hair: Color
    brow: Color
    iris: Color
    lip: Color
    sclera: Color


def luma(c: Color) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def colours(ip: IdentityParams) -> Palette:
    w = ip.skin_warm
    base = palette(SKIN, ip.skin_t)
    skin = (min(base[0] * (1 + 0.05 * w), 255.0), base[1] * (1 - 0.015 * w), base[2] * (1 - 0.09 * w))
    # Light hair on dark skin is rare in people, and it makes a bright frame around a dark face that
    # HOG misses: darker skin compresses the hair ramp toward its dark end. Hair as bright as the skin
    # hides the face contour, so it is pushed darker until the two differ.
    light = 0.1 + 0.9 * ip.skin_t**1.5
    greyness = float(np.clip((ip.grey - 0.62) / 0.2, 0, 1)) * (0.4 + 0.6 * ip.age) * (0.45 + 0.55 * light)
    hair = mix(palette(HAIR, ip.hair_t * light), (196, 196, 200), greyness)
    gap = luma(skin) - luma(hair)
    if abs(gap) < 45.0:
        hair = mix(hair, DARK, float(np.clip((45.0 - gap) / max(luma(hair), 1.0), 0.0, 0.85)))
    brow = mix(hair, DARK, 0.25 + 0.5 * ip.brow_dark)
    lip = mix(scale(skin, 0.82), (176, 64, 78), 0.25 + 0.45 * ip.lip_red)
    # Eye whites sit in the lids' shadow: a little brighter than the skin, never a white spot on a
    # dark face (HOG wants the eye region darker than the cheeks).
    sclera = mix(scale(skin, 1.25), (225, 220, 214), 0.35)
    return Palette(skin, hair, brow, palette(IRIS, ip.iris_t), lip, sclera)


# -- layout -----------------------------------------------------------------------------------------


def face_outline(ip: IdentityParams, n: int = 72) -> np.ndarray:
    """Frontal face contour (n,2): superellipse skull on top, tapered superellipse jaw below."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    top = superellipse(ip.face_w, ip.face_h_top, ip.top_square, t)
    low = superellipse(ip.face_w, ip.face_h_low, ip.jaw_square, t)
    low[:, 0] *= 1.0 - ip.jaw_taper * (np.clip(low[:, 1], 0, None) / ip.face_h_low) ** 2
    return np.where((-np.cos(t) < 0)[:, None], top, low)


def skull(ip: IdentityParams, grow: float, a0: float, a1: float, n: int = 40) -> np.ndarray:
    """Part of the skull outline grown by ``grow`` (face units), angles in radians from the top."""
    t = np.linspace(a0, a1, n)
    return superellipse(ip.face_w + grow, ip.face_h_top + grow * 1.25, ip.top_square, t)


def nose_base_y(ip: IdentityParams) -> float:
    return ip.eye_y + ip.nose_len


def mouth_y(ip: IdentityParams) -> float:
    return nose_base_y(ip) + ip.mouth_gap


# -- parts ------------------------------------------------------------------------------------------


def draw_body(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette) -> None:
    """Neck and shoulders; they face the camera, only the head turns."""
    px, c = cv.px, cv.centre
    nw = ip.neck_w * ip.face_w
    chin = ip.face_h_low
    neck = np.array([[-nw, chin * 0.3], [nw, chin * 0.3], [nw * 1.08, chin + 0.16],
                     [-nw * 1.08, chin + 0.16]])
    cv.fill(neck * px + c, scale(pal.skin, 0.9), mask=True)
    t = np.linspace(0, 1, 12)
    sh_y = chin + 0.11
    right = np.column_stack([nw * 0.9 + t * 0.42, sh_y + 0.09 * np.sqrt(t)])
    body = np.vstack([right, [[0.5, 0.7], [-0.5, 0.7]], (right * (-1, 1))[::-1]])
    cv.fill(body * px + c, nu.clothes, mask=True)
    u = np.linspace(-1, 1, 12)
    collar = np.column_stack([u * nw, sh_y + 0.03 + 0.03 * (1 - u**2)])
    cv.blend(collar * px + c, scale(nu.clothes, 0.6), 0.5, blur=cv.pw(1.0), width=cv.pw(3))
    # The jaw's shadow on the neck.
    shadow = np.array([[-nw, chin * 0.55], [nw, chin * 0.55], [nw, chin + 0.035], [-nw, chin + 0.035]])
    cv.blend(shadow * px + c, scale(pal.skin, 0.55), 0.55, blur=0.012 * px)


def draw_back_hair(cv: Canvas, ip: IdentityParams, pal: Palette) -> None:
    style = ip.hair_style_name
    if style not in ("long", "long_fringe", "curly"):
        return
    g = 0.03 + 0.05 * ip.hair_volume
    if style == "curly":
        g = 0.06 + 0.06 * ip.hair_volume
        t = np.linspace(-2.2, 2.2, 60)
        pts = skull(ip, g, -2.2, 2.2, 60) * (1 + 0.04 * np.sin(9 * t))[:, None]
        nape = ip.face_h_low * 0.5
        back = np.vstack([pts, [[ip.face_w * 0.9, nape], [-ip.face_w * 0.9, nape]]])
    else:
        top = skull(ip, g, -np.pi / 2, np.pi / 2, 36)
        drop = ip.face_h_low + 0.06 + 0.1 * ip.hair_volume
        back = np.vstack([top, [[ip.face_w + g * 1.4, drop], [ip.face_w * 0.55, drop + 0.02],
                                [-ip.face_w * 0.55, drop + 0.02], [-ip.face_w - g * 1.4, drop]]])
    cv.fill(cv.project(np.column_stack([back, np.full(len(back), -0.05)])), scale(pal.hair, 0.8), mask=True)


def draw_ears(cv: Canvas, ip: IdentityParams, pal: Palette) -> None:
    for s in (-1.0, 1.0):
        cx, cy = s * ip.face_w * 0.97, ip.eye_y + 0.035
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        wide = 1 + 0.3 * (np.sin(t) < 0)  # the helix is wider at the top
        ear = np.column_stack([cx + s * 0.022 * np.cos(t) * wide, cy + ip.ear_h * np.sin(t), np.zeros(20)])
        cv.fill(cv.project(ear), scale(pal.skin, 0.93), mask=True)
        a = t[3:14]
        inner = np.column_stack([cx + s * 0.012 * np.cos(a), cy + ip.ear_h * 0.6 * np.sin(a - 1.2),
                                 np.zeros(len(a))])
        cv.blend(cv.project(inner), scale(pal.skin, 0.55), 0.6, blur=cv.pw(0.8), width=cv.pw(2))


def draw_head(cv: Canvas, ip: IdentityParams, pal: Palette) -> None:
    cv.fill(cv.surf(face_outline(ip)), pal.skin, mask=True)


def draw_front_hair(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette) -> None:
    """Hair over the skull down to the hairline (or a fringe), then strands and a falling lock."""
    style = ip.hair_style_name
    w, e = ip.face_w, ip.eye_y
    side_y = e + 0.02
    hl_y = -ip.face_h_top * (0.56 + 0.22 * ip.hairline)
    brow_top = e - ip.brow_gap - 0.012
    if style == "bald":
        for s in (-1.0, 1.0):
            patch = np.array([[s * w * 1.03, side_y + 0.01], [s * w * 1.06, -0.1], [s * w * 0.9, -0.13],
                              [s * w * 0.9, side_y]])
            cv.fill(cv.surf(patch, 0.004), pal.hair)
        return
    g = {"buzz": 0.004, "curly": 0.06 + 0.06 * ip.hair_volume}.get(style, 0.012 + 0.04 * ip.hair_volume)
    fringe = style in ("fringe", "long_fringe")
    xs = np.linspace(-0.9, 0.9, 25)
    if fringe:
        ys = brow_top - 0.004 + 0.006 * np.cos(xs * 23) + 0.02 * xs**2 + 0.01 * ip.hair_part * xs
    else:
        recess = 0.018 * ip.age * np.exp(-(((np.abs(xs) - 0.55) / 0.16) ** 2))
        ys = hl_y + 0.03 * xs**2 - recess + 0.018 * ip.hair_part * xs * (style == "side_part")
    hairline = np.column_stack([xs * w, np.minimum(ys, brow_top)])
    outer = skull(ip, g, -np.pi / 2 - 0.25, np.pi / 2 + 0.25, 44)
    if style == "curly":
        outer = outer * (1 + 0.035 * np.sin(np.linspace(0, 15 * np.pi, 44)))[:, None]
    inner = np.vstack([[[w * 0.99, side_y]], hairline[::-1], [[-w * 0.99, side_y]]])
    poly = np.vstack([outer, inner])
    col = pal.hair if style != "buzz" else mix(pal.skin, pal.hair, 0.75)
    cv.fill(cv.surf(poly, 0.006), col, mask=True)
    # Strands: a fixed pattern, lighter and darker than the base colour.
    strands = []
    for cx, hx in STRANDS:
        top = np.array([(hx * 0.45 + cx * 0.05) * w, -ip.face_h_top - g])
        end = hairline[int((hx * 0.5 + 0.5) * (len(hairline) - 1))]
        mid = (top + end) / 2 + (0.02 * hx, 0.0)
        strands.append(cv.surf(np.array([top, mid, end]), 0.008))
    cv.blend(strands[::2], scale(col, 0.6), 0.2, blur=cv.pw(0.6), width=cv.pw(1.2))
    cv.blend(strands[1::2], scale(col, 1.35), 0.15, blur=cv.pw(0.6), width=cv.pw(1.2))
    if nu.hair_lock > 0:  # a lock falling from the hairline toward one eye, tapering to a tip
        side = 1.0 if ip.hair_part >= 0 else -1.0
        t = np.linspace(0.0, 1.0, 10)
        y_top = float(np.min(hairline[:, 1]))
        cx = side * w * (0.2 + 0.25 * t**1.5)
        cy = y_top - 0.01 + t * (e - 0.015 + 0.02 * nu.hair_lock - y_top)
        half = 0.012 * (1 - t) + 0.001
        lock = np.vstack([np.column_stack([cx - half, cy]), np.column_stack([cx + half, cy])[::-1]])
        cv.blend(cv.surf(lock, 0.01), scale(col, 0.9), 0.95, blur=cv.pw(0.6))


def draw_brows(cv: Canvas, ip: IdentityParams, pal: Palette) -> None:
    ex, ew = ip.eye_sep * ip.face_w, ip.eye_w * ip.face_w
    t = np.linspace(0, 1, 14)
    for s in (-1.0, 1.0):
        x = s * (ex - ew * 0.95 + t * ew * ip.brow_len * 1.9)
        arch = ip.brow_arch * np.sin(np.pi * np.clip(t * 1.15, 0, 1))
        ymid = ip.eye_y - ip.brow_gap - arch - ip.brow_tilt * t
        th = ip.brow_thick * (1.15 - 0.65 * t**1.5)
        poly = np.vstack([np.column_stack([x, ymid - th / 2]), np.column_stack([x, ymid + th / 2])[::-1]])
        cv.blend(cv.surf(poly, 0.004), pal.brow, 0.92, blur=cv.pw(0.6))


def _lid(u: np.ndarray, ew: float, hu: float, hl: float) -> tuple[np.ndarray, np.ndarray]:
    w = np.clip(1 - (u / ew) ** 2, 0, 1)
    return -hu * w**0.55 * (1 - 0.12 * u / ew), hl * w**0.75 * (1 + 0.1 * u / ew)


def draw_eyes(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette, light: np.ndarray) -> None:
    ew = ip.eye_w * ip.face_w
    closed = nu.eyes_closed
    hu0, hl = ew * ip.eye_open * 0.95, ew * ip.eye_open * 0.62
    phi = math.radians(ip.eye_tilt)
    u = np.linspace(-ew, ew, 21)
    for s in (-1.0, 1.0):
        ex, ey = s * ip.eye_sep * ip.face_w, ip.eye_y

        def place(uv: np.ndarray, ex: float = ex, ey: float = ey, s: float = s) -> np.ndarray:
            x = ex + s * (uv[:, 0] * math.cos(phi) + uv[:, 1] * math.sin(phi))
            y = ey - uv[:, 0] * math.sin(phi) + uv[:, 1] * math.cos(phi)
            return cv.surf(np.column_stack([x, y]), -0.01)

        socket = ellipse_pts(ex, ey - 0.25 * hu0, 1.35 * ew, 0.95 * ew, 20)
        cv.blend(cv.surf(socket, -0.01), scale(pal.skin, 0.55), 0.3 + 0.3 * ip.socket + 0.12 * ip.age,
                 blur=0.35 * ew * cv.px)
        up0, lo = _lid(u, ew, hu0, hl)
        up = up0 * (1 - closed) + lo * 0.5 * closed
        cv.fill(place(np.vstack([np.column_stack([u, up]), np.column_stack([u, lo])[::-1]])), pal.sclera)
        r = ip.iris_frac * ew
        ic = np.array([nu.gaze_x * ew * 0.3, nu.gaze_y * hu0 * 0.25 + 0.1 * hu0])
        for radius, col in ((r, pal.iris), (r * 0.42, (12, 10, 10))):
            t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            cu = np.clip(ic[0] + radius * np.cos(t), -ew * 0.98, ew * 0.98)
            lu, ll = _lid(cu, ew, hu0, hl)
            lu = lu * (1 - closed) + ll * 0.5 * closed
            cvv = np.clip(ic[1] + radius * np.sin(t), lu, ll)
            cv.fill(place(np.column_stack([cu, cvv])), col)
        if closed < 0.6:
            hx, hy = ic[0] + r * 0.35 * float(light[0]), ic[1] - r * 0.35
            cv.blend(place(np.array([[hx - r * 0.15, hy], [hx, hy - r * 0.15], [hx + r * 0.15, hy],
                                     [hx, hy + r * 0.15]])), (250, 250, 250), 0.85)
        liner = 1.6 + 2.2 * float(np.clip((ip.eyeliner - 0.6) / 0.3, 0, 1))
        cv.blend(place(np.column_stack([u, up])), DARK, 0.9, width=cv.pw(liner))
        cv.blend(place(np.column_stack([u, lo])), scale(pal.skin, 0.5), 0.45, width=cv.pw(1.2))
        crease = np.column_stack([u * 0.95, up0 * 1.05 - ew * (0.12 + 0.3 * ip.crease)])
        cv.blend(place(crease), scale(pal.skin, 0.55), 0.45, blur=cv.pw(0.7), width=cv.pw(1.5))
        if ip.age > 0.45:
            bag = np.column_stack([u * 0.8, lo * 1.2 + ew * 0.22])
            cv.blend(place(bag), scale(pal.skin, 0.6), (ip.age - 0.45) * 0.8, blur=cv.pw(0.8),
                     width=cv.pw(1.5))


def draw_nose(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette) -> None:
    nb = nose_base_y(ip)
    nw = ip.nose_w * ip.face_w
    p = ip.nose_proj
    side = -1.0 if nu.light_azimuth > 0 else 1.0  # shadow falls away from the light
    t = np.linspace(0, 1, 10)
    ridge_y = ip.eye_y + 0.01 + t * (nb - 0.014 - ip.eye_y - 0.01)
    ridge = cv.project(np.column_stack([side * 0.004 * np.ones(10), ridge_y,
                                        cv.surface_z(np.column_stack([np.zeros(10), ridge_y])) + p * t**1.3]))
    flank = cv.surf(np.column_stack([side * (0.014 + t * (nw * 0.85 - 0.014)), ridge_y]), p * 0.15 * t)
    strength = 0.18 + 0.3 * ip.nose_bridge * (0.4 + 0.6 * min(abs(nu.light_azimuth) / 45, 1))
    cv.blend(np.vstack([ridge, flank[::-1]]), scale(pal.skin, 0.6), strength, blur=0.012 * cv.px)
    under = np.column_stack([nw * 0.95 * np.cos(np.linspace(0, np.pi, 12)),
                             nb + 0.004 + 0.01 * np.sin(np.linspace(0, np.pi, 12))])
    cv.blend(cv.surf(under, p * 0.2), scale(pal.skin, 0.55), 0.35, blur=0.006 * cv.px)
    for s in (-1.0, 1.0):
        # The alar crease: a "(" arc around the outer side of the wing, from its top to the nostril.
        a = np.linspace(-1.4, 1.5, 12)
        wr = 0.011 + 0.008 * ip.nose_tip
        wing = np.column_stack([s * nw * (0.6 + 0.4 * np.cos(a)), nb - 0.004 - 0.7 * wr - wr * np.sin(a)])
        cv.blend(cv.surf(wing, p * 0.25), scale(pal.skin, 0.5), 0.6, blur=cv.pw(0.5), width=cv.pw(1.6))
        nostril = ellipse_pts(s * nw * 0.42, nb - 0.003, nw * 0.24, 0.0032 + 0.0002 * max(nu.pitch, 0), 14)
        cv.blend(cv.surf(nostril, p * 0.35), scale(pal.skin, 0.35), 0.6, blur=cv.pw(0.9))
    tr = 0.009 + 0.008 * ip.nose_tip
    tip = ellipse_pts(0.0, nb - 0.006 - tr, tr, tr * 0.85, 12)
    cv.blend(cv.project(np.column_stack([tip[:, 0], tip[:, 1], cv.surface_z(tip) + p * 0.95])),
             scale(pal.skin, 1.2), 0.35, blur=0.008 * cv.px)


def draw_mouth(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette) -> None:
    my = mouth_y(ip)
    mw = ip.mouth_w * ip.face_w * (1 + 0.14 * nu.smile)
    x = np.linspace(-1, 1, 23)
    env = np.sqrt(np.clip(1 - x**2, 0, 1))
    line = my - nu.smile * 0.016 * x**2 + 0.004 * nu.smile
    gap = (nu.mouth_open * 0.032 + 0.004 * nu.smile * nu.mouth_open) * env**1.4
    low_line = line + gap
    bow = 1 + 0.35 * np.exp(-(((np.abs(x) - 0.3) / 0.18) ** 2)) - 0.3 * np.exp(-((x / 0.1) ** 2))
    top = line - ip.lip_upper * env * bow
    bottom = low_line + ip.lip_lower * env**0.8 * (1 - 0.15 * nu.smile)
    xs = x * mw
    lift = 0.006

    def pts(y: np.ndarray) -> np.ndarray:
        return np.column_stack([xs, y])

    # Shadow under the lower lip.
    cv.blend(cv.surf(pts(bottom + 0.008 + 0.004 * env), lift), scale(pal.skin, 0.6), 0.4,
             blur=0.008 * cv.px, width=0.006 * cv.px)
    if nu.mouth_open > 0.08:
        cv.fill(cv.surf(np.vstack([pts(line), pts(low_line)[::-1]]), lift), (62, 24, 28))
        teeth = np.minimum(line + 0.012 * env, low_line)
        k = np.abs(x) < 0.75
        cv.fill(cv.surf(np.vstack([pts(line)[k], pts(teeth)[k][::-1]]), lift), (226, 220, 206))
    cv.fill(cv.surf(np.vstack([pts(top), pts(line)[::-1]]), lift), scale(pal.lip, 0.9))
    cv.fill(cv.surf(np.vstack([pts(low_line), pts(bottom)[::-1]]), lift), pal.lip)
    cv.blend(cv.surf(pts(line), lift), scale(pal.lip, 0.45), 0.85, width=cv.pw(1.4))
    hl = np.column_stack([xs[7:16], (low_line[7:16] * 0.4 + bottom[7:16] * 0.6)])
    cv.blend(cv.surf(hl, lift), scale(pal.lip, 1.3), 0.3, blur=cv.pw(1.0), width=cv.pw(2))


def draw_face_marks(cv: Canvas, ip: IdentityParams, nu: Nuisance, pal: Palette) -> None:
    """Cheek colour, folds, forehead lines, mole: identity texture the embedder can see."""
    nb, my = nose_base_y(ip), mouth_y(ip)
    nw, mw = ip.nose_w * ip.face_w, ip.mouth_w * ip.face_w
    for s in (-1.0, 1.0):
        cheek = ellipse_pts(s * ip.eye_sep * ip.face_w, nb - 0.015, 0.035, 0.025, 16)
        cv.blend(cv.surf(cheek), (200, 90, 90), 0.04 + 0.14 * ip.cheek + 0.06 * nu.smile,
                 blur=0.02 * cv.px)
        hollow = ellipse_pts(s * ip.face_w * 0.72, nb + 0.01, 0.03, 0.04, 16)
        cv.blend(cv.surf(hollow), scale(pal.skin, 0.6), 0.05 + 0.3 * ip.cheek_hollow, blur=0.018 * cv.px)
        t = np.linspace(0, 1, 10)
        fold = np.column_stack([s * (nw * 1.15 + t * (mw * 1.05 - nw * 1.15) + 0.012 * np.sin(np.pi * t)),
                                nb - 0.018 + t * (my + 0.012 - nb + 0.018)])
        cv.blend(cv.surf(fold, 0.002), scale(pal.skin, 0.6), 0.12 + 0.35 * ip.age + 0.25 * nu.smile,
                 blur=cv.pw(1.0), width=cv.pw(2.0))
    shine = (250, 240, 230)
    spots = [(0.0, ip.eye_y - ip.brow_gap - 0.045, 0.05, 0.022)] + [
        (s * ip.eye_sep * ip.face_w * 1.15, nb - 0.03, 0.03, 0.018) for s in (-1.0, 1.0)]
    cv.blend([cv.surf(ellipse_pts(x, y, a, b, 16)) for x, y, a, b in spots], shine,
             0.06 + 0.14 * (1 - ip.skin_t), blur=0.02 * cv.px)
    if ip.age > 0.5:
        base = ip.eye_y - ip.brow_gap - 0.035
        lines = [np.column_stack([np.linspace(-0.09, 0.09, 9), base - k * 0.014 + 0.004 *
                                  np.sin(np.linspace(0, np.pi, 9) + k)]) for k in range(3)]
        cv.blend([cv.surf(ln) for ln in lines], scale(pal.skin, 0.65), (ip.age - 0.5) * 0.7, blur=cv.pw(0.6),
                 width=cv.pw(1.3))
    if ip.mole > MOLE_ON:
        mx, my2 = ip.mole_x * ip.face_w * 0.6, nb + (ip.mole_y - 0.5) * 0.12
        dot = ellipse_pts(mx, my2, 0.0045, 0.0045, 10)
        cv.blend(cv.surf(dot, 0.002), scale(pal.skin, 0.35), min(1.0, (ip.mole - MOLE_ON) * 6),
                 blur=cv.pw(0.5))


def draw_facial_hair(cv: Canvas, ip: IdentityParams, pal: Palette, outline_frontal: np.ndarray) -> None:
    nb, my = nose_base_y(ip), mouth_y(ip)
    mw = ip.mouth_w * ip.face_w
    if ip.has_beard:
        low = outline_frontal[outline_frontal[:, 1] > nb - 0.02]
        outer = low[np.argsort(-np.arctan2(low[:, 0], low[:, 1]))]  # right cheek, chin, left cheek
        below_lip = my + ip.lip_lower + 0.02
        inner = np.array([[-ip.face_w * 0.78, nb - 0.02], [-mw * 1.3, my], [-mw * 0.6, below_lip],
                          [mw * 0.6, below_lip], [mw * 1.3, my], [ip.face_w * 0.78, nb - 0.02]])
        full = float(np.clip((ip.beard - BEARD_ON) / 0.2, 0, 1))
        cv.blend(cv.surf(np.vstack([outer, inner])), scale(pal.hair, 0.85), 0.35 + 0.4 * full,
                 blur=0.006 * cv.px)
    if ip.has_moustache:
        x = np.linspace(-1.05, 1.05, 15)
        env = np.sqrt(np.clip(1 - (x / 1.05) ** 2, 0, 1))
        lower = my - ip.lip_upper * 0.7 * env + 0.012 * np.abs(x) ** 3
        upper = lower - min(0.014, my - ip.lip_upper - nb - 0.004) * (0.4 + 0.6 * env)
        band = np.vstack([np.column_stack([x * mw, upper]), np.column_stack([x * mw, lower])[::-1]])
        cv.blend(cv.surf(band, 0.006), scale(pal.hair, 0.8), 0.8, blur=0.003 * cv.px)


def draw_glasses(cv: Canvas, ip: IdentityParams, nu: Nuisance) -> None:
    ew = ip.eye_w * ip.face_w
    rw, rh = ew * 1.32, ew * (0.88 + 0.1 * nu.glasses_style)
    t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    e = 2.0 / (2.0 if nu.glasses_style == 0 else 4.0)
    width = cv.pw(1.0 + 0.8 * nu.glasses_style)
    rims = []
    for s in (-1.0, 1.0):
        cx, cy = s * ip.eye_sep * ip.face_w, ip.eye_y + 0.003
        c, sn = np.cos(t), np.sin(t)
        rim = np.column_stack([cx + rw * np.sign(c) * np.abs(c) ** e,
                               cy + rh * np.sign(sn) * np.abs(sn) ** e])
        rims.append(cv.project(np.column_stack([rim, cv.surface_z(rim) + 0.025])))
    cv.blend(rims, (235, 240, 245), 0.06)
    for rim in rims:
        cv.line(rim, nu.glasses_color, width, closed=True)
    gap = ip.eye_sep * ip.face_w - rw
    arc = np.sin(np.linspace(0, np.pi, 5))
    bridge = np.column_stack([np.linspace(-gap, gap, 5), ip.eye_y - 0.3 * rh - 0.004 * arc])
    cv.line(cv.project(np.column_stack([bridge, cv.surface_z(bridge) + 0.025])), nu.glasses_color, width)
    for s in (-1.0, 1.0):
        arm = np.array([[s * (ip.eye_sep * ip.face_w + rw), ip.eye_y - 0.3 * rh, 0.0],
                        [s * ip.face_w * 0.99, ip.eye_y + 0.008, 0.0]])
        arm[:, 2] = cv.surface_z(arm[:, :2]) + np.array([0.02, 0.0])
        cv.line(cv.project(arm), nu.glasses_color, width)
