"""The normal head of the phantom: per-patient anatomy, pose, and one rendered axial slice.

Everything is analytic in a head frame (mm): ``x`` to the patient's left (image right), ``y`` posterior
(image down), ``h`` upward from the widest axial level of the cranial vault. A pose (rotation, shift,
scale) maps that frame onto the scanner's pixel grid, so every slice is a few vectorised numpy passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft

# Angular resolution of the per-slice outline tables (radius as a function of angle).
ANGLE_BINS = 2048
# Field of view of a 512-pixel slice; other sizes keep the FOV, so the head fills the same fraction.
FOV_MM = 250.0
# Heights (mm) the slab of slices may cover: from the third-ventricle level to high convexity.
SLAB_LOW_MM = -30.0
SLAB_HIGH_MM = 58.0


class Tissue(IntEnum):
    """Tissue codes of the noiseless label map returned with every rendered slice."""

    AIR = 0
    SCALP = 1
    FAT = 2
    BONE = 3
    CSF = 4
    GREY = 5
    WHITE = 6
    DEEP_GREY = 7
    FALX = 8
    CALCIFICATION = 9
    BLOOD = 10
    OEDEMA = 11


@dataclass(frozen=True)
class Pose:
    """In-plane head pose in the scanner: rotation (deg), shift of the head centre (mm), size scale."""

    rotation_deg: float = 0.0
    shift_x_mm: float = 0.0
    shift_y_mm: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class TissueHU:
    """Mean HU of each tissue for one patient (scanner calibration and age vary them a little)."""

    grey: float = 40.0
    white: float = 26.0
    deep_grey: float = 37.0
    csf: float = 7.0
    scalp: float = 45.0
    fat: float = -90.0
    table: float = 1600.0
    diploe: float = 850.0
    suture: float = 250.0
    falx: float = 75.0
    calcification: float = 250.0


@dataclass(frozen=True)
class HeadAnatomy:
    """Shape and tissue parameters of one patient's head. Lengths are head-frame mm at scale 1."""

    half_width_mm: float = 68.0  # inner skull, left-right, at the widest level
    half_length_mm: float = 84.0  # inner skull, antero-posterior
    vault_height_mm: float = 78.0  # vertical semi-axis of the vault above the widest level
    egg: float = 0.03  # occiput longer than the forehead
    outline_harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, relative amplitude, phase)
    skull_mm: float = 6.5
    diploe_fraction: float = 0.45
    scalp_mm: float = 5.0
    fat_fraction: float = 0.35  # share of the scalp that is subcutaneous fat
    temporalis_mm: float = 6.0  # extra soft tissue over the temples at low levels
    csf_gap_mm: float = 1.6  # subarachnoid space over the convexity
    cortex_mm: float = 2.8
    atrophy: float = 0.2  # 0 young .. 1 old: widens sulci, fissures and ventricles
    ventricle_scale: float = 1.0
    gyral_seed: int = 0  # seeds the random field whose zero lines are the sulci
    gyral_wavelength_mm: float = 30.0  # field period along the surface: two sulci per period
    sulcus_depth_mm: float = 11.0
    sulcus_depth_terms: tuple[tuple[int, float, float], ...] = ()  # depth varies around the brain
    coronal_deg: float = 62.0  # suture angles from the anterior midline
    lambdoid_deg: float = 132.0
    choroid_calcified: bool = True
    pineal_calcified: bool = True
    tissue: TissueHU = field(default_factory=TissueHU)
    noise_sd_hu: float = 7.0
    blur_mm: float = 0.3  # partial-volume blur, also the correlation length of the noise

    @property
    def widest_mm(self) -> float:
        return max(self.half_width_mm, self.half_length_mm)


def _fourier(theta: np.ndarray, terms: tuple[tuple[int, float, float], ...]) -> np.ndarray:
    out = np.zeros_like(theta)
    for order, amp, phase in terms:
        out += amp * np.cos(order * theta + phase)
    return out


def sample_anatomy(rng: np.random.Generator) -> HeadAnatomy:
    """Draw one patient's anatomy: a plausible adult head, different for every draw."""
    atrophy = float(rng.beta(1.6, 3.0))
    tissue = TissueHU(
        grey=float(rng.uniform(36.0, 42.0)),
        white=float(rng.uniform(24.0, 29.0)),
        deep_grey=float(rng.uniform(34.0, 39.0)),
        csf=float(rng.uniform(3.0, 12.0)),
        scalp=float(rng.uniform(35.0, 55.0)),
        fat=float(rng.uniform(-100.0, -60.0)),
        table=float(rng.uniform(1350.0, 1800.0)),
        diploe=float(rng.uniform(760.0, 1050.0)),
        suture=float(rng.uniform(150.0, 400.0)),
        falx=float(rng.uniform(55.0, 85.0)),
        calcification=float(rng.uniform(150.0, 450.0)),
    )
    return HeadAnatomy(
        half_width_mm=float(rng.uniform(64.0, 72.0)),
        half_length_mm=float(rng.uniform(80.0, 90.0)),
        vault_height_mm=float(rng.uniform(72.0, 84.0)),
        egg=float(rng.uniform(0.0, 0.06)),
        outline_harmonics=tuple(
            (k, float(rng.normal(0.0, 0.012 / k**0.5)), float(rng.uniform(0, 2 * math.pi)))
            for k in range(2, 7)
        ),
        skull_mm=float(rng.uniform(5.0, 8.0)),
        diploe_fraction=float(rng.uniform(0.3, 0.55)),
        scalp_mm=float(rng.uniform(4.0, 7.0)),
        fat_fraction=float(rng.uniform(0.15, 0.35)),
        temporalis_mm=float(rng.uniform(3.0, 9.0)),
        csf_gap_mm=float(0.8 + 2.2 * atrophy + rng.uniform(0.0, 0.6)),
        cortex_mm=float(rng.uniform(2.4, 3.2)),
        atrophy=atrophy,
        ventricle_scale=float(rng.uniform(0.8, 1.05) + 0.5 * atrophy),
        gyral_seed=int(rng.integers(0, 2**31 - 1)),
        gyral_wavelength_mm=float(rng.uniform(26.0, 34.0)),
        sulcus_depth_mm=float(rng.uniform(9.0, 13.0)),
        sulcus_depth_terms=tuple(
            (k, float(rng.normal(0.0, 0.25)), float(rng.uniform(0, 2 * math.pi))) for k in range(2, 16)
        ),
        coronal_deg=float(rng.uniform(55.0, 68.0)),
        lambdoid_deg=float(rng.uniform(124.0, 140.0)),
        choroid_calcified=bool(rng.random() < 0.6),
        pineal_calcified=bool(rng.random() < 0.5),
        tissue=tissue,
        noise_sd_hu=float(rng.uniform(4.5, 7.0)),
        blur_mm=float(rng.uniform(0.22, 0.38)),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """Random head pose: rotation +-15 deg, shift up to ~12 mm, scale 0.85-1.1."""
    return Pose(
        rotation_deg=float(rng.uniform(-15.0, 15.0)),
        shift_x_mm=float(rng.uniform(-12.0, 12.0)),
        shift_y_mm=float(rng.uniform(-12.0, 10.0)),
        scale=float(rng.uniform(0.85, 1.1)),
    )


def vault_section(anatomy: HeadAnatomy, h_mm: float) -> float:
    """Radius factor of the inner skull at height ``h`` (1 at the widest level)."""
    if h_mm >= 0:
        u = h_mm / anatomy.vault_height_mm
    else:
        u = h_mm / (1.7 * anatomy.vault_height_mm)  # the skull narrows slowly towards the base
    return math.sqrt(max(1.0 - u * u, 0.04))


def _bump(h: float, low: float, high: float) -> float:
    """Smooth 0..1 profile over [low, high], 1 in the middle: how present a structure is at height h."""
    if h <= low or h >= high:
        return 0.0
    u = (h - low) / (high - low)
    return math.sin(math.pi * u) ** 0.5


@dataclass
class Deformation:
    """Mass effect of the lesions on one slice: extra-axial thickness by angle, and midline shift."""

    extra_axial_mm: np.ndarray | None = None  # (ANGLE_BINS,) thickness of EDH/SDH at each angle
    midline_shift_mm: float = 0.0  # signed along x; positive pushes midline structures to +x


@dataclass
class SliceGeometry:
    """Head-frame coordinates of the pixels of one slice, on the crop of the image holding the head.

    Arrays are ``(rows.stop - rows.start, cols.stop - cols.start)``; ``embed`` puts one back into the
    full ``size`` x ``size`` image.
    """

    size: int
    pixel_mm: float
    h_mm: float
    rows: slice
    cols: slice
    x: np.ndarray  # head frame, mm
    y: np.ndarray
    rho: np.ndarray
    theta: np.ndarray  # 0 anterior, +pi/2 towards +x (patient left)
    angle_index: np.ndarray
    scanner_y: np.ndarray  # mm, posterior in the scanner: gravity's direction for a supine patient
    theta_table: np.ndarray
    r_inner_table: np.ndarray  # inner table of the skull, by angle
    r_brain_table: np.ndarray  # undeformed brain surface
    r_brain_eff_table: np.ndarray  # brain surface after extra-axial compression
    r_inner: np.ndarray  # per pixel
    r_brain: np.ndarray
    r_brain_eff: np.ndarray
    pose: Pose

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape

    def embed(self, crop: np.ndarray, fill) -> np.ndarray:
        """Place a crop-sized array into a full image filled with ``fill``."""
        out = np.full((self.size, self.size), fill, dtype=crop.dtype)
        out[self.rows, self.cols] = crop
        return out

    def box(self, half_x: float, half_y: float, centre_y: float = 0.0) -> tuple[slice, slice]:
        """Crop-relative pixel box covering the head-frame rectangle |x| < half_x, |y - centre_y| < half_y."""
        p = self.pose
        rot = math.radians(p.rotation_deg)
        cos, sin = math.cos(rot), math.sin(rot)
        cols, rows = [], []
        for hx in (-half_x, half_x):
            for hy in (centre_y - half_y, centre_y + half_y):
                sx = p.shift_x_mm + p.scale * (cos * hx - sin * hy)
                sy = p.shift_y_mm + p.scale * (sin * hx + cos * hy)
                cols.append(sx / self.pixel_mm + (self.size - 1) / 2.0 - self.cols.start)
                rows.append(sy / self.pixel_mm + (self.size - 1) / 2.0 - self.rows.start)
        h, w = self.shape
        r0, r1 = max(0, int(min(rows)) - 1), min(h, int(math.ceil(max(rows))) + 2)
        c0, c1 = max(0, int(min(cols)) - 1), min(w, int(math.ceil(max(cols))) + 2)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def outline_tables(anatomy: HeadAnatomy, h_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Angle table and inner-table radius (mm) by angle at height ``h``."""
    theta = (np.linspace(-math.pi, math.pi, ANGLE_BINS, endpoint=False) + math.pi / ANGLE_BINS).astype(
        np.float32
    )
    a, b = anatomy.half_width_mm, anatomy.half_length_mm
    ellipse = 1.0 / np.sqrt((np.sin(theta) / a) ** 2 + (np.cos(theta) / b) ** 2)
    shape = (1.0 - anatomy.egg * np.cos(theta)) * (1.0 + _fourier(theta, anatomy.outline_harmonics))
    shape *= 1.0 - 0.035 * np.clip(np.cos(theta), 0, None) ** 6  # the frontal bone is flatter
    return theta, (vault_section(anatomy, h_mm) * ellipse * shape).astype(np.float32)


def _oblique(anatomy: HeadAnatomy, h_mm: float) -> float:
    """1 / cos(tilt of the skull surface): obliquely cut bone and scalp look thicker near the vertex."""
    slope = (vault_section(anatomy, h_mm + 0.5) - vault_section(anatomy, h_mm - 0.5)) * anatomy.widest_mm
    return math.sqrt(1.0 + slope * slope)


def slice_geometry(
    anatomy: HeadAnatomy, pose: Pose, h_mm: float, size: int, deformation: Deformation | None = None
) -> SliceGeometry:
    """Pixel grid -> head frame on the crop that holds the head, and the outlines at height ``h``."""
    pixel_mm = FOV_MM / size
    theta_table, r_inner_table = outline_tables(anatomy, h_mm)
    reach = float(r_inner_table.max()) + (anatomy.skull_mm + anatomy.scalp_mm) * _oblique(anatomy, h_mm)
    reach = (reach + anatomy.temporalis_mm + 2.0) * pose.scale / pixel_mm
    centre_c = pose.shift_x_mm / pixel_mm + (size - 1) / 2.0
    centre_r = pose.shift_y_mm / pixel_mm + (size - 1) / 2.0
    rows = slice(max(0, int(centre_r - reach)), min(size, int(math.ceil(centre_r + reach)) + 1))
    cols = slice(max(0, int(centre_c - reach)), min(size, int(math.ceil(centre_c + reach)) + 1))

    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(pixel_mm)
    sx = coords[None, cols] - np.float32(pose.shift_x_mm)
    sy = coords[rows, None] - np.float32(pose.shift_y_mm)
    rot = math.radians(pose.rotation_deg)
    c, s = np.float32(math.cos(rot) / pose.scale), np.float32(math.sin(rot) / pose.scale)
    x = c * sx + s * sy
    y = -s * sx + c * sy
    rho = np.hypot(x, y)
    theta = np.arctan2(x, -y)
    idx = ((theta + np.float32(math.pi)) * np.float32(ANGLE_BINS / (2 * math.pi))).astype(np.intp)
    np.minimum(idx, ANGLE_BINS - 1, out=idx)

    r_brain_table = (r_inner_table - anatomy.csf_gap_mm).astype(np.float32)
    r_brain_eff_table = r_brain_table
    if deformation is not None and deformation.extra_axial_mm is not None:
        r_brain_eff_table = np.minimum(r_brain_table, r_inner_table - deformation.extra_axial_mm).astype(
            np.float32
        )
    return SliceGeometry(
        size=size,
        pixel_mm=pixel_mm,
        h_mm=h_mm,
        rows=rows,
        cols=cols,
        x=x,
        y=y,
        rho=rho,
        theta=theta,
        angle_index=idx,
        scanner_y=np.broadcast_to(coords[rows, None], x.shape),
        theta_table=theta_table,
        r_inner_table=r_inner_table,
        r_brain_table=r_brain_table,
        r_brain_eff_table=r_brain_eff_table,
        r_inner=r_inner_table[idx],
        r_brain=r_brain_table[idx],
        r_brain_eff=r_brain_eff_table[idx],
        pose=pose,
    )


@dataclass
class AnatomySlice:
    """A noiseless normal slice on the head crop: HU, tissue map, and the spaces lesions fill."""

    hu: np.ndarray  # float32, noiseless
    tissue: np.ndarray  # uint8 Tissue codes
    geometry: SliceGeometry
    parenchyma: np.ndarray  # brain tissue (not CSF)
    ventricles: np.ndarray
    ventricle_side: np.ndarray  # int8: -1 / +1 lateral ventricle side, 0 midline (third ventricle)
    sulci: np.ndarray  # CSF in convexity sulci
    surface_csf: np.ndarray  # subarachnoid space between brain and skull
    sylvian: np.ndarray  # int8: -1 / +1 Sylvian fissure side, 0 none
    fissure: np.ndarray  # interhemispheric fissure CSF


def _band_y(x, y, ys, xs, half_widths) -> np.ndarray:
    """Pixels within a tapered band whose centre line runs along y (x = f(y)): ventricles, fissures."""
    ys = np.asarray(ys, dtype=np.float32)
    inside = (y > ys[0]) & (y < ys[-1])
    centre = np.interp(y, ys, np.asarray(xs, dtype=np.float32))
    half = np.interp(y, ys, np.asarray(half_widths, dtype=np.float32))
    return inside & (np.abs(x - centre) < half)


def _rounded(n: int, peak: float, start: float = 0.0, end: float = 0.0, power: float = 0.5) -> np.ndarray:
    """Half-width profile over n control points with rounded ends (``start``/``end`` at the tips)."""
    u = np.linspace(-1.0, 1.0, n)
    prof = peak * np.clip(1.0 - u * u, 0.0, None) ** power
    prof[0], prof[-1] = start, end
    return prof


def _ellipse(x, y, cx, cy, ax, ay, angle_deg=0.0) -> np.ndarray:
    t = math.radians(angle_deg)
    dx, dy = x - cx, y - cy
    u = (math.cos(t) * dx + math.sin(t) * dy) / max(ax, 1e-3)
    v = (-math.sin(t) * dx + math.cos(t) * dy) / max(ay, 1e-3)
    return u * u + v * v < 1.0


# The gyral field lives on an unrolled shell: angle x depth below the surface x height.
_GYRAL_BINS, _GYRAL_DEPTH_MM, _GYRAL_H0_MM, _GYRAL_DH_MM, _GYRAL_PLANES = 512, 32, -45.0, 5.0, 24
_GYRAL_RADIUS_MM = 70.0  # reference radius converting angle bins to mm along the surface


@lru_cache(maxsize=8)
def _gyral_field(seed: int, wavelength_mm: float) -> np.ndarray:
    """Band-limited random field (height, depth, angle) whose zero lines look like sulci.

    Its spectrum peaks at ``wavelength_mm`` along the surface and is narrow across depth, so the zero
    lines run mostly radially, bend, branch and vary in spacing like gyri; it varies slowly with height,
    so adjacent slices show the same sulci.
    """
    rng = np.random.default_rng(seed)
    shape = (_GYRAL_PLANES, _GYRAL_DEPTH_MM, _GYRAL_BINS)
    arc_mm = 2 * math.pi * _GYRAL_RADIUS_MM / _GYRAL_BINS
    k_h = np.fft.fftfreq(shape[0], _GYRAL_DH_MM).astype(np.float32)[:, None, None]
    k_d = np.fft.fftfreq(shape[1], 1.0).astype(np.float32)[None, :, None]
    k_s = np.fft.rfftfreq(shape[2], arc_mm).astype(np.float32)[None, None, :]
    k0 = 1.0 / wavelength_mm
    spectrum = (
        np.exp(-(((k_s - k0) / (0.45 * k0)) ** 2))
        * np.exp(-((k_d / (1.2 * k0)) ** 2))
        * np.exp(-((k_h / (0.6 * k0)) ** 2))
    )
    white = sp_fft.rfftn(rng.standard_normal(shape, dtype=np.float32), axes=(0, 1, 2))
    return sp_fft.irfftn(white * spectrum, s=shape, axes=(0, 1, 2)).astype(np.float32)


def _sulcus_distance(anatomy: HeadAnatomy, h_mm: float) -> np.ndarray:
    """Distance (mm) to the nearest sulcus centre line on a (depth, angle) grid at half-mm / half-bin steps."""
    field = _gyral_field(anatomy.gyral_seed, anatomy.gyral_wavelength_mm)
    u = float(np.clip((h_mm - _GYRAL_H0_MM) / _GYRAL_DH_MM, 0, _GYRAL_PLANES - 1.001))
    i = int(u)
    plane = field[i] * np.float32(1 - (u - i)) + field[i + 1] * np.float32(u - i)
    arc_mm = 2 * math.pi * _GYRAL_RADIUS_MM / _GYRAL_BINS
    g_d, g_s = np.gradient(plane, 1.0, arc_mm)
    dist = np.abs(plane) / np.sqrt(g_d * g_d + g_s * g_s + np.float32(1e-12))
    # Half-step grid (linear midpoints; periodic in angle), so the nearest-neighbour lookup per pixel
    # stays smooth at 0.5 mm pixels.
    rows = np.empty((2 * dist.shape[0] - 1, dist.shape[1]), dtype=np.float32)
    rows[0::2] = dist
    rows[1::2] = (dist[:-1] + dist[1:]) * np.float32(0.5)
    out = np.empty((rows.shape[0], 2 * rows.shape[1]), dtype=np.float32)
    out[:, 0::2] = rows
    out[:, 1::2] = (rows + np.roll(rows, -1, axis=1)) * np.float32(0.5)
    return out


def render_anatomy(
    anatomy: HeadAnatomy, pose: Pose, h_mm: float, size: int, deformation: Deformation | None = None
) -> AnatomySlice:
    """Render the noiseless normal head at height ``h`` (mm), with the lesions' mass effect applied."""
    deformation = deformation or Deformation()
    g = slice_geometry(anatomy, pose, h_mm, size, deformation)
    t = anatomy.tissue
    shape = g.shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)

    oblique = _oblique(anatomy, h_mm)
    temple = np.clip(np.abs(np.sin(g.theta)) - 0.7, 0, None) / 0.3 * _bump(h_mm, -60.0, 25.0)
    r_outer = g.r_inner + np.float32(anatomy.skull_mm * oblique)
    # Scalp layers from the bone out: galea (and temporalis muscle over the temples), fat, skin.
    r_muscle = r_outer + np.float32(0.8) + np.float32(anatomy.temporalis_mm) * temple
    r_scalp = r_muscle + np.float32(anatomy.scalp_mm * oblique)

    head = g.rho < r_scalp
    hu[head] = t.scalp
    tissue[head] = Tissue.SCALP
    fat_out = r_muscle + np.float32(anatomy.scalp_mm * oblique * anatomy.fat_fraction)
    fat = head & (g.rho >= r_muscle) & (g.rho < fat_out)
    hu[fat] = t.fat
    tissue[fat] = Tissue.FAT

    skull = g.rho < r_outer
    hu[skull] = t.table
    tissue[skull] = Tissue.BONE
    bone_depth = (r_outer - g.rho) / (r_outer - g.r_inner)
    diploe = skull & (np.abs(bone_depth - 0.5) < anatomy.diploe_fraction / 2)
    # Trabecular texture of the diploe: a cheap deterministic pattern, not noise, so it is the same
    # bone on adjacent slices.
    th_d, rho_d = g.theta[diploe], g.rho[diploe]
    hu[diploe] = t.diploe + 110.0 * np.sin(th_d * 53.0 + rho_d * 1.7) * np.cos(th_d * 31.0 - rho_d * 2.3)
    # Sutures: thin zigzag lucent lines through the bone (epidural haematomas stop at them).
    abs_theta = np.abs(g.theta)
    zigzag = np.float32(0.9) * np.sign(np.sin(g.rho * np.float32(2.2)))
    for suture_deg, low, high in ((anatomy.coronal_deg, -40.0, 90.0), (anatomy.lambdoid_deg, -80.0, 70.0)):
        if _bump(h_mm, low, high) > 0:
            off = (abs_theta - np.float32(math.radians(suture_deg))) * g.rho + zigzag
            hu[skull & (np.abs(off) < 0.35)] = t.suture

    cranium = g.rho < g.r_inner
    hu[cranium] = t.csf
    tissue[cranium] = Tissue.CSF

    # Internal structures live in a warped frame: compressed under extra-axial blood (most near the
    # surface, where sulci efface) and shifted at the midline.
    r_b, r_be = g.r_brain, g.r_brain_eff
    brain = g.rho < r_be
    rho_w = g.rho + (r_b - r_be) * np.clip(g.rho / np.maximum(r_be, 1.0), 0, 1) ** 3
    xw, yw = g.x, g.y
    if deformation.extra_axial_mm is not None:
        scale_w = rho_w / np.maximum(g.rho, 1e-3)
        xw, yw = g.x * scale_w, g.y * scale_w
    if deformation.midline_shift_mm:
        bump = np.clip(1.0 - (rho_w / (0.95 * r_b)) ** 2, 0, None)
        xw = xw - np.float32(deformation.midline_shift_mm) * bump
    depth = r_b - rho_w

    hu[brain] = t.white
    tissue[brain] = Tissue.WHITE

    # Gyri and sulci: zero lines of the gyral field within a depth that varies around the brain.
    cortex = np.float32(anatomy.cortex_mm * min(oblique, 1.6))
    dist_grid = _sulcus_distance(anatomy, h_mm)
    d_index = np.clip(depth * 2.0, 0, dist_grid.shape[0] - 1).astype(np.intp)
    s_index = (g.angle_index * (dist_grid.shape[1] / ANGLE_BINS)).astype(np.intp)
    dist = dist_grid[d_index, s_index]
    depth_tab = (
        anatomy.sulcus_depth_mm * (1.0 + _fourier(g.theta_table, anatomy.sulcus_depth_terms))
    ).astype(np.float32)
    # Vertex sections are cut obliquely: sulci look shallower there.
    sulcus_depth = np.clip(depth_tab, 3.0, 22.0)[g.angle_index] * np.float32(1.0 / oblique)
    rel = np.clip(depth / sulcus_depth, 0, 1)
    half = np.float32(0.3 + 0.8 * anatomy.atrophy) * (1.3 - 0.6 * rel)
    grey = brain & ((depth < cortex) | ((dist < half + cortex * 0.8) & (depth < sulcus_depth + cortex * 0.6)))
    sulci = brain & (dist < half) & (depth < sulcus_depth)

    # Sylvian fissures (low levels): a deep lateral cleft opening forward, insular cortex at its floor.
    # Like the central structures below, computed on a box of the image only (margins cover the shift).
    sylvian = np.zeros(shape, dtype=np.int8)
    syl_level = _bump(h_mm, -45.0, 8.0)
    if syl_level > 0:
        sub = g.box(90.0, 30.0, -8.0)
        xc, yc, brain_c = xw[sub], yw[sub], brain[sub]
        grey_c, sulci_c, syl_c = grey[sub], sulci[sub], sylvian[sub]
        for side in (-1, 1):
            lateral = side * xc
            syl_half = (0.9 + 1.6 * anatomy.atrophy) * syl_level
            path_l, path_y = [34.0, 42.0, 52.0, 80.0], [-2.0, -4.0, -9.0, -20.0]
            cleft = _band_y(yc, lateral, path_l, path_y, [syl_half, syl_half * 1.3, syl_half * 1.1, syl_half])
            # Posterior ramus: a branch running back from the middle of the fissure.
            ramus = _band_y(
                yc, lateral, [44.0, 52.0, 62.0], [-5.0, 2.0, 7.0], [syl_half * 0.8, syl_half * 0.7, 0.0]
            )
            cleft |= ramus
            insula = _ellipse(lateral, yc, 35.5, -4.0, 3.5, 15.0 * syl_level)
            walls = _band_y(yc, lateral, path_l, path_y, [syl_half + anatomy.cortex_mm] * 4)
            walls |= _band_y(
                yc, lateral, [44.0, 52.0, 62.0], [-5.0, 2.0, 7.0], [syl_half + 2.0, syl_half + 2.0, 0.0]
            )
            grey_c |= brain_c & (insula | walls)
            cleft &= brain_c
            syl_c[cleft] = side
            sulci_c &= ~cleft

    hu[grey] = t.grey
    tissue[grey] = Tissue.GREY
    # Ventricles and deep nuclei reach |x| ~ 32 mm, occipital horns y ~ 46 mm; plus up to 12 mm shift.
    sub = g.box(46.0, 50.0, 4.0)
    xc, yc, brain_c = xw[sub], yw[sub], brain[sub]
    hu_c, tissue_c = hu[sub], tissue[sub]

    # Deep grey nuclei: caudate heads, lentiform nuclei, thalami.
    v = anatomy.ventricle_scale
    deep_level = _bump(h_mm, -45.0, -2.0)
    if deep_level > 0:
        deep = np.zeros(xc.shape, dtype=bool)
        for side in (-1, 1):
            deep |= _ellipse(xc, yc, side * (9.5 + 2.5 * v), -17.0, 5.5 * deep_level, 9.0 * deep_level)
            deep |= _ellipse(xc, yc, side * 22.0, -3.0, 6.0 * deep_level, 14.0 * deep_level, side * 18.0)
            deep |= _ellipse(
                xc, yc, side * (8.0 + v), 11.0, 7.5 * deep_level, 11.0 * deep_level, -side * 10.0
            )
        deep &= brain_c
        hu_c[deep] = t.deep_grey
        tissue_c[deep] = Tissue.DEEP_GREY

    # Interhemispheric fissure with the falx; the corpus callosum interrupts it at ventricular levels.
    fissure_half = 0.6 + 1.4 * anatomy.atrophy
    callosal = _bump(h_mm, -30.0, 22.0)
    genu, splenium = -25.0 - 8.0 * (1 - callosal), 30.0 + 10.0 * (1 - callosal)
    in_fissure_y = ((yw < genu) | (yw > splenium)) if callosal > 0 else np.ones(shape, dtype=bool)
    near_mid = np.abs(xw) < fissure_half
    fissure = brain & in_fissure_y & near_mid
    falx = fissure & (np.abs(xw) < 0.6) & (depth > 0.5)

    csf_sulci = sulci & ~fissure
    syl_any = sylvian != 0
    csf = csf_sulci | fissure | syl_any
    hu[csf] = t.csf
    tissue[csf] = Tissue.CSF
    hu[falx] = t.falx
    tissue[falx] = Tissue.FALX

    # Ventricles: each component a tapered band, present over its range of heights.
    ventricles = np.zeros(shape, dtype=bool)
    ventricle_side = np.zeros(shape, dtype=np.int8)
    vent_c, side_c = ventricles[sub], ventricle_side[sub]
    body = _bump(h_mm, -12.0, 26.0)
    horns = _bump(h_mm, -34.0, -2.0)
    atria = _bump(h_mm, -30.0, 8.0)
    third = _bump(h_mm, -40.0, -12.0)
    for side in (-1, 1):
        part = np.zeros(xc.shape, dtype=bool)
        if body > 0:
            ys = np.linspace(-30.0, 30.0, 9)
            xs = side * (4.5 + 0.9 * v + 5.0 * ((ys + 30.0) / 60.0) ** 2)
            part |= _band_y(xc, yc, ys * (0.9 + 0.1 * v), xs, _rounded(9, 3.8 * v * body, 0.0, 0.0, 0.35))
        if horns > 0:
            ys = np.linspace(-34.0, -6.0, 7)
            xs = side * (3.5 + 0.8 * v + 0.18 * (-6.0 - ys))
            part |= _band_y(xc, yc, ys, xs, _rounded(7, 4.2 * v * horns, 0.0, 2.0 * v * horns, 0.4))
        if atria > 0:
            ys = np.linspace(6.0, 44.0, 8)
            # The trigone bulges laterally; the occipital horn's tip curves back towards the midline.
            xs = side * (8.0 + 0.75 * (ys - 6.0) - 0.014 * (ys - 6.0) ** 2)
            part |= _band_y(xc, yc, ys, xs, _rounded(8, 5.2 * v * atria, 2.0 * v * atria, 0.0, 0.5))
        part &= np.abs(xc) > 0.9  # the septum pellucidum keeps the two sides apart
        vent_c |= part
        side_c[part] = side
    if third > 0:
        third_mask = _band_y(
            xc, yc, np.linspace(-12.0, 12.0, 7), [0.0] * 7, _rounded(7, (1.2 + 2.0 * anatomy.atrophy) * third)
        )
        vent_c |= third_mask
        side_c[third_mask] = 0
    vent_c &= brain_c
    hu_c[vent_c] = t.csf
    tissue_c[vent_c] = Tissue.CSF

    calc = np.zeros(xc.shape, dtype=bool)
    if anatomy.choroid_calcified and _bump(h_mm, -22.0, 0.0) > 0:
        for side in (-1, 1):
            calc |= _ellipse(xc, yc, side * 14.3, 20.0, 2.2, 3.0, side * 20.0)
        calc &= vent_c
    if anatomy.pineal_calcified and _bump(h_mm, -30.0, -14.0) > 0:
        calc |= _ellipse(xc, yc, 0.0, 16.0, 2.5, 2.5) & brain_c
    hu_c[calc] = t.calcification
    tissue_c[calc] = Tissue.CALCIFICATION

    csf_space = ventricles | csf
    return AnatomySlice(
        hu=hu,
        tissue=tissue,
        geometry=g,
        parenchyma=brain & ~csf_space & ~falx,
        ventricles=ventricles,
        ventricle_side=ventricle_side,
        sulci=csf_sulci,
        surface_csf=cranium & ~brain,
        sylvian=sylvian,
        fissure=fissure & ~falx,
    )


def ventricles_present(anatomy: HeadAnatomy, h_mm: float) -> bool:
    """Whether a lateral ventricle is cut at height ``h`` (intraventricular blood needs one)."""
    return _bump(h_mm, -12.0, 26.0) > 0.3 or _bump(h_mm, -30.0, 8.0) > 0.3 or _bump(h_mm, -34.0, -2.0) > 0.3
