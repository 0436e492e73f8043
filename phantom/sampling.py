"""Sampling phantom ground truth and image sizes from a numpy Generator.

The sampler keeps the DR grades visibly apart (moderate: at most `MODERATE_MAX_HAEMORRHAGES`
haemorrhages; severe: at least `SEVERE_HAEMORRHAGES_PER_QUADRANT` in every quadrant), places lesions
without overlap inside the visible field and off the optic disc, and draws image size and aspect
ratio independently of the label: size must never be a cue. The weights below also set how often
each closed question is asked (`questions`), so that its answers come out balanced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from eyecare_edge.phantom.truth import (
    FUNDUS_CONDITIONS,
    OCT_CONDITIONS,
    QUADRANTS,
    FluidPocket,
    FundusTruth,
    Lesion,
    OctTruth,
    RpeBump,
)

FUNDUS_CONDITION_WEIGHTS = (0.33, 0.10, 0.20, 0.15, 0.22)
OCT_CONDITION_WEIGHTS = (0.40, 0.30, 0.30)

# Probability that an image of a DR condition gets hard exudates / cotton-wool spots.
EXUDATE_PROB = {"moderate_dr": 0.5, "severe_dr": 0.75}
COTTON_WOOL_PROB = {"moderate_dr": 0.35, "severe_dr": 0.7}
MODERATE_MAX_HAEMORRHAGES = 8

# Lesion centres stay inside this part of the field so they are inside the image at any size.
_FIELD_REACH = 0.82
_FIELD_BOX = 0.72


def _r(v: float) -> float:
    """Round truth values so that the recorded JSON is the truth itself."""
    return round(float(v), 4)


def choose(rng: np.random.Generator, items: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / sum(weights)
    return items[int(rng.choice(len(items), p=p))]


def sample_fundus_truth(rng: np.random.Generator, condition: str | None = None) -> FundusTruth:
    """Draw a random fundus ground truth (condition drawn from `FUNDUS_CONDITION_WEIGHTS` if None)."""
    if condition is None:
        condition = choose(rng, FUNDUS_CONDITIONS, FUNDUS_CONDITION_WEIGHTS)
    if condition not in FUNDUS_CONDITIONS:
        raise ValueError(f"unknown fundus condition {condition!r}; known: {', '.join(FUNDUS_CONDITIONS)}")
    eye = choose(rng, ("OD", "OS"))
    sign = 1.0 if eye == "OD" else -1.0
    base = FundusTruth(
        eye=eye,
        condition=condition,
        disc_x=_r(sign * rng.uniform(0.48, 0.58)),
        disc_y=_r(rng.uniform(-0.08, 0.04)),
        disc_radius=_r(rng.uniform(0.13, 0.16)),
        cup_ratio=_r(rng.uniform(0.3, 0.45)),
        macula_x=_r(-sign * rng.uniform(0.0, 0.08)),
        macula_y=_r(rng.uniform(0.0, 0.06)),
        macula_radius=_r(rng.uniform(0.11, 0.15)),
        field_scale=_r(rng.uniform(0.92, 1.28)),
        pigment=(_r(rng.uniform(0.88, 1.08)), _r(rng.uniform(0.75, 1.2)), _r(rng.uniform(0.7, 1.3))),
    )
    placed: list[Lesion] = []
    placer = _Placer(rng, base, placed)
    if condition in ("mild_dr", "moderate_dr", "severe_dr"):
        placer.add("microaneurysm", int(rng.integers(3, 11)), (0.006, 0.01), placer.anywhere)
    if condition == "moderate_dr":
        placer.add(
            "haemorrhage",
            int(rng.integers(3, MODERATE_MAX_HAEMORRHAGES + 1)),
            (0.03, 0.055),
            placer.anywhere,
            aspect=(0.5, 1.0),
            min_count=3,
        )
    if condition == "severe_dr":
        for q in QUADRANTS:
            placer.add(
                "haemorrhage",
                int(rng.integers(4, 8)),
                (0.03, 0.055),
                placer.in_quadrant(q),
                aspect=(0.5, 1.0),
                min_count=4,
            )
    if condition in EXUDATE_PROB and rng.random() < EXUDATE_PROB[condition]:
        for _ in range(int(rng.integers(2, 5))):
            placer.add_cluster(
                "hard_exudate", int(rng.integers(6, 15)), (0.013, 0.025), rng.uniform(0.055, 0.1)
            )
    if condition in COTTON_WOOL_PROB and rng.random() < COTTON_WOOL_PROB[condition]:
        placer.add(
            "cotton_wool_spot",
            int(rng.integers(2, 6)),
            (0.05, 0.08),
            placer.away_from_fovea(0.25),
            aspect=(0.6, 0.9),
            min_count=1,
        )
    if condition == "amd":
        placer.add(
            "drusen",
            int(rng.integers(12, 36)),
            (0.013, 0.028),
            placer.near_fovea(0.17),
            gap=0.004,
            min_count=8,
        )
    return replace(base, lesions=tuple(placed))


class _Placer:
    """Rejection sampling of non-overlapping lesions inside the visible field, off the optic disc."""

    def __init__(self, rng: np.random.Generator, truth: FundusTruth, placed: list[Lesion]):
        self.rng, self.truth, self.placed = rng, truth, placed

    def anywhere(self) -> tuple[float, float]:
        r = _FIELD_REACH * math.sqrt(self.rng.random())
        a = self.rng.uniform(0, 2 * math.pi)
        return r * math.cos(a), r * math.sin(a)

    def in_quadrant(self, q: str) -> Callable[[], tuple[float, float] | None]:
        t = self.truth

        def sample() -> tuple[float, float] | None:
            x, y = self.anywhere()
            # A margin off the quadrant borders: rounding can't move a lesion across, and eyes can tell.
            clear = min(abs(x - t.macula_x), abs(y - t.macula_y)) > 0.03
            return (x, y) if clear and t.quadrant(x, y) == q else None

        return sample

    def away_from_fovea(self, d: float) -> Callable[[], tuple[float, float] | None]:
        def sample() -> tuple[float, float] | None:
            x, y = self.anywhere()
            return (x, y) if math.hypot(x - self.truth.macula_x, y - self.truth.macula_y) > d else None

        return sample

    def near_fovea(self, sigma: float) -> Callable[[], tuple[float, float]]:
        t = self.truth
        return lambda: (t.macula_x + self.rng.normal(0, sigma), t.macula_y + self.rng.normal(0, sigma * 0.8))

    def fits(self, x: float, y: float, r: float, kind: str, gap: float, overlap_same: bool) -> bool:
        t = self.truth
        if math.hypot(x, y) > _FIELD_REACH or abs(x) > _FIELD_BOX or abs(y) > _FIELD_BOX:
            return False
        if math.hypot(x - t.disc_x, y - t.disc_y) < t.disc_radius * 1.15 + r:
            return False
        for p in self.placed:
            if overlap_same and p.kind == kind:
                continue
            if math.hypot(x - p.x, y - p.y) < p.radius + r + gap:
                return False
        return True

    def add(
        self,
        kind: str,
        n: int,
        radius: tuple[float, float],
        where: Callable[[], tuple[float, float] | None],
        *,
        aspect: tuple[float, float] = (1.0, 1.0),
        gap: float = 0.012,
        min_count: int = 0,
        overlap_same: bool = False,
    ) -> int:
        added = 0
        for _ in range(n * 150):
            if added == n:
                break
            r = self.rng.uniform(*radius)
            pos = where()
            if pos is None or not self.fits(pos[0], pos[1], r, kind, gap, overlap_same):
                continue
            self.placed.append(
                Lesion(
                    kind,
                    _r(pos[0]),
                    _r(pos[1]),
                    _r(r),
                    _r(self.rng.uniform(*aspect)),
                    _r(self.rng.uniform(0, 180)),
                )
            )
            added += 1
        if added < min_count:  # practically unreachable; a silent shortfall would corrupt labels
            raise RuntimeError(f"phantom sampler could place only {added} of {min_count} {kind} lesions")
        return added

    def add_cluster(self, kind: str, n: int, radius: tuple[float, float], spread: float) -> int:
        t = self.truth
        for _ in range(200):
            cx, cy = self.anywhere()
            d = math.hypot(cx - t.macula_x, cy - t.macula_y)
            if 0.28 < d < 0.7 and self.fits(cx, cy, spread, kind, 0.02, overlap_same=True):
                break
        else:
            return 0
        return self.add(
            kind,
            n,
            radius,
            lambda: (cx + self.rng.normal(0, spread / 2), cy + self.rng.normal(0, spread / 2)),
            gap=0.0,
            overlap_same=True,
        )


def sample_oct_truth(rng: np.random.Generator, condition: str | None = None) -> OctTruth:
    """Draw a random OCT ground truth (condition drawn from `OCT_CONDITION_WEIGHTS` if None)."""
    if condition is None:
        condition = choose(rng, OCT_CONDITIONS, OCT_CONDITION_WEIGHTS)
    if condition not in OCT_CONDITIONS:
        raise ValueError(f"unknown OCT condition {condition!r}; known: {', '.join(OCT_CONDITIONS)}")
    fovea_x = rng.uniform(0.38, 0.62)
    base = OctTruth(
        condition=condition,
        fovea_x=_r(fovea_x),
        rpe_depth=_r(rng.uniform(0.52, 0.64)),
        thickness=_r(rng.uniform(0.16, 0.21)),
        pit_depth=_r(rng.uniform(0.45, 0.65)),
        pit_width=_r(rng.uniform(0.06, 0.1)),
        curvature=_r(rng.uniform(0.0, 0.35)),
        tilt=_r(rng.uniform(-0.12, 0.12)),
        brightness=_r(rng.uniform(0.85, 1.1)),
    )
    fluid: list[FluidPocket] = []
    drusen: list[RpeBump] = []
    if condition == "fluid":
        specs = [(rng.uniform(-0.1, 0.1), rng.uniform(0.07, 0.13), rng.uniform(0.045, 0.075))]
        if rng.random() < 0.5:
            side = 1.0 if rng.random() < 0.5 else -1.0
            hw = rng.uniform(0.03, 0.05)
            specs.append(
                (
                    specs[0][0] + side * (specs[0][1] + hw + rng.uniform(0.03, 0.08)),
                    hw,
                    rng.uniform(0.025, 0.04),
                )
            )
        for dx, hw, hh in specs:
            px = fovea_x + dx
            py = float(base.rpe_y(px)) - 0.2 * float(base.base_thickness(px)) - hh
            fluid.append(FluidPocket(_r(px), _r(py), _r(hw), _r(hh)))
    if condition == "drusen":
        n = int(rng.integers(2, 6))
        for _ in range(200):
            if len(drusen) == n:
                break
            x = fovea_x + rng.uniform(-0.3, 0.3)
            hw = rng.uniform(0.025, 0.045)
            if all(abs(x - b.x) > 1.3 * (hw + b.half_width) for b in drusen):
                drusen.append(RpeBump(_r(x), _r(hw), _r(rng.uniform(0.035, 0.06))))
        drusen.sort(key=lambda b: b.x)
    return replace(base, fluid=tuple(fluid), drusen=tuple(drusen))


def sample_fundus_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): 400–1000 px wide, aspect 1:1 to 3:2, independent of the label."""
    w = int(rng.integers(200, 501)) * 2
    return w, round(w / rng.uniform(1.0, 1.5) / 2) * 2


def sample_oct_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): 300–800 px wide, aspect 1:1 to 2:1, independent of the label."""
    w = int(rng.integers(150, 401)) * 2
    return w, round(w / rng.uniform(1.0, 2.0) / 2) * 2
