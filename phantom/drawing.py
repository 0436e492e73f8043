"""Drawing phantoms: a truth and a size become an RGB colour-fundus photograph or a grayscale OCT B-scan.

Everything is drawn with numpy and OpenCV, sized relative to the fundus field or the scan, and big
and high-contrast enough that a tiny model can read it from 112–336-px views. Sizes are
``(width, height)`` like OpenCV; arrays are ``(height, width[, 3])`` RGB uint8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from eyecare_edge.phantom.sampling import sample_fundus_truth
from eyecare_edge.phantom.truth import FundusTruth, OctTruth


def _check_size(size: Sequence[int], minimum: int = 64) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if w < minimum or h < minimum:
        raise ValueError(f"size must be at least {minimum}x{minimum} px, got {w}x{h}")
    if w * h > 64_000_000:
        raise ValueError(f"size {w}x{h} is over the 64-megapixel limit for phantoms")
    return w, h


def fundus_geometry(truth: FundusTruth, size: Sequence[int]) -> tuple[float, float, float]:
    """Pixel centre (cx, cy) and radius R of the round camera field for an image of `size`."""
    w, h = _check_size(size)
    return w / 2.0, h / 2.0, truth.field_scale * min(w, h) / 2.0


def fundus_to_pixels(truth: FundusTruth, size: Sequence[int], x: float, y: float) -> tuple[float, float]:
    cx, cy, radius = fundus_geometry(truth, size)
    return cx + x * radius, cy + y * radius


def _blend(img: np.ndarray, mask: np.ndarray, color: Sequence[float], alpha: float, sigma: float) -> None:
    """Paint `color` into `img` through a uint8 `mask` (same H, W), softened by a Gaussian.

    `img` is planar float32 (C, H, W): channel-first keeps every operation on contiguous 2-D planes,
    several times faster in numpy than broadcasting over an interleaved last axis. Works on the
    mask's bounding box only.
    """
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return
    pad = int(3 * sigma) + 2
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(mask.shape[1], x + w + pad), min(mask.shape[0], y + h + pad)
    m = mask[y0:y1, x0:x1]
    if sigma > 0.3:
        m = cv2.GaussianBlur(m, (0, 0), sigma)
    m = m.astype(np.float32)
    m *= np.float32(alpha / 255.0)
    roi = img[:, y0:y1, x0:x1]
    # In place, one temporary: fresh full-size temporaries cost more (page faults) than the maths.
    delta = np.subtract(np.asarray(color, dtype=np.float32).reshape(-1, 1, 1), roi)
    delta *= m
    roi += delta


_SHIFT = 4  # cv2 fixed-point sub-pixel bits
_ONE = 1 << _SHIFT


def _ellipse(
    mask: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float, value: int = 255
) -> None:
    cv2.ellipse(
        mask,
        (round(cx * _ONE), round(cy * _ONE)),
        (max(1, round(a * _ONE)), max(1, round(b * _ONE))),
        angle,
        0,
        360,
        value,
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )


def _paint(
    img: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    angle: float,
    color: Sequence[float],
    alpha: float,
    sigma: float,
) -> None:
    """Alpha-paint one soft ellipse (semi-axes a, b; degrees) touching only its own neighbourhood."""
    ext = max(a, b) + 3 * sigma + 2
    h, w = img.shape[1:]
    x0, y0 = max(0, int(cx - ext)), max(0, int(cy - ext))
    x1, y1 = min(w, int(cx + ext) + 2), min(h, int(cy + ext) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _ellipse(mask, cx - x0, cy - y0, a, b, angle)
    _blend(img[:, y0:y1, x0:x1], mask, color, alpha, sigma)


def _paint_gaussian(
    img: np.ndarray, cx: float, cy: float, sigma: float, color: Sequence[float], alpha: float
) -> None:
    """Alpha-paint a round Gaussian blob (peak opacity `alpha`), e.g. the macula's darkening."""
    h, w = img.shape[1:]
    ext = 3.0 * sigma
    x0, y0 = max(0, int(cx - ext)), max(0, int(cy - ext))
    x1, y1 = min(w, int(cx + ext) + 2), min(h, int(cy + ext) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    gx = np.exp(-(((np.arange(x0, x1, dtype=np.float32) - cx) / sigma) ** 2) / 2)
    gy = np.exp(-(((np.arange(y0, y1, dtype=np.float32) - cy) / sigma) ** 2) / 2)
    m = np.outer(gy, gx) * np.float32(alpha)
    roi = img[:, y0:y1, x0:x1]
    delta = np.subtract(np.asarray(color, dtype=np.float32).reshape(-1, 1, 1), roi)
    delta *= m
    roi += delta


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid resized up (cheap texture)."""
    grid = rng.uniform(-1, 1, size=cells).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


# Fundus phantoms are drawn at most this many pixels on the longer side, then resized to the asked
# size: everything drawn is smooth and sized relative to the field, so detail is not lost, and a
# 1000-px image costs what a 480-px one does.
FUNDUS_WORK_SIDE = 480

_LESION_STYLE: dict[str, tuple[tuple[float, float, float], float, float]] = {
    # kind: (RGB colour, opacity, edge softness in field radii)
    "haemorrhage": ((92, 14, 9), 0.93, 0.005),
    "microaneurysm": ((125, 12, 10), 0.95, 0.0015),
    "cotton_wool_spot": ((238, 234, 214), 0.82, 0.012),
    "hard_exudate": ((250, 228, 105), 0.97, 0.0015),
    "drusen": ((240, 220, 140), 0.88, 0.005),
}


def draw_fundus(
    rng: np.random.Generator,
    truth: FundusTruth,
    size: Sequence[int],
    *,
    work_side: int = FUNDUS_WORK_SIDE,
) -> np.ndarray:
    """Render `truth` as an RGB colour-fundus photograph of `size` = (width, height), uint8 (H, W, 3).

    Round camera field with black surround, orange retina with vignetting and choroidal texture,
    darker macula, bright optic disc with a cup, arcade vessels (random walks curving around the
    macula) and the lesions, each painted at its truth position and size. Drawn at most
    `work_side` px on the longer side and resized up (a larger `work_side` gives finer vessels).
    """
    w_out, h_out = _check_size(size)
    scale = min(1.0, work_side / max(w_out, h_out))
    w, h = max(64, round(w_out * scale)), max(64, round(h_out * scale))
    # The field in working pixels, as `fundus_geometry` places it in output pixels.
    cx, cy, radius = w / 2.0, h / 2.0, truth.field_scale * min(w, h) / 2.0
    yy = (np.arange(h, dtype=np.float32) - np.float32(cy))[:, None]
    xx = (np.arange(w, dtype=np.float32) - np.float32(cx))[None, :]
    rho = np.sqrt(xx * xx + yy * yy)
    rho *= np.float32(1.0 / radius)

    # Vignetting x low-frequency choroidal texture x soft-edged round field (black surround),
    # computed in place: fresh full-size temporaries cost more than the arithmetic.
    r = np.minimum(rho, 1.0)
    light = r * r
    light *= r
    light *= np.float32(-0.42)
    light += np.float32(1.0)
    texture = _smooth_noise(rng, h, w, (5, 5))
    texture *= np.float32(0.06)
    texture += np.float32(1.0)
    fine = _smooth_noise(rng, h, w, (max(4, h // 24), max(4, w // 24)))
    fine *= np.float32(0.05)
    texture += fine
    light *= texture
    edge = np.subtract(np.float32(1.0), rho)
    edge *= np.float32(radius / 1.5)
    np.clip(edge, 0.0, 1.0, out=edge)
    light *= edge
    base = np.array([205.0, 88.0, 38.0], dtype=np.float32) * np.asarray(truth.pigment, dtype=np.float32)
    img = np.empty((3, h, w), np.float32)  # planar, see `_blend`
    for c in range(3):
        np.multiply(light, base[c], out=img[c])

    def px(x: float, y: float) -> tuple[float, float]:
        return cx + x * radius, cy + y * radius

    # Macula: a darker, browner patch with a faint foveal reflex.
    mx, my = px(truth.macula_x, truth.macula_y)
    m_r = truth.macula_radius * radius
    _paint_gaussian(img, mx, my, m_r * 0.6, base * np.float32(0.55), 0.55)
    _paint(img, mx, my, m_r * 0.08, m_r * 0.08, 0, base * np.float32(0.9), 0.6, m_r * 0.05)

    # Optic disc (slightly tall) and its brighter cup, offset toward the macula.
    dx, dy = px(truth.disc_x, truth.disc_y)
    d_r = truth.disc_radius * radius
    _paint(img, dx, dy, d_r * 0.94, d_r * 1.04, 90, (250, 215, 150), 0.95, d_r * 0.08)
    cup_dx = math.copysign(d_r * 0.15, truth.macula_x - truth.disc_x)
    cup = d_r * truth.cup_ratio
    _paint(img, dx + cup_dx, dy, cup, cup * 1.1, 90, (255, 245, 215), 0.9, d_r * 0.12)

    _draw_vessels(rng, img, truth, (cx, cy, radius))

    for kind, (color, alpha, blur) in _LESION_STYLE.items():
        tint = np.clip(np.asarray(color) * rng.uniform(0.94, 1.06, size=3), 0, 255)
        for les in truth.lesions:
            if les.kind == kind:
                lx, ly = px(les.x, les.y)
                a = les.radius * radius
                _paint(img, lx, ly, a, a * les.aspect, les.angle, tint, alpha, blur * radius)

    out = cv2.convertScaleAbs(cv2.merge(list(img)))  # interleave; round and saturate to uint8
    if (w, h) != (w_out, h_out):
        out = cv2.resize(out, (w_out, h_out), interpolation=cv2.INTER_CUBIC)
    return out


def _draw_vessels(
    rng: np.random.Generator, img: np.ndarray, truth: FundusTruth, geometry: tuple[float, float, float]
) -> None:
    """Arcade vessels: random walks from the disc that curve around the macula, with branches.

    Veins are darker and wider than arteries. The main trunks turn toward the temporal side (away
    from the disc) with a decaying curvature, which gives the superior and inferior arcades.
    """
    h, w = img.shape[1:]
    cx, cy, radius = geometry
    veins = np.zeros((h, w), np.uint8)
    arteries = np.zeros((h, w), np.uint8)
    disc = (cx + truth.disc_x * radius, cy + truth.disc_y * radius)
    fx, fy = cx + truth.macula_x * radius, cy + truth.macula_y * radius
    temporal = -1.0 if truth.disc_x > 0 else 1.0
    step = 0.025 * radius
    edge2, fovea2 = (0.98 * radius) ** 2, (0.16 * radius) ** 2

    def walk(start, angle, width, turn, decay, length, depth, mask) -> None:
        # The whole path at once (numpy), cut where it leaves the field or reaches the fovea.
        n = max(2, int(length / step))
        k = np.arange(n)
        angles = angle + np.cumsum(turn * np.exp(-k / decay) + rng.normal(0.0, 0.06, n))
        xs = start[0] + step * np.cumsum(np.cos(angles))
        ys = start[1] + step * np.cumsum(np.sin(angles))
        stop = ((xs - cx) ** 2 + (ys - cy) ** 2 > edge2) | ((xs - fx) ** 2 + (ys - fy) ** 2 < fovea2)
        end = int(np.argmax(stop)) if stop.any() else n
        pts = np.concatenate([[start], np.stack([xs[:end], ys[:end]], axis=1)])
        arr = (pts * _ONE).astype(np.int32)
        for i in range(0, len(pts) - 1, 8):  # tapering: thinner every 8 steps
            t = max(1, round(width * (1.0 - 0.55 * i / n)))
            cv2.polylines(mask, [arr[i : i + 9]], False, 255, t, cv2.LINE_AA, _SHIFT)
        if depth >= 2:
            return
        u = rng.random(n)
        for b in np.flatnonzero((u[:end] < 0.06) & (k[:end] > 3)):
            side = 1.0 if u[b] < 0.03 else -1.0
            walk(
                (float(xs[b]), float(ys[b])),
                float(angles[b]) + side * rng.uniform(0.4, 0.9),
                width * (1.0 - 0.55 * b / n) * 0.65,
                rng.normal(0, 0.02),
                30,
                length * rng.uniform(0.25, 0.5),
                depth + 1,
                mask,
            )

    for vertical in (-1.0, 1.0):
        for mask, width in ((veins, 0.02 * radius), (arteries, 0.014 * radius)):
            a0 = math.atan2(vertical, temporal * rng.uniform(0.15, 0.5))
            turn_sign = math.copysign(1.0, -math.sin(a0) * temporal)
            walk(disc, a0, width, turn_sign * rng.uniform(0.07, 0.09), 32, 2.0 * radius, 0, mask)
    for _ in range(int(rng.integers(3, 5))):
        a0 = math.atan2(rng.uniform(-1.2, 1.2), -temporal)
        mask = veins if rng.random() < 0.5 else arteries
        walk(disc, a0, 0.011 * radius, rng.normal(0, 0.01), 30, radius, 1, mask)

    sigma = max(0.5, 0.002 * radius)
    _blend(img, veins, (120, 22, 16), 0.78, sigma)
    _blend(img, arteries, (172, 44, 28), 0.6, sigma)


def draw_oct(rng: np.random.Generator, truth: OctTruth, size: Sequence[int]) -> np.ndarray:
    """Render `truth` as a grayscale OCT B-scan of `size` = (width, height), uint8 (H, W).

    Dark speckled vitreous, retinal layers with alternating reflectivity (RNFL, GCL/IPL, INL, OPL,
    ONL, ELM, ellipsoid zone), a foveal pit where the inner layers thin out, a bright RPE band,
    textured choroid fading with depth; fluid pockets are dark ellipses inside a thickened retina;
    drusen lift the RPE off Bruch's membrane.
    """
    w, h = _check_size(size)
    xs = (np.arange(w, dtype=np.float64) + 0.5) / w
    ilm = (np.asarray(truth.ilm_y(xs)) * h).astype(np.float32)[None, :]
    rpe = (np.asarray(truth.rpe_y(xs)) * h).astype(np.float32)[None, :]
    bruch = (np.asarray(truth.bruch_y(xs)) * h).astype(np.float32)[None, :]
    pit = np.exp(-(((xs - truth.fovea_x) / truth.pit_width) ** 2)).astype(np.float32)[None, :]
    q = 1.0 - 0.92 * pit  # the inner layers vanish at the foveal pit
    yy = np.arange(h, dtype=np.float32)[:, None]
    s = (yy - ilm) / np.maximum(rpe - ilm, 1.0)
    rpe_t = max(3.0, 0.018 * h)
    b1 = 0.10 * q
    b2 = b1 + 0.22 * q
    b3 = b2 + 0.09 * q
    b4 = b3 + 0.08 * q
    below = yy - rpe
    conds = [
        s < 0,
        s < b1,
        s < b2,
        s < b3,
        s < b4,
        s < 0.84,
        s < 0.88,
        s < 0.93,
        below < 0,
        below < rpe_t,
        yy < bruch + rpe_t * 0.6,
    ]
    values = [6.0, 165.0, 115.0, 52.0, 122.0, 42.0, 72.0, 185.0, 82.0, 240.0, 150.0]
    depth = np.maximum(yy - bruch - rpe_t * 0.6, 0.0)
    texture = 0.55 + 0.45 * _smooth_noise(rng, h, w, (max(4, h // 14), max(4, w // 10)))
    choroid = 135.0 * np.exp(-depth / np.float32(0.11 * h)) * texture + 5.0
    img = np.select(conds, values, default=choroid).astype(np.float32)

    if truth.fluid:
        mask = np.zeros((h, w), np.uint8)
        for p in truth.fluid:
            _ellipse(mask, p.x * w, p.y * h, p.half_width * w, p.half_height * h, 0)
        m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(0.8, 0.004 * h))
        img += (10.0 - img) * m

    img *= np.float32(truth.brightness)
    # Speckle, laterally elongated as in real B-scans: noise drawn at half the width, stretched.
    speckle = cv2.resize(
        rng.random((h, (w + 1) // 2), dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR
    )
    img = (img + 8.0) * (0.55 + 0.9 * speckle)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_phantom_fundus(size: Sequence[int], seed: int, *, condition: str | None = None) -> np.ndarray:
    """One phantom fundus photograph of `size` = (width, height), e.g. (3504, 2336), for benchmarks.

    Drawn at up to 1600 px (finer than dataset images) so that a camera-sized image still has
    sharp-ish vessels; about a quarter of a second for 3504x2336.
    """
    return draw_fundus(*make_phantom_fundus_truth(seed, condition), size, work_side=1600)


def make_phantom_fundus_truth(
    seed: int, condition: str | None = None
) -> tuple[np.random.Generator, FundusTruth]:
    """The (drawing rng, truth) pair behind `make_phantom_fundus(size, seed)`, for checking its labels."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF00D]))
    return rng, sample_fundus_truth(rng, condition)


# ---------------------------------------------------------------------------------------------
# Questions, answers and reports
# ---------------------------------------------------------------------------------------------
