"""One synthetic patient (anatomy, pose, lesions, slab of slices) and the rendering of one slice.

``render_slice`` is the pure part of the generator: a patient and a slice index in, HU and labels out,
with labels true to the pixels (a type is positive iff its blood covers at least a minimum area).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic.anatomy import (
    FOV_MM,
    SLAB_HIGH_MM,
    SLAB_LOW_MM,
    Deformation,
    HeadAnatomy,
    Pose,
    Tissue,
    outline_tables,
    render_anatomy,
    sample_anatomy,
    sample_pose,
)
from hemorrhage_core.synthetic.lesions import Epidural, Lesion, Subarachnoid, sample_lesion

# Scanner range of the stored values (12-bit CT with intercept -1024).
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class PhantomConfig:
    """Population parameters of the synthetic data set (saved into synth.json).

    Prevalence is deliberately richer than RSNA's (any ~14%): a 600-slice demo set must hold positives
    of every type, so about 40-50% of slices show blood, and epidural stays the rarest type.
    """

    slice_spacing_mm: float = 5.0
    healthy_fraction: float = 0.15
    lesion_count_weights: tuple[float, ...] = (0.2, 0.35, 0.25, 0.2)  # P(1..4 lesions | not healthy)
    type_weights: tuple[tuple[str, float], ...] = (
        ("epidural", 0.07),
        ("intraparenchymal", 0.22),
        ("intraventricular", 0.2),
        ("subarachnoid", 0.24),
        ("subdural", 0.27),
    )
    span_slices: tuple[int, int] = (2, 5)  # consecutive slices a lesion covers
    # Chance that a further lesion sits at the level of the first (trauma, extension into ventricles).
    same_region_probability: float = 0.3
    min_visible_area_mm2: float = 4.0  # below this a lesion's tip is not drawn and not labelled
    min_visible_pixels: int = 4
    quirk_12bit_share: float = 0.05  # RSNA's 12-bit two's complement files
    uint12_share: float = 0.15  # ordinary unsigned 12-bit files (intercept -1024): must not be "fixed"
    multivalued_window_share: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def with_type_weights(self, overrides: Mapping[str, float]) -> PhantomConfig:
        """This population with some subtypes' relative weights replaced (the others keep theirs).

        A weight is relative to the others', so raising one type makes every other type a little rarer.
        Refuses (HemorrhageError) a name that is not a subtype, a negative or non-finite weight, and
        weights that leave no type at all.
        """
        weights = dict(self.type_weights)
        for name, value in overrides.items():
            if name not in weights:
                raise HemorrhageError(f"unknown hemorrhage type {name!r}; the types are {', '.join(weights)}")
            if not math.isfinite(value) or value < 0:
                raise HemorrhageError(f"the weight of {name} must be a finite number >= 0, got {value}")
            weights[name] = float(value)
        if not any(w > 0 for w in weights.values()):
            raise HemorrhageError("at least one hemorrhage type needs a weight above 0")
        return replace(self, type_weights=tuple(weights.items()))

    def with_lesion_count_weights(self, weights: Sequence[float]) -> PhantomConfig:
        """This population with the relative weights of 1, 2, ... lesions per patient who bleeds replaced.

        More lesions per patient keep every type's share and add examples of each (``(0.1, 0.3, 0.3,
        0.3)`` with epidural's weight tripled, 0.21, leave the other types with about as many slices
        as the default population). Refuses (HemorrhageError) no weights, negative or non-finite ones, and all zero.
        """
        counts = tuple(float(w) for w in weights)
        if not counts:
            raise HemorrhageError("give the weight of 1, 2, ... lesions per patient (e.g. 0.1,0.3,0.3,0.3)")
        if not all(math.isfinite(w) and w >= 0 for w in counts):
            raise HemorrhageError(f"lesion count weights must be finite numbers >= 0, got {list(counts)}")
        if not any(w > 0 for w in counts):
            raise HemorrhageError("at least one lesion count needs a weight above 0")
        return replace(self, lesion_count_weights=counts)


@dataclass(frozen=True)
class PatientPhantom:
    """Everything that defines one synthetic patient's series."""

    patient_key: str  # stable hash of (seed, index): the root of every id of this patient
    anatomy: HeadAnatomy
    pose: Pose
    lesions: tuple[Lesion, ...]
    slice_h_mm: tuple[float, ...]  # head-frame height of each slice
    z_start_mm: float  # ImagePositionPatient z of the first slice
    noise_seed: int

    @property
    def n_slices(self) -> int:
        return len(self.slice_h_mm)

    def z_mm(self, index: int) -> float:
        return self.z_start_mm + (self.slice_h_mm[index] - self.slice_h_mm[0])


@dataclass
class RenderedSlice:
    """A rendered slice with what tests and the contact sheet need to check it."""

    hu: np.ndarray  # float32 HU, noisy, rounded to stored precision
    labels: dict[str, int]  # LABELS order, any = OR of the five
    blood: dict[str, np.ndarray]  # per subtype: bool mask of its blood on this slice (empty if negative)
    tissue: np.ndarray  # uint8 Tissue codes before blur and noise
    pixel_mm: float


def patient_key(seed: int, index: int) -> str:
    """Stable hex key of patient ``index`` in the population of ``seed``."""
    return hashlib.sha256(f"hemorrhage-phantom/{seed}/{index}".encode()).hexdigest()


def sample_patient(
    seed: int,
    index: int,
    slices_per_patient: int = 10,
    config: PhantomConfig | None = None,
    lesion_types: tuple[str, ...] | None = None,
) -> PatientPhantom:
    """Draw patient ``index`` of the population ``seed``. ``lesion_types`` forces the lesions (``()``: healthy)."""
    config = config or PhantomConfig()
    if slices_per_patient < 1:
        raise ValueError("slices_per_patient must be at least 1")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x1C4]))
    anatomy = sample_anatomy(rng)
    pose = sample_pose(rng)
    usable = SLAB_HIGH_MM - SLAB_LOW_MM
    dz = (
        config.slice_spacing_mm
        if slices_per_patient < 2
        else min(config.slice_spacing_mm, usable / (slices_per_patient - 1))
    )
    span = dz * (slices_per_patient - 1)
    h0 = float(rng.uniform(SLAB_LOW_MM, SLAB_HIGH_MM - span))
    slice_h = tuple(h0 + i * dz for i in range(slices_per_patient))
    z_start = float(np.round(rng.uniform(-200.0, 100.0), 1))

    if lesion_types is None:
        lesion_types = _draw_types(rng, config)
    lesions: list[Lesion] = []
    first_centre: int | None = None
    for subtype in lesion_types:
        centre = (
            first_centre
            if first_centre is not None and rng.random() < config.same_region_probability
            else None
        )
        for _ in range(_PLACEMENT_TRIES):
            lesion = sample_lesion(subtype, rng, anatomy, slice_h, config.span_slices, centre)
            if lesion is None or _shows(lesion, anatomy, pose, slice_h, config):
                break
        else:
            lesion = None  # no placement showed blood (e.g. every spot fell inside a ventricle)
        if lesion is None:
            continue
        lesions.append(lesion)
        if first_centre is None:
            first_centre = int(np.argmin([abs(h - lesion.h_center_mm) for h in slice_h]))
    return PatientPhantom(
        patient_key=patient_key(seed, index),
        anatomy=anatomy,
        pose=pose,
        lesions=tuple(lesions),
        slice_h_mm=slice_h,
        z_start_mm=z_start,
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


_PLACEMENT_TRIES = 8
_CHECK_SIZE = 128  # a placement is checked on a small render of the lesion's central slice


def _shows(
    lesion: Lesion, anatomy: HeadAnatomy, pose: Pose, slice_h: tuple[float, ...], config: PhantomConfig
) -> bool:
    """Whether the lesion shows clearly (3x the visibility threshold) on the slice nearest its centre."""
    h = min(slice_h, key=lambda v: abs(v - lesion.h_center_mm))
    sl = render_anatomy(anatomy, pose, h, _CHECK_SIZE)
    pixel_mm2 = (FOV_MM / _CHECK_SIZE) ** 2
    return float(np.count_nonzero(lesion.blood_mask(sl))) * pixel_mm2 >= 3.0 * config.min_visible_area_mm2


def _draw_types(rng: np.random.Generator, config: PhantomConfig) -> tuple[str, ...]:
    if rng.random() < config.healthy_fraction:
        return ()
    weights = np.asarray(config.lesion_count_weights, dtype=float)
    n = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    names = [name for name, _ in config.type_weights]
    p = np.asarray([w for _, w in config.type_weights], dtype=float)
    n = min(n, int(np.count_nonzero(p)))  # a type weighted 0 is never drawn
    return tuple(str(t) for t in rng.choice(names, size=n, replace=False, p=p / p.sum()))


def _deformation(lesions: list[Lesion], patient: PatientPhantom, h_mm: float) -> Deformation:
    extra = None
    if any(isinstance(lesion, Epidural) for lesion in lesions):  # Subdural is an Epidural subclass
        theta_table, _ = outline_tables(patient.anatomy, h_mm)
        for lesion in lesions:
            t = lesion.extra_axial_mm(theta_table, h_mm)
            if t is not None:
                extra = t if extra is None else np.maximum(extra, t)
    shift = sum(lesion.midline_shift_mm(h_mm) for lesion in lesions)
    return Deformation(extra_axial_mm=extra, midline_shift_mm=float(np.clip(shift, -12.0, 12.0)))


def render_slice(
    patient: PatientPhantom, index: int, *, size: int = 512, config: PhantomConfig | None = None
) -> RenderedSlice:
    """Render slice ``index`` of ``patient`` at ``size`` x ``size`` pixels.

    Returns HU (float32, noisy, whole HU within [-1024, 3071]), labels (dict in LABELS order), the
    blood masks and the tissue map. Deterministic: the same patient and index give the same array.
    """
    config = config or PhantomConfig()
    if not 0 <= index < patient.n_slices:
        raise IndexError(f"slice {index} out of range for a series of {patient.n_slices}")
    h = patient.slice_h_mm[index]
    active = [lesion for lesion in patient.lesions if lesion.z_factor(h) > 0]
    pixel_mm = FOV_MM / size
    pixel_mm2 = pixel_mm * pixel_mm
    min_pixels = max(config.min_visible_pixels, math.ceil(config.min_visible_area_mm2 / pixel_mm2))

    # One pass: every lesion cut by this slice pushes the brain (a sub-threshold tip barely does).
    anatomy = render_anatomy(patient.anatomy, patient.pose, h, size, _deformation(active, patient, h))
    hu, tissue, g = anatomy.hu, anatomy.tissue, anatomy.geometry

    masks: list[tuple[Lesion, np.ndarray]] = []
    extra_axial = np.zeros(g.shape, dtype=bool)
    for lesion in active:
        if isinstance(lesion, Epidural):
            m = lesion.blood_mask(anatomy)
            extra_axial |= m
            masks.append((lesion, m))
    for lesion in active:
        if not isinstance(lesion, Epidural):
            m = lesion.blood_mask(anatomy)
            if isinstance(lesion, Subarachnoid):
                m &= ~extra_axial
            masks.append((lesion, m))

    blood = {name: np.zeros(g.shape, dtype=bool) for name in SUBTYPES}
    drawn: list[tuple[Lesion, np.ndarray]] = []
    for lesion, m in masks:
        if int(np.count_nonzero(m)) < min_pixels:
            continue  # a tip too small to see is neither drawn nor labelled
        oedema = lesion.oedema(anatomy, m)
        if oedema is not None:
            hu[oedema[0]] = oedema[1]
            tissue[oedema[0]] = Tissue.OEDEMA
        drawn.append((lesion, m))
    for lesion, m in drawn:
        # Where two lesions overlap, the denser blood shows.
        prior = np.where(tissue[m] == Tissue.BLOOD, hu[m], -np.inf)
        hu[m] = np.maximum(prior, lesion.density(h))
        tissue[m] = Tissue.BLOOD
        blood[lesion.subtype] |= m

    labels = {name: int(blood[name].any()) for name in SUBTYPES}
    labels["any"] = int(any(labels.values()))
    hu = _acquire(g.embed(hu, np.float32(-1000.0)), patient, index, size)
    return RenderedSlice(
        hu=hu,
        labels={k: labels[k] for k in LABELS},
        blood={name: g.embed(m, False) for name, m in blood.items()},
        tissue=g.embed(tissue, np.uint8(Tissue.AIR)),
        pixel_mm=pixel_mm,
    )


def _acquire(clean: np.ndarray, patient: PatientPhantom, index: int, size: int) -> np.ndarray:
    """Noise, partial-volume blur, rounding and the scanner's range.

    White noise is added before the blur, so one Gaussian pass both softens edges and makes the noise
    slightly correlated, as a reconstruction kernel does; its level is set so the result has the
    patient's noise standard deviation.
    """
    a = patient.anatomy
    sigma_px = a.blur_mm * size / FOV_MM
    rng = np.random.default_rng([patient.noise_seed, index])
    noise = rng.standard_normal((size, size), dtype=np.float32)
    if sigma_px < 0.2:  # pixels coarser than the blur: plain white noise
        return np.clip(np.rint(clean + np.float32(a.noise_sd_hu) * noise), HU_MIN, HU_MAX).astype(np.float32)
    gain = _noise_gain(sigma_px)
    img = ndimage.gaussian_filter(clean + np.float32(a.noise_sd_hu / gain) * noise, sigma_px, truncate=3.0)
    return np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.float32)


def _noise_gain(sigma_px: float, truncate: float = 3.0) -> float:
    """Standard deviation of white unit noise after ndimage's 2-D Gaussian filter of ``sigma_px``."""
    radius = int(truncate * sigma_px + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_px) ** 2)
    w /= w.sum()
    return float((w**2).sum())  # separable: (sum w^2)^2 is the variance, its root the 1-D sum


def render_series(
    patient: PatientPhantom, *, size: int = 512, config: PhantomConfig | None = None
) -> list[RenderedSlice]:
    """All slices of a patient, in slab order."""
    return [render_slice(patient, i, size=size, config=config) for i in range(patient.n_slices)]


__all__ = [
    "PatientPhantom",
    "PhantomConfig",
    "RenderedSlice",
    "render_series",
    "render_slice",
    "sample_patient",
]
