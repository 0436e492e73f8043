"""Phantom ground truth: what one fundus or OCT phantom shows, and its JSON record.

The image is a pure function of a truth, a size and a seed (see `drawing`); every label and answer
is derived from the truth (see `questions`, `reports`), so labels are exact by construction.

Coordinates. Fundus truth is in *field units*: origin at the centre of the round camera field, unit =
field radius, x to the right, y down; `drawing.fundus_geometry` maps it to pixels for a given size, so
one truth can be drawn at any size. OCT truth is in fractions of the image width (x) and height (y).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FUNDUS_CONDITIONS = ("normal", "mild_dr", "moderate_dr", "severe_dr", "amd")
OCT_CONDITIONS = ("normal", "fluid", "drusen")

LESION_KINDS = ("haemorrhage", "microaneurysm", "hard_exudate", "cotton_wool_spot", "drusen")
QUADRANTS = ("superotemporal", "superonasal", "inferotemporal", "inferonasal")
DR_GRADE_NAMES = {
    0: "no diabetic retinopathy",
    1: "mild non-proliferative diabetic retinopathy",
    2: "moderate non-proliferative diabetic retinopathy",
    3: "severe non-proliferative diabetic retinopathy",
}
# Haemorrhages needed in *every* quadrant for grade 3: the phantom's stand-in for the ICDR 4-2-1 rule.
SEVERE_HAEMORRHAGES_PER_QUADRANT = 4


@dataclass(frozen=True)
class Lesion:
    """One fundus lesion, an ellipse in field units (radius = semi-major axis, angle in degrees)."""

    kind: str
    x: float
    y: float
    radius: float
    aspect: float = 1.0
    angle: float = 0.0


@dataclass(frozen=True)
class FundusTruth:
    """Everything a fundus phantom shows; the image is a pure function of this, a size and a seed."""

    eye: str  # "OD" (right) | "OS" (left); the disc is on the image's right for OD, left for OS
    condition: str  # one of FUNDUS_CONDITIONS
    disc_x: float
    disc_y: float
    disc_radius: float
    cup_ratio: float
    macula_x: float
    macula_y: float
    macula_radius: float
    field_scale: float  # field radius / half of the image's shorter side
    pigment: tuple[float, float, float]  # RGB multipliers of the background colour
    lesions: tuple[Lesion, ...] = ()

    @property
    def modality(self) -> str:
        return "fundus"

    @property
    def disc_side(self) -> str:
        return "right" if self.disc_x > 0 else "left"

    @property
    def dr_grade(self) -> int:
        return derive_dr_grade(self)

    def has(self, kind: str) -> bool:
        return any(les.kind == kind for les in self.lesions)

    def count(self, kind: str) -> int:
        return sum(les.kind == kind for les in self.lesions)

    def quadrant(self, x: float, y: float) -> str:
        """Quadrant around the fovea; nasal is the disc's side."""
        vertical = "supero" if y < self.macula_y else "infero"
        nasal = (x - self.macula_x) * self.disc_x > 0
        return vertical + ("nasal" if nasal else "temporal")

    def quadrant_counts(self, kind: str) -> dict[str, int]:
        counts = dict.fromkeys(QUADRANTS, 0)
        for les in self.lesions:
            if les.kind == kind:
                counts[self.quadrant(les.x, les.y)] += 1
        return counts


def derive_dr_grade(truth: FundusTruth) -> int:
    """ICDR-like grade from the lesions: 3 severe NPDR, 2 moderate, 1 mild, 0 none.

    Severe = at least `SEVERE_HAEMORRHAGES_PER_QUADRANT` haemorrhages in each of the four quadrants
    (a scaled stand-in for the 4-2-1 rule); moderate = any haemorrhage, hard exudate or cotton-wool
    spot; mild = microaneurysms only. Proliferative DR is not modelled (no new vessels are drawn).
    """
    if min(truth.quadrant_counts("haemorrhage").values()) >= SEVERE_HAEMORRHAGES_PER_QUADRANT:
        return 3
    if any(truth.has(k) for k in ("haemorrhage", "hard_exudate", "cotton_wool_spot")):
        return 2
    return 1 if truth.has("microaneurysm") else 0


@dataclass(frozen=True)
class FluidPocket:
    """A hyporeflective fluid space: an ellipse, centre and half-axes in fractions of W and H."""

    x: float
    y: float
    half_width: float
    half_height: float


@dataclass(frozen=True)
class RpeBump:
    """A druse: a Gaussian elevation of the RPE; x and half-width in fractions of W, height of H."""

    x: float
    half_width: float
    height: float


@dataclass(frozen=True)
class OctTruth:
    """Everything an OCT phantom shows. Layer boundaries are the methods below, in fractions."""

    condition: str  # one of OCT_CONDITIONS
    fovea_x: float
    rpe_depth: float  # Bruch's membrane depth at the fovea
    thickness: float  # retinal thickness (ILM to RPE) away from the fovea
    pit_depth: float  # fraction of the thickness missing at the foveal pit
    pit_width: float
    curvature: float  # how much the edges rise (fraction of H at unit distance from the fovea)
    tilt: float
    brightness: float
    fluid: tuple[FluidPocket, ...] = ()
    drusen: tuple[RpeBump, ...] = ()

    @property
    def modality(self) -> str:
        return "oct"

    def bruch_y(self, x: np.ndarray | float) -> np.ndarray | float:
        dx = np.asarray(x, dtype=np.float64) - self.fovea_x
        return self.rpe_depth - self.curvature * dx * dx + self.tilt * dx

    def rpe_y(self, x: np.ndarray | float) -> np.ndarray | float:
        y = self.bruch_y(x)
        for b in self.drusen:
            y = y - b.height * np.exp(-(((np.asarray(x) - b.x) / b.half_width) ** 2))
        return y

    def base_thickness(self, x: np.ndarray | float) -> np.ndarray | float:
        pit = np.exp(-(((np.asarray(x) - self.fovea_x) / self.pit_width) ** 2))
        return self.thickness * (1.0 - self.pit_depth * pit)

    def ilm_y(self, x: np.ndarray | float) -> np.ndarray | float:
        y = self.rpe_y(x) - self.base_thickness(x)
        for p in self.fluid:
            y = y - _fluid_lift(p) * np.exp(-(((np.asarray(x) - p.x) / (1.25 * p.half_width)) ** 2))
        return y


def _fluid_lift(p: FluidPocket) -> float:
    """How far a pocket lifts the ILM above it (fractions of H): the retina swells, not thins."""
    return 2.2 * p.half_height


def truth_record(truth: FundusTruth | OctTruth) -> dict[str, Any]:
    """The truth as JSON-ready data, with the derived labels spelled out."""
    out = asdict(truth)
    out["modality"] = truth.modality
    if isinstance(truth, FundusTruth):
        out["disc_side"] = truth.disc_side
        out["dr_grade"] = truth.dr_grade
        out["dr_grade_name"] = DR_GRADE_NAMES[truth.dr_grade]
        out["lesion_counts"] = {k: truth.count(k) for k in LESION_KINDS}
        out["haemorrhage_quadrants"] = truth.quadrant_counts("haemorrhage")
    return out


def truth_from_record(record: dict[str, Any]) -> FundusTruth | OctTruth:
    """Rebuild a truth from `truth_record` output (a truth.jsonl line's "truth"); derived keys are ignored."""
    if record.get("modality") == "fundus":
        names = FundusTruth.__dataclass_fields__
        fields = {k: v for k, v in record.items() if k in names}
        fields["pigment"] = tuple(fields["pigment"])
        fields["lesions"] = tuple(Lesion(**les) for les in record["lesions"])
        return FundusTruth(**fields)
    if record.get("modality") == "oct":
        names = OctTruth.__dataclass_fields__
        fields = {k: v for k, v in record.items() if k in names}
        fields["fluid"] = tuple(FluidPocket(**f) for f in record["fluid"])
        fields["drusen"] = tuple(RpeBump(**b) for b in record["drusen"])
        return OctTruth(**fields)
    raise ValueError(f"truth record has no known modality (fundus | oct): {record.get('modality')!r}")
