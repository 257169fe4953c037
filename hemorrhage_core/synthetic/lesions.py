"""The five hemorrhage types as 3-D shapes in the head frame, drawn onto a rendered normal slice.

Each lesion has a vertical centre and half-extent: its cross-section shrinks towards its ends (an
ellipsoidal profile) and its density fades there (partial volume in a 5 mm slab), so it spans 2-5
consecutive slices. Shapes follow rsna-notes.md "The five types".
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hemorrhage_core.synthetic.anatomy import (
    AnatomySlice,
    HeadAnatomy,
    SliceGeometry,
    ventricles_present,
)

# Grey matter HU that a fading lesion tip mixes towards (partial volume with brain).
_MIX_HU = 40.0


@dataclass(frozen=True)
class Lesion(ABC):
    """Common part of every hemorrhage: vertical extent and blood density (acute: 50-90 HU)."""

    subtype: ClassVar[str] = ""
    h_center_mm: float
    h_half_mm: float
    blood_hu: float

    def z_factor(self, h_mm: float) -> float:
        """Squared radius factor of the cross-section at height ``h``: 1 at the centre, 0 beyond the ends."""
        u = (h_mm - self.h_center_mm) / self.h_half_mm
        return max(0.0, 1.0 - u * u)

    def density(self, h_mm: float) -> float:
        """Blood HU on this slice: lower towards the ends, where the slab holds part blood, part brain."""
        size = math.sqrt(self.z_factor(h_mm))
        return self.blood_hu - (1.0 - size) * 0.35 * (self.blood_hu - _MIX_HU)

    def extra_axial_mm(self, theta_table: np.ndarray, h_mm: float) -> np.ndarray | None:
        """Thickness (mm) of blood under the inner table at each angle of ``theta_table`` (EDH/SDH only)."""
        return None

    def midline_shift_mm(self, h_mm: float) -> float:
        """Signed midline shift this lesion causes (positive towards +x)."""
        return 0.0

    @abstractmethod
    def blood_mask(self, s: AnatomySlice) -> np.ndarray:
        """Pixels of the slice's head crop holding this lesion's blood (before the visibility threshold)."""

    def oedema(self, s: AnatomySlice, blood: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Mask and HU of the oedema around the blood, if this type has any."""
        return None


@dataclass(frozen=True)
class Epidural(Lesion):
    """Lentiform (biconvex) collection under the inner table, confined between two sutures."""

    subtype: ClassVar[str] = "epidural"
    side: int = 1
    theta_deg: float = 90.0
    half_angle_deg: float = 20.0
    thickness_mm: float = 10.0

    def extra_axial_mm(self, theta_table: np.ndarray, h_mm: float) -> np.ndarray | None:
        f = self.z_factor(h_mm)
        if f <= 0:
            return None
        r = math.sqrt(f)
        half = math.radians(self.half_angle_deg) * r**0.5
        # Angle from the anterior midline on the lesion's side (negative on the other side).
        u = (self.side * theta_table - math.radians(self.theta_deg)) / half
        # Convex inner margin with tapered ends where the dura stays stuck to the sutures.
        return (self.thickness_mm * r * np.clip(1.0 - u * u, 0.0, None) ** 0.75).astype(np.float32)

    def midline_shift_mm(self, h_mm: float) -> float:
        t = self.thickness_mm * math.sqrt(self.z_factor(h_mm))
        return -self.side * min(max(0.0, t - 7.0) * 0.5, 10.0)

    def blood_mask(self, s: AnatomySlice) -> np.ndarray:
        g = s.geometry
        t = self.extra_axial_mm(g.theta_table, g.h_mm)
        if t is None:
            return np.zeros_like(s.parenchyma)
        return (g.rho < g.r_inner) & (g.rho >= g.r_inner - t[g.angle_index]) & (t[g.angle_index] > 0)


@dataclass(frozen=True)
class Subdural(Epidural):
    """Crescent along the inner table, long, concave towards the brain; stops at the falx."""

    subtype: ClassVar[str] = "subdural"
    half_angle_deg: float = 50.0
    thickness_mm: float = 6.0

    def extra_axial_mm(self, theta_table: np.ndarray, h_mm: float) -> np.ndarray | None:
        f = self.z_factor(h_mm)
        if f <= 0:
            return None
        r = math.sqrt(f)
        half = math.radians(self.half_angle_deg) * r**0.3
        u = np.abs(self.side * theta_table - math.radians(self.theta_deg)) / half
        # Flat then tapering: follows the skull, so the inner margin is concave.
        return (self.thickness_mm * r**0.5 * np.clip(1.0 - u**3, 0.0, None) ** 0.6).astype(np.float32)


@dataclass(frozen=True)
class Subarachnoid(Lesion):
    """Blood replacing CSF in sulci (convexity), a Sylvian fissure, or the interhemispheric fissure."""

    subtype: ClassVar[str] = "subarachnoid"
    site: str = "convexity"  # convexity | sylvian | interhemispheric
    side: int = 1
    theta_deg: float = 90.0
    half_angle_deg: float = 25.0

    def blood_mask(self, s: AnatomySlice) -> np.ndarray:
        g = s.geometry
        f = self.z_factor(g.h_mm)
        if f <= 0:
            return np.zeros_like(s.parenchyma)
        r = math.sqrt(f)
        if self.site == "sylvian":
            mask = s.sylvian == self.side
            near = (
                (self.side * g.x > 0)
                & (g.rho > g.r_brain - 12.0)
                & (np.abs(g.theta * self.side - math.radians(75)) < 0.35)
            )
            return mask | ((s.sulci | s.surface_csf) & near)
        if self.site == "interhemispheric":
            front = g.y < 0 if self.theta_deg < 90 else g.y > 0
            return s.fissure & front & (g.rho > g.r_brain * (1.0 - 0.6 * r))
        half = math.radians(self.half_angle_deg) * r
        off = np.abs(self.side * g.theta - math.radians(self.theta_deg))
        return (s.sulci | s.surface_csf) & (off < half)


@dataclass(frozen=True)
class Intraparenchymal(Lesion):
    """Rounded, irregular clot in brain tissue, with a darker rim of oedema."""

    subtype: ClassVar[str] = "intraparenchymal"
    x_mm: float = 20.0
    y_mm: float = 0.0
    radius_mm: float = 10.0
    aspect: float = 0.8
    angle_deg: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()
    oedema_mm: float = 2.0
    oedema_hu: float = 16.0

    def midline_shift_mm(self, h_mm: float) -> float:
        r = self.radius_mm * math.sqrt(self.z_factor(h_mm))
        return -math.copysign(1.0, self.x_mm) * min(max(0.0, r - 12.0) * 0.6, 10.0)

    def _radius_norm(self, g: SliceGeometry) -> tuple[np.ndarray, float]:
        r = self.radius_mm * math.sqrt(self.z_factor(g.h_mm))
        a = math.radians(self.angle_deg)
        dx, dy = g.x - self.x_mm, g.y - self.y_mm
        u = (math.cos(a) * dx + math.sin(a) * dy) / max(r, 1e-3)
        v = (-math.sin(a) * dx + math.cos(a) * dy) / max(r * self.aspect, 1e-3)
        rn = np.hypot(u, v)
        if self.harmonics:
            phi = np.arctan2(v, u)
            wobble = np.ones_like(rn)
            for k, amp, ph in self.harmonics:
                wobble += amp * np.cos(k * phi + ph)
            rn = rn / wobble
        return rn, r

    def blood_mask(self, s: AnatomySlice) -> np.ndarray:
        if self.z_factor(s.geometry.h_mm) <= 0:
            return np.zeros_like(s.parenchyma)
        rn, _ = self._radius_norm(s.geometry)
        g = s.geometry
        return (rn < 1.0) & (g.rho < g.r_brain_eff) & ~s.ventricles

    def oedema(self, s: AnatomySlice, blood: np.ndarray) -> tuple[np.ndarray, float] | None:
        rn, r = self._radius_norm(s.geometry)
        return (rn < 1.0 + self.oedema_mm / max(r, 1e-3)) & s.parenchyma & ~blood, self.oedema_hu


@dataclass(frozen=True)
class Intraventricular(Lesion):
    """Blood in the ventricles: a fluid level in the dependent (posterior) part, or a cast."""

    subtype: ClassVar[str] = "intraventricular"
    side: int = 0  # -1 / +1 one lateral ventricle, 0 both (and the third ventricle)
    level_mm: float = 20.0  # fluid level, head-frame mm behind the head centre (horizontal in the scanner)
    cast: bool = False

    def blood_mask(self, s: AnatomySlice) -> np.ndarray:
        g = s.geometry
        if self.z_factor(g.h_mm) <= 0:
            return np.zeros_like(s.parenchyma)
        mask = s.ventricles if self.side == 0 else s.ventricles & (s.ventricle_side == self.side)
        if self.cast:
            return mask.copy()
        # Blood is heavier than CSF: in a supine patient it layers posteriorly, level with the floor.
        level = g.pose.shift_y_mm + g.pose.scale * self.level_mm
        return mask & (g.scanner_y > level)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _extent(
    rng: np.random.Generator, slice_h: tuple[float, ...], centre: int, span: tuple[int, int]
) -> tuple[float, float]:
    """Vertical centre and half-extent so the lesion covers ``n`` consecutive slices around ``centre``."""
    dz = slice_h[1] - slice_h[0] if len(slice_h) > 1 else 5.0
    n = int(rng.integers(span[0], span[1] + 1))
    h_c = slice_h[centre]
    if n % 2 == 0:
        h_c += dz / 2 * (1 if rng.random() < 0.5 else -1)
    h_c += rng.uniform(-0.12, 0.12) * dz
    return h_c, n / 2 * dz * float(rng.uniform(0.92, 1.0))


def feasible(subtype: str, anatomy: HeadAnatomy, h_mm: float) -> bool:
    """Whether a lesion of ``subtype`` can be centred on a slice at height ``h``."""
    if subtype == "intraventricular":
        return ventricles_present(anatomy, h_mm)
    return True


def sample_lesion(
    subtype: str,
    rng: np.random.Generator,
    anatomy: HeadAnatomy,
    slice_h: tuple[float, ...],
    span: tuple[int, int] = (2, 5),
    centre: int | None = None,
) -> Lesion | None:
    """Draw one lesion of ``subtype`` placed on the slab ``slice_h``; None when it cannot fit there."""
    candidates = [i for i, h in enumerate(slice_h) if feasible(subtype, anatomy, h)]
    if not candidates:
        return None
    if centre is None or centre not in candidates:
        centre = int(rng.choice(candidates))
    h_c, h_half = _extent(rng, slice_h, centre, span)
    side = 1 if rng.random() < 0.5 else -1
    if subtype == "epidural":
        # Between two sutures: frontal, parietal/temporal or occipital bone.
        bounds = (
            (8.0, anatomy.coronal_deg),
            (anatomy.coronal_deg, anatomy.lambdoid_deg),
            (anatomy.lambdoid_deg, 172.0),
        )
        lo, hi = bounds[int(rng.choice(3, p=[0.3, 0.5, 0.2]))]
        lo, hi = lo + 3.0, hi - 3.0
        half = float(rng.uniform(10.0, max(10.5, min(30.0, (hi - lo) / 2))))
        half = min(half, (hi - lo) / 2)
        theta = float(rng.uniform(lo + half, hi - half)) if hi - lo > 2 * half else (lo + hi) / 2
        # A lens is longer than it is thick: cap the thickness by the arc it spans under the skull.
        arc_half_mm = math.radians(half) * 0.85 * min(anatomy.half_width_mm, anatomy.half_length_mm)
        thickness = min(_log_uniform(rng, 4.0, 26.0), 0.6 * arc_half_mm)
        return Epidural(
            h_center_mm=h_c,
            h_half_mm=h_half,
            blood_hu=float(rng.uniform(60.0, 90.0)),
            side=side,
            theta_deg=theta,
            half_angle_deg=half,
            thickness_mm=thickness,
        )
    if subtype == "subdural":
        thin = rng.random() < 0.4
        thickness = float(rng.uniform(2.0, 4.0)) if thin else _log_uniform(rng, 4.0, 18.0)
        blood = float(rng.uniform(50.0, 65.0)) if thin else float(rng.uniform(55.0, 85.0))
        # A crescent: the thicker it is, the longer it runs along the skull.
        half = min(float(rng.uniform(25.0, 45.0)) + 2.5 * thickness, 80.0)
        theta = float(rng.uniform(max(35.0, 4.0 + half), min(145.0, 176.0 - half))) if half < 70.0 else 90.0
        return Subdural(
            h_center_mm=h_c,
            h_half_mm=h_half,
            blood_hu=blood,
            side=side,
            theta_deg=theta,
            half_angle_deg=half,
            thickness_mm=thickness,
        )
    if subtype == "subarachnoid":
        site = str(rng.choice(["convexity", "sylvian", "interhemispheric"], p=[0.55, 0.25, 0.2]))
        if site == "sylvian" and slice_h[centre] > 0.0:
            site = "convexity"
        theta = float(rng.uniform(20.0, 160.0)) if site == "convexity" else float(rng.choice([30.0, 150.0]))
        # Blood mixed with CSF in thin spaces: a little less dense than a clot.
        return Subarachnoid(
            h_center_mm=h_c,
            h_half_mm=h_half,
            blood_hu=float(rng.uniform(55.0, 80.0)),
            site=site,
            side=side,
            theta_deg=theta,
            half_angle_deg=float(rng.uniform(15.0, 40.0)),
        )
    if subtype == "intraparenchymal":
        radius = _log_uniform(rng, 3.0, 22.0)
        deep = slice_h[centre] < -4.0 and rng.random() < 0.5
        if deep:  # hypertensive bleeds: putamen or thalamus
            x, y = (side * 22.0, -3.0) if rng.random() < 0.6 else (side * 11.0, 11.0)
            radius = min(radius, 16.0)
        else:  # lobar, in the white matter below the cortex
            ang = float(rng.uniform(0.2, math.pi - 0.2)) * side
            dist = float(rng.uniform(0.3, 0.75)) * (
                min(anatomy.half_width_mm, anatomy.half_length_mm) - radius - 8.0
            )
            dist = max(dist, 0.0) + radius * 0.2
            x, y = dist * math.sin(ang), -dist * math.cos(ang)
        harmonics = tuple(
            (k, float(rng.normal(0.0, 0.06)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 5)
        )
        return Intraparenchymal(
            h_center_mm=h_c,
            h_half_mm=h_half,
            blood_hu=float(rng.uniform(55.0, 90.0)),
            x_mm=x,
            y_mm=y,
            radius_mm=radius,
            aspect=float(rng.uniform(0.6, 1.0)),
            angle_deg=float(rng.uniform(0, 180.0)),
            harmonics=harmonics,
            oedema_mm=float(rng.uniform(0.5, 5.0)),
            oedema_hu=float(anatomy.tissue.white - rng.uniform(6.0, 12.0)),
        )
    if subtype == "intraventricular":
        return Intraventricular(
            h_center_mm=h_c,
            h_half_mm=h_half,
            blood_hu=float(rng.uniform(55.0, 85.0)),
            side=int(rng.choice([-1, 0, 1])),
            level_mm=float(rng.uniform(8.0, 26.0)),
            cast=bool(rng.random() < 0.25),
        )
    raise ValueError(f"unknown hemorrhage subtype {subtype!r}")
