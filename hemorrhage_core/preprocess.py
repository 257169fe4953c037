"""The deterministic slice preprocessing shared by the Dataset, its cache and the Predictor.

HU slice -> [crop to the head] -> [polar resampling] -> window stack -> uint8 -> resize to ``image_size``
-> uint8 (C, S, S).
With ``context`` k > 0 (2.5D input) the model's input is that of the slice and of its k neighbours on
each side in its series, stacked along the channels in z order (``stack_context``), (C (2k + 1), S, S).
``SlicePrep`` holds the parameters: built once from a run's config, saved in its checkpoints, part of
the slice cache's key, and called by the Dataset (cached or not) and the Predictor, so training,
evaluate, predict and the dashboard feed the model identical tensors. The model then resamples
(through the STN) to its backbone's input size and normalises inside itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hemorrhage_core.windowing import DEFAULT_STACK, WindowStack

# Bump when the output of SlicePrep changes, so preprocessed caches built earlier are rebuilt.
# 3: head crop (SlicePrep.head_crop). Polar input (SlicePrep.polar) extends the key instead: a preprocessing
# without it gives the same output as before.
PREPROCESS_VERSION = 3

# Polar input: angles sampled this many times finer than the output before the antialiased resize, so
# thin blood along the skull (whose circumference is about 3x the output's width) is averaged, not
# skipped. The seam (first and last column) is the back of the head: a lesion there is split in two,
# unless the image repeats ``polar_overlap`` of a turn past each side of it (SlicePrep.polar_overlap).
_POLAR_OVERSAMPLE = 4
_POLAR_START = math.pi / 2  # image rows grow downwards: +pi/2 points to the bottom, the back of the head
MAX_POLAR_OVERLAP = 0.25  # of a turn on each side: the image then spans 1.5 turns
MAX_POLAR_FOLD = 4  # panels of the folded polar image (SlicePrep.polar_fold)
# Where the polar turn starts and ends (SlicePrep.polar_seam), as an angle past _POLAR_START: only these two
# keep a flip of the polar image (its columns reversed) the head mirrored left to right.
POLAR_SEAMS = {"back": 0.0, "front": math.pi}
# Columns closer together at the midline (SlicePrep.polar_midline): the columns' density over the angle a
# (from the back) is 1 + c exp(k (cos 2a - 1)), a bump at the front and one at the back, each at half its
# height 25 degrees from the midline, wide enough for heads turned by up to 15 degrees in the slice.
_MIDLINE_KAPPA = 1.8
_MIDLINE_TABLE = 4096  # samples of one turn in the tabulated map between angle and column
MAX_POLAR_MIDLINE = 2.5  # the midline's columns at most this many times as dense as without the option

# Skull-traced polar frame (SlicePrep.polar_trace): the inner table's radius over the angle, found along
# this many rays from the crop's centre and kept as a Fourier series this many harmonics long: two are an
# ellipse, three an egg; six follow a skull's frontal and occipital bulges, while a suture a few degrees
# wide cannot bend it. When fewer than this share of the rays find the table (the crop's centre outside
# the cavity, say) there is no trace; the scale is clamped to these limits of its mean.
_TRACE_RAYS = 180
_TRACE_HARMONICS = 6
_TRACE_MIN_FOUND = 0.75
_TRACE_LIMITS = (0.7, 1.3)

# 2.5D input: at most this many neighbours on each side (RSNA slices are 5 mm; 3 covers 3 cm).
MAX_CONTEXT = 3

# Head finding runs on a copy of at most this many pixels a side: ~1 ms, and the skull is still
# several pixels thick there (a 512 px slice at 2 mm a pixel).
_FIND_SIZE = 128
SKULL_HU = 300.0  # cortical bone is 700-2000 HU; brain, blood and scalp stay below 100
AIR_HU = -1024.0  # what a crop that reaches past the image is filled with
_MIN_RING_AREA = 0.03  # a skull ring encloses at least this share of the slice (phantoms: >= 0.096)


@dataclass(frozen=True)
class HeadRing:
    """The skull found on a slice: its bounding box in pixels and what it encloses."""

    top: int
    left: int
    bottom: int  # exclusive
    right: int  # exclusive
    enclosed_fraction: float  # share of the slice inside the ring
    enclosed_hu: float  # mean HU inside the ring (brain: about 20-45)
    # The cranial cavity on the search copy (every ``step``-th pixel), for ``inner_table``.
    cavity: np.ndarray | None = field(default=None, compare=False, repr=False)
    step: int = field(default=1, compare=False)


def find_skull_ring(hu: np.ndarray) -> HeadRing | None:
    """The closed ring of bone around the brain, or None when the slice has none.

    On a copy of at most ``_FIND_SIZE`` px a side: bone (> ``SKULL_HU``), closed over sutures and thin
    spots, holes filled; the largest hole is the cranial cavity when it covers at least
    ``_MIN_RING_AREA`` of the slice, and the bone around it is the skull. A table or head rest (bone
    density on some scanners) stays out of the box because it encloses nothing. None on a slice
    through the skull base or the vertex where the ring is open, and on CT that is not a head.
    """
    step = max(1, -(-max(hu.shape) // _FIND_SIZE))
    low = np.nan_to_num(np.asarray(hu[::step, ::step], dtype=np.float32), nan=AIR_HU)
    bone = low > SKULL_HU
    if not bone.any():
        return None
    closed = ndimage.binary_closing(bone, iterations=2)
    filled = ndimage.binary_fill_holes(closed)
    holes, n_holes = ndimage.label(filled & ~closed)
    if n_holes == 0:
        return None
    sizes = np.bincount(holes.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    fraction = float(sizes[largest - 1]) / low.size
    if fraction < _MIN_RING_AREA:
        return None
    parts, _ = ndimage.label(filled)
    cavity = holes == largest
    skull = parts == parts[cavity][0]
    rows = np.flatnonzero(skull.any(axis=1))
    cols = np.flatnonzero(skull.any(axis=0))
    h, w = hu.shape
    return HeadRing(
        top=int(rows[0]) * step, left=int(cols[0]) * step,
        bottom=min(h, (int(rows[-1]) + 1) * step), right=min(w, (int(cols[-1]) + 1) * step),
        enclosed_fraction=fraction, enclosed_hu=float(low[cavity].mean()), cavity=cavity, step=step,
    )


def head_box(
    ring: HeadRing, shape: tuple[int, int], margin: float, min_side: float, stretch: bool = False,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the crop around ``ring``: its longer side squared, or with
    ``stretch`` the ring's own box, each side widened by ``margin`` at each end (the scalp lies outside
    the skull) and at least ``min_side`` of the slice, centred on the ring. Resampled to the square
    input, the stretched box makes the skull's ellipse a circle: in polar coordinates the skull then
    runs nearly straight, instead of a wave as deep as a large epidural lens is thick (its inner table
    spans a median 34 of 192 rows on the phantoms, 16 with the stretch: their egg shape and in-plane
    rotation remain, which the traced frame, ``inner_table``, straightens)."""
    height, width = ring.bottom - ring.top, ring.right - ring.left
    if not stretch:
        height = width = max(height, width)
    floor = min_side * max(shape)
    height = int(round(max(height * (1.0 + 2.0 * margin), floor)))
    width = int(round(max(width * (1.0 + 2.0 * margin), floor)))
    top = int(round((ring.top + ring.bottom) / 2.0 - height / 2.0))
    left = int(round((ring.left + ring.right) / 2.0 - width / 2.0))
    return top, left, height, width


def head_square(ring: HeadRing, shape: tuple[int, int], margin: float, min_side: float) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square crop around ``ring`` (``head_box`` without the stretch)."""
    top, left, side, _ = head_box(ring, shape, margin, min_side)
    return top, left, side


def _overlap(
    top: int, left: int, height: int, width: int, shape: tuple[int, ...],
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where the box ``(top, left, height, width)`` and a slice of ``shape`` overlap: the overlap's index
    on the slice and on the box, or None when they do not."""
    h, w = int(shape[0]), int(shape[1])
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, h), min(left + width, w)
    if y1 <= y0 or x1 <= x0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def crop_box(hu: np.ndarray, top: int, left: int, height: int, width: int, fill: float = AIR_HU) -> np.ndarray:
    """``hu[top:top+height, left:left+width]``, filled with ``fill`` where the box leaves the slice."""
    out = np.full((height, width), fill, dtype=np.float32)
    overlap = _overlap(top, left, height, width, hu.shape)
    if overlap is not None:
        on_slice, on_box = overlap
        out[on_box] = hu[on_slice]
    return out


def _harmonics(turn: np.ndarray) -> np.ndarray:
    """(n, 1 + 2 ``_TRACE_HARMONICS``) Fourier basis at ``turn`` (angle from ``_POLAR_START``, radians):
    1, cos t, sin t, cos 2t, sin 2t, ..."""
    m = np.arange(1, _TRACE_HARMONICS + 1, dtype=np.float64)
    t = np.asarray(turn, dtype=np.float64).reshape(-1, 1) * m
    return np.concatenate([np.ones((t.shape[0], 1)), np.stack([np.cos(t), np.sin(t)], axis=-1).reshape(t.shape[0], -1)], axis=1)


def inner_table(ring: HeadRing, box: tuple[int, int, int, int], ellipse: bool = False) -> tuple[float, ...] | None:
    """The skull's inner table around the centre of ``box`` (the crop, ``head_box``): its radius over the
    angle, in the units of the crop's polar frame (``_polar_radii``) and divided by its mean, as Fourier
    coefficients ``(1, a1, b1, ..., aM, bM)`` of the angle from ``_POLAR_START``; None when the ring
    keeps no cavity or too few rays find its edge. Read from the ring's cavity (the hole the skull
    encloses, which holds any blood under the table) along ``_TRACE_RAYS`` rays, each to where the
    cavity first ends, then fitted with ``_TRACE_HARMONICS`` harmonics by least squares, so a ray
    through a gap or a bulge moves the trace little."""
    if ring.cavity is None:
        return None
    top, left, height, width = box
    half_h, half_w = _polar_radii(height, width, ellipse)
    turn = 2.0 * math.pi * np.arange(_TRACE_RAYS, dtype=np.float64) / _TRACE_RAYS
    samples = max(64, int(math.ceil(2.5 * max(half_h, half_w) / ring.step)))  # about half a search pixel
    unit = np.linspace(0.0, 1.25, samples)
    angle = _POLAR_START + turn
    rows = (top + (height - 1) / 2.0 + half_h * unit[None, :] * np.sin(angle)[:, None]) / ring.step
    cols = (left + (width - 1) / 2.0 + half_w * unit[None, :] * np.cos(angle)[:, None]) / ring.step
    # Holes filled: calcified choroid plexus or pineal (bone density inside the brain) would stop a ray.
    cavity = ndimage.binary_fill_holes(ring.cavity).astype(np.float32)
    level = ndimage.map_coordinates(cavity, [rows, cols], order=1, mode="constant")
    out = level < 0.5
    found = ~out[:, 0] & out.any(axis=1)  # from inside the cavity at the centre to its edge
    if found.mean() < _TRACE_MIN_FOUND:
        return None
    ray = np.arange(_TRACE_RAYS)
    last_in = np.maximum(np.argmax(out, axis=1) - 1, 0)
    before, after = level[ray, last_in], level[ray, np.minimum(last_in + 1, samples - 1)]
    # the edge where the interpolated cavity crosses one half, between the last sample in and the first out
    radius = unit[last_in] + np.clip((before - 0.5) / np.maximum(before - after, 1e-6), 0.0, 1.0) * (unit[1] - unit[0])
    basis = _harmonics(turn)
    coeffs, *_ = np.linalg.lstsq(basis[found], radius[found], rcond=None)
    # Once more without the rays far from the first fit (a ray out through a gap the closing left open).
    residual = np.abs(basis @ coeffs - radius)
    kept = found & (residual <= 3.0 * max(float(np.median(residual[found])), 0.005))
    if kept.mean() >= _TRACE_MIN_FOUND:
        coeffs, *_ = np.linalg.lstsq(basis[kept], radius[kept], rcond=None)
    if not coeffs[0] > 0.0:
        return None
    return tuple(float(c) for c in coeffs / coeffs[0])


def _trace_scale(trace: tuple[float, ...] | None, angle: np.ndarray) -> np.ndarray:
    """The polar frame's radius at ``angle`` relative to its mean: the inner table's (``inner_table``),
    so the table lands on one row; 1 everywhere without a trace."""
    angle = np.asarray(angle, dtype=np.float64)
    if trace is None:
        return np.ones_like(angle)
    scale = _harmonics(angle.ravel() - _POLAR_START) @ np.asarray(trace, dtype=np.float64)
    return np.clip(scale, *_TRACE_LIMITS).reshape(angle.shape)


def _polar_radii(h: int, w: int, ellipse: bool) -> tuple[float, float]:
    """The polar frame's outermost radius along the rows and along the columns of an (h, w) frame: the
    inscribed ellipse's half sides, else the inscribed circle's (the forward and inverse maps share it)."""
    return (h / 2.0, w / 2.0) if ellipse else (min(h, w) / 2.0, min(h, w) / 2.0)


def _seam_start(seam: str) -> float:
    """The angle at which a polar turn with its seam at ``seam`` (``POLAR_SEAMS``) begins."""
    if not isinstance(seam, str) or seam not in POLAR_SEAMS:
        raise ValueError(f"polar_seam must be one of {', '.join(POLAR_SEAMS)}, got {seam!r}")
    return _POLAR_START + POLAR_SEAMS[seam]


@functools.lru_cache(maxsize=8)
def _midline_table(midline: float) -> tuple[np.ndarray, np.ndarray]:
    """(angle, column) over one turn from the seam, both as shares of a turn from 0 to 1: where the column
    share reaches each angle when the midline's columns are ``midline`` times as dense as the mean."""
    if not 1.0 <= midline <= MAX_POLAR_MIDLINE:
        raise ValueError(f"polar_midline must be from 1 to {MAX_POLAR_MIDLINE}, got {midline!r}")
    angle = np.linspace(0.0, 1.0, _MIDLINE_TABLE + 1)
    bump = np.exp(_MIDLINE_KAPPA * (np.cos(4.0 * math.pi * angle) - 1.0))  # 1 at the midlines, front and back
    mean_bump = float(np.mean(bump[:-1]))
    gain = (midline - 1.0) / (1.0 - midline * mean_bump)  # so that the density's peak over its mean is ``midline``
    density = 1.0 + gain * bump
    column = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2.0)])
    return angle, column / column[-1]


def _midline_map(values: np.ndarray, midline: float, to_columns: bool) -> np.ndarray:
    """Angle (turns from the seam) -> column (share of a turn's columns from the seam) with ``to_columns``,
    else the inverse; any number of turns (the map repeats each turn). Unchanged at ``midline`` 1."""
    if midline == 1.0:
        return values
    angle, column = _midline_table(float(midline))
    source, target = (angle, column) if to_columns else (column, angle)
    whole = np.floor(values)
    return whole + np.interp(values - whole, source, target)


def _midline_columns(turns: np.ndarray, midline: float) -> np.ndarray:
    """Angle in turns from the seam -> share of a turn's columns (``_midline_map``)."""
    return _midline_map(turns, midline, to_columns=True)


def _midline_angles(columns: np.ndarray, midline: float) -> np.ndarray:
    """The inverse of ``_midline_columns``: share of a turn's columns -> angle in turns from the seam."""
    return _midline_map(columns, midline, to_columns=False)


def polar_grid(
    shape: tuple[int, int], size: int, columns: int, overlap: float = 0.0, ellipse: bool = False,
    trace: tuple[float, ...] | None = None, fold: int = 1, seam: str = "back", midline: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Slice coordinates (rows, cols), each (size, columns), of the polar image of a slice of ``shape``:
    row i at radius (i + 0.5) / size of the half side from the slice's centre, column j at angle
    ``_POLAR_START`` + 2 pi ((1 + 2 overlap)(j + 0.5) / columns - overlap), clockwise on screen (rows
    grow downwards): one turn from the back of the head, plus ``overlap`` of a turn repeated before and
    after it, so what lies across the seam is also seen whole. ``ellipse``: the radius is that share
    of each half side along its own axis (the ellipse inscribed in the slice), else of the shorter one.
    ``trace``: each column's radii are scaled by the inner table's radius at its angle over the mean
    (``inner_table``), so the table runs along one row.
    ``fold`` > 1: the turn is cut into ``fold`` equal arcs, each with ``overlap`` of a turn repeated on
    both sides, laid out as panels of ``size / fold`` rows stacked from the top: the same pixels with
    ``fold`` times the columns per turn and 1 / ``fold`` the rows per radius.
    ``seam``: where the turn starts and ends (``POLAR_SEAMS``): the back of the head, or half a turn on,
    the front.
    ``midline`` > 1: the columns are spaced by angle unevenly, ``midline`` times as close as on average at
    the front and back midlines (``_midline_table``) and further apart at the sides; the turns above
    (and ``overlap``) then count columns, not angle."""
    h, w = shape
    if fold < 1 or size % fold:
        raise ValueError(f"a polar image of {size} rows cannot hold {fold} panels of whole rows")
    panel_rows = size // fold
    panel = np.arange(size) // panel_rows  # which arc each row belongs to
    unit = (np.arange(size, dtype=np.float64) % panel_rows + 0.5) / panel_rows
    half_h, half_w = _polar_radii(h, w, ellipse)
    arc = (1.0 / fold + 2.0 * overlap) * (np.arange(columns, dtype=np.float64) + 0.5) / columns - overlap
    turns = panel[:, None] / fold + arc[None, :]
    angle = _seam_start(seam) + 2.0 * math.pi * _midline_angles(turns, midline)
    radius = unit[:, None] * _trace_scale(trace, angle)
    rows = (h - 1) / 2.0 + half_h * radius * np.sin(angle)
    cols = (w - 1) / 2.0 + half_w * radius * np.cos(angle)
    return rows, cols


def polar_slice(
    hu: np.ndarray, size: int, overlap: float = 0.0, ellipse: bool = False, trace: tuple[float, ...] | None = None,
    fold: int = 1, seam: str = "back", midline: float = 1.0,
) -> np.ndarray:
    """HU (H, W) -> HU (size, ``_POLAR_OVERSAMPLE`` size) in polar coordinates around the slice's centre
    (bilinear; air beyond the slice): rows the distance from the centre out to half the shorter side
    (with ``ellipse``, out to the inscribed ellipse: half of each side along its axis), columns the
    angle (``polar_grid``). With the head crop the centre is the skull's, so the skull runs along the
    rows near the bottom and blood under it (epidural, subdural) is a band along the skull whose length
    and thickness profile read the same at every angle. ``overlap``, ``ellipse``, ``trace``, ``fold``,
    ``seam``, ``midline``: see ``polar_grid`` (an ellipse on a stretched crop, ``head_box``; a trace from ``inner_table``)."""
    h, w = hu.shape
    # Folded, each panel is sampled at ``size`` rows too and averaged down in blocks of ``fold``, so the
    # radius is averaged like the angle and no row mixes two panels.
    rows, cols = polar_grid((h, w), size * fold, _POLAR_OVERSAMPLE * size, overlap, ellipse, trace, fold, seam,
                            midline)
    # grid_sample (about 2x scipy's map_coordinates here) on HU above air, whose zero padding is then air.
    grid = np.stack([cols * (2.0 / max(w - 1, 1)) - 1.0, rows * (2.0 / max(h - 1, 1)) - 1.0], axis=-1)
    above_air = np.nan_to_num(np.asarray(hu, dtype=np.float32), nan=AIR_HU) - AIR_HU
    out = F.grid_sample(
        torch.from_numpy(above_air)[None, None], torch.from_numpy(grid.astype(np.float32))[None],
        mode="bilinear", padding_mode="zeros", align_corners=True,
    )
    polar = out[0, 0].numpy()
    if fold > 1:
        polar = polar.reshape(size, fold, -1).mean(axis=1)
    return polar + np.float32(AIR_HU)


def prepare_slice(hu: np.ndarray, image_size: int, windows: WindowStack = DEFAULT_STACK) -> np.ndarray:
    """HU slice (H, W) -> uint8 array (C, image_size, image_size), windowed then resized (no crop).

    Windowing first keeps the resize from blending air and bone into brain-window values. The resize
    runs on uint8 with the channels interleaved and padded to four, torch's fastest antialiased path
    (about 2x planar uint8, 10x float32); each channel is resized on its own, so the padding changes
    no value.
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D HU slice, got shape {hu.shape}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    channels = windows.channels
    if channels <= 4:
        hwc = windows.apply_uint8_rgba(hu)
    else:
        hwc = np.moveaxis(windows.apply_uint8(hu), 0, -1)
    if hwc.shape[:2] == (image_size, image_size):
        return np.ascontiguousarray(np.moveaxis(hwc[..., :channels], -1, 0))
    x = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # (1, C, H, W), channels-last when padded
    # antialias matters when shrinking 512 -> 128: without it thin SAH lines alias away.
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(x[0, :channels].numpy())


@dataclass(frozen=True)
class InputGeometry:
    """Where a prepared slice came from: the slice's (H, W), the box ``(top, left, height, width)`` that
    was cropped from it (None: the whole slice) and whether that frame was resampled in polar coordinates
    (else resized), repeating ``polar_overlap`` of a turn past the seam, around the ellipse inscribed in
    the box (``ellipse``, a stretched crop) or its inscribed circle. Maps what lives on the model
    input's grid (a Grad-CAM heatmap) back onto the slice, so it overlays the slice as the user sees it."""

    shape: tuple[int, int]
    box: tuple[int, int, int, int] | None = None
    polar: bool = False
    polar_overlap: float = 0.0
    ellipse: bool = False
    trace: tuple[float, ...] | None = None  # the polar frame follows the inner table (``inner_table``)
    polar_fold: int = 1  # the polar turn in this many stacked panels (``polar_grid``)
    polar_seam: str = "back"  # where the polar turn starts and ends (``POLAR_SEAMS``)
    polar_midline: float = 1.0  # the columns this many times as close at the midline (``polar_grid``)

    def to_slice(self, values: np.ndarray) -> np.ndarray:
        """float32 (S, S) on the input grid -> float32 (H, W) on the slice, 0 where the input did not
        reach (outside the crop; in polar, beyond the circle it sampled). Bilinear, with the pixel-centre
        convention of the forward resampling."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != values.shape[1]:
            raise ValueError(f"expected a square 2-D map on the input grid, got shape {values.shape}")
        h, w = self.shape
        frame = (h, w) if self.box is None else (self.box[2], self.box[3])
        if self.polar:
            back = _from_polar(values, frame, self.polar_overlap, self.ellipse, self.trace, self.polar_fold,
                               self.polar_seam, self.polar_midline)
        else:
            x = torch.from_numpy(np.ascontiguousarray(values))[None, None]
            back = F.interpolate(x, size=frame, mode="bilinear", align_corners=False)[0, 0].numpy()
        if self.box is None:
            return np.ascontiguousarray(back, dtype=np.float32)
        out = np.zeros((h, w), dtype=np.float32)
        overlap = _overlap(*self.box, self.shape)  # crop_box's overlap, pasted the other way
        if overlap is not None:
            on_slice, on_box = overlap
            out[on_slice] = back[on_box]
        return out


def _from_polar(
    values: np.ndarray, frame: tuple[int, int], overlap: float = 0.0, ellipse: bool = False,
    trace: tuple[float, ...] | None = None, fold: int = 1, seam: str = "back", midline: float = 1.0,
) -> np.ndarray:
    """The inverse of ``polar_slice`` followed by the resize: (S, S) polar -> ``frame`` (H, W). With an
    overlap each slice pixel is read from the middle turn (the columns past the seam are its copies);
    folded, from the panel whose own arc holds its angle."""
    size = values.shape[0]
    h, w = frame
    half_h, half_w = _polar_radii(h, w, ellipse)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    dy, dx = (yy - (h - 1) / 2.0) / half_h, (xx - (w - 1) / 2.0) / half_w  # on the unit circle's scale
    angle = np.arctan2(dy, dx)
    radius = np.hypot(dy, dx) / _trace_scale(trace, angle)
    # The share of the turn's columns at each pixel's angle (the angle's own share without ``midline``).
    turn = _midline_columns(np.mod(angle - _seam_start(seam), 2.0 * math.pi) / (2.0 * math.pi), midline)
    if fold == 1:
        row = radius * size - 0.5
        col = (turn + overlap) / (1.0 + 2.0 * overlap) * size - 0.5
        # Without overlap the angle wraps: a copy of the last column before the first and of the first
        # after the last (with it, the middle turn lies inside the columns and the copies are never read).
        wrapped = np.concatenate([values[:, -1:], values, values[:, :1]], axis=1)
        out = ndimage.map_coordinates(wrapped, [row, col + 1.0], order=1, mode="nearest").astype(np.float32)
        out[row > size - 0.5] = 0.0  # beyond the circle the polar image reached
        return out
    panel_rows = size // fold
    row = radius * panel_rows - 0.5
    panel = np.minimum((turn * fold).astype(np.int64), fold - 1)
    out = np.zeros((h, w), dtype=np.float32)
    for p in range(fold):
        here = panel == p
        col = (turn[here] - p / fold + overlap) / (1.0 / fold + 2.0 * overlap) * size - 0.5
        # Each panel on its own, so the bilinear read never reaches into the next panel's rows.
        block = values[p * panel_rows:(p + 1) * panel_rows]
        out[here] = ndimage.map_coordinates(block, [row[here], col], order=1, mode="nearest")
    out[row > panel_rows - 0.5] = 0.0
    return out


@dataclass(frozen=True)
class SlicePrep:
    """The preprocessing of one model: output size, windows and the head crop.

    ``context``: neighbours on each side whose slices are stacked with this one (2.5D input): the model
    takes ``input_channels`` = ``channels`` (2 context + 1). Each slice is prepared on its own (its own
    crop), so a slice's cache entry serves as a centre and as a neighbour, and ``key`` leaves context out.

    ``head_crop``: crop to the skull's bounding box (``find_skull_ring``), squared and widened by
    ``crop_margin`` a side, before windowing and resizing, so the brain fills the input instead of
    air (about 1.3x the pixels across the brain of a typical slice). A slice without a closed ring
    (skull base, vertex, not a head) is used whole, as without the crop. Calling the object runs it.

    ``polar``: then resample the (cropped) slice around its centre in polar coordinates (``polar_slice``:
    rows the distance from the centre, columns the angle), so blood under the skull has one shape
    whatever its position around the head, and a network learns an epidural lens from few examples.
    ``polar_overlap``: the share of a turn repeated past each side of the seam (the back of the head),
    so the posterior horns of the ventricles, where blood layers, are not cut in two.
    ``crop_stretch``: crop the skull's own box (``head_box``) instead of its square, so the resampling
    to the square input (or, with polar, around the box's ellipse) makes an oval skull a circle: in
    polar coordinates the inner table then runs nearly straight, and a lens under it is measured from a
    line instead of a wave.
    ``polar_trace``: with polar and the crop, scale each angle's radii by the inner table's radius there
    over its mean (``inner_table``), so the table runs along one row whatever the skull's shape and
    turn in the slice, which no box can straighten (an egg, a rotated oval).
    ``polar_fold``: with polar, cut the turn into this many arcs (each with the overlap on both sides)
    stacked as panels, so the same pixels hold ``polar_fold`` times the columns per turn and
    1 / ``polar_fold`` the rows per radius: unfolded, a 192 px image samples the radius every 0.5 mm
    and the convexity every 3 mm; in two panels about 1 mm and 2 mm (``polar_grid``).
    ``polar_seam``: where the turn starts and ends, at the back of the head or at the front
    (``POLAR_SEAMS``): what lies at the seam sits near the image's side edges, the rest whole inside.
    ``polar_midline``: the columns ``polar_midline`` times as close together at the front and back
    midlines as on average, further apart at the sides (``polar_grid``): the interhemispheric fissure,
    a line along the radius 1 to 4 mm wide, spans more columns.
    The geometry (``geometry``) maps the input grid back onto the slice either way.
    """

    image_size: int
    windows: WindowStack = DEFAULT_STACK
    head_crop: bool = False
    crop_margin: float = 0.08
    crop_min_side: float = 0.4  # of the slice's longer side: limits the zoom on small vertex rings
    context: int = 0  # neighbours on each side stacked as channels (0: the slice alone)
    polar: bool = False  # resample the (cropped) slice in polar coordinates (``polar_slice``)
    polar_overlap: float = 0.0  # with polar: share of a turn repeated past each side of the seam
    crop_stretch: bool = False  # with head_crop: crop the skull's box, not its square (``head_box``)
    polar_trace: bool = False  # with polar and head_crop: the frame follows the inner table (``inner_table``)
    polar_fold: int = 1  # with polar: the turn in this many stacked panels (``polar_grid``)
    polar_seam: str = "back"  # with polar: where the turn starts and ends (``POLAR_SEAMS``)
    polar_midline: float = 1.0  # with polar: the columns this many times as close at the midline

    def __post_init__(self) -> None:
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 <= float(self.crop_margin) <= 1.0:
            raise ValueError(f"crop_margin must be in [0, 1], got {self.crop_margin}")
        if not 0.0 < float(self.crop_min_side) <= 1.0:
            raise ValueError(f"crop_min_side must be in (0, 1], got {self.crop_min_side}")
        if isinstance(self.context, bool) or int(self.context) != self.context or not 0 <= int(self.context) <= MAX_CONTEXT:
            raise ValueError(f"context must be a whole number of slices from 0 to {MAX_CONTEXT}, got {self.context!r}")
        object.__setattr__(self, "context", int(self.context))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "head_crop", bool(self.head_crop))
        object.__setattr__(self, "polar", bool(self.polar))
        if not 0.0 <= float(self.polar_overlap) <= MAX_POLAR_OVERLAP:
            raise ValueError(f"polar_overlap must be in [0, {MAX_POLAR_OVERLAP}], got {self.polar_overlap}")
        # Without polar the overlap means nothing: keep it 0 so equal preprocessings compare equal.
        object.__setattr__(self, "polar_overlap", float(self.polar_overlap) if self.polar else 0.0)
        object.__setattr__(self, "crop_margin", float(self.crop_margin))
        # Without the crop there is no box to stretch: keep it False so equal preprocessings compare equal.
        object.__setattr__(self, "crop_stretch", bool(self.crop_stretch) and self.head_crop)
        object.__setattr__(self, "crop_min_side", float(self.crop_min_side))
        # The trace needs the ring (the crop) and a polar frame to bend.
        object.__setattr__(self, "polar_trace", bool(self.polar_trace) and self.polar and self.head_crop)
        if isinstance(self.polar_fold, bool) or int(self.polar_fold) != self.polar_fold \
                or not 1 <= int(self.polar_fold) <= MAX_POLAR_FOLD:
            raise ValueError(f"polar_fold must be a whole number of panels from 1 to {MAX_POLAR_FOLD}, got {self.polar_fold!r}")
        fold = int(self.polar_fold) if self.polar else 1  # without polar there is nothing to fold
        if self.image_size % fold:
            raise ValueError(f"polar_fold {fold} needs an image_size it divides, got {self.image_size}")
        object.__setattr__(self, "polar_fold", fold)
        _seam_start(self.polar_seam)  # refuses an unknown seam
        # Without polar there is no seam: keep the default so equal preprocessings compare equal.
        object.__setattr__(self, "polar_seam", self.polar_seam if self.polar else "back")
        midline = self.polar_midline
        if isinstance(midline, bool) or not isinstance(midline, int | float) \
                or not 1.0 <= float(midline) <= MAX_POLAR_MIDLINE:
            raise ValueError(f"polar_midline must be a number from 1 to {MAX_POLAR_MIDLINE}, got {midline!r}")
        object.__setattr__(self, "polar_midline", float(midline) if self.polar else 1.0)

    @property
    def channels(self) -> int:
        """Channels of one prepared slice (its windows)."""
        return self.windows.channels

    @property
    def slices(self) -> int:
        """Slices in one model input: the slice and ``context`` neighbours on each side."""
        return 2 * self.context + 1

    @property
    def input_channels(self) -> int:
        """Channels of the model's input: every window of every slice in the stack."""
        return self.channels * self.slices

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """HU slice (H, W) -> uint8 (C, image_size, image_size)."""
        hu = np.asarray(hu)
        if hu.ndim != 2:
            raise ValueError(f"expected a 2-D HU slice, got shape {hu.shape}")
        ring = find_skull_ring(hu) if self.head_crop else None
        return self.apply_at(hu, self.geometry(hu.shape, ring))

    def apply_at(self, hu: np.ndarray, geometry: InputGeometry) -> np.ndarray:
        """The same, with the slice's geometry already found (``geometry(hu.shape, ring)``), for a caller
        that keeps the ring and the geometry too (the Predictor: its not-a-head check, Grad-CAM's way back)."""
        if geometry.box is not None:
            hu = crop_box(hu, *geometry.box)
        if self.polar:
            hu = polar_slice(hu, self.image_size, self.polar_overlap, geometry.ellipse, geometry.trace, self.polar_fold,
                             self.polar_seam, self.polar_midline)
        return prepare_slice(hu, self.image_size, self.windows)

    def geometry(self, shape: tuple[int, ...], ring: HeadRing | None) -> InputGeometry:
        """Where this preprocessing takes a slice of ``shape`` from, given its ring (see ``apply``)."""
        h, w = int(shape[0]), int(shape[1])
        if self.head_crop and ring is not None:
            box = head_box(ring, (h, w), self.crop_margin, self.crop_min_side, self.crop_stretch)
            trace = inner_table(ring, box, self.crop_stretch) if self.polar_trace else None
            return InputGeometry((h, w), box, self.polar, self.polar_overlap, ellipse=self.crop_stretch, trace=trace,
                                 polar_fold=self.polar_fold, polar_seam=self.polar_seam,
                                 polar_midline=self.polar_midline)
        return InputGeometry((h, w), None, self.polar, self.polar_overlap, polar_fold=self.polar_fold,
                             polar_seam=self.polar_seam, polar_midline=self.polar_midline)

    def per_slice(self) -> SlicePrep:
        """This preprocessing without the context: what one slice's cache entry holds."""
        return replace(self, context=0)

    def key(self) -> str:
        """A short stable string naming one slice's preprocessing, for cache folder names (without
        ``context``: the stack is assembled from per-slice entries, so every context shares a cache)."""
        crop = f"-crop{self.crop_margin:g}m{self.crop_min_side:g}{'s' if self.crop_stretch else ''}" if self.head_crop else ""
        polar = (f"-polar{self.polar_overlap:g}" if self.polar_overlap else "-polar") if self.polar else ""
        polar += "-trace" if self.polar_trace else ""
        polar += f"-fold{self.polar_fold}" if self.polar_fold > 1 else ""
        polar += f"-seam{self.polar_seam}" if self.polar_seam != "back" else ""
        polar += f"-mid{self.polar_midline:g}" if self.polar_midline != 1.0 else ""
        return f"{self.image_size}px-{self.windows.key()}{crop}{polar}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PREPROCESS_VERSION, "image_size": self.image_size, "windows": self.windows.to_list(),
            "head_crop": self.head_crop, "crop_margin": self.crop_margin, "crop_min_side": self.crop_min_side,
            "context": self.context, "polar": self.polar, "polar_overlap": self.polar_overlap,
            "crop_stretch": self.crop_stretch, "polar_trace": self.polar_trace, "polar_fold": self.polar_fold,
            "polar_seam": self.polar_seam, "polar_midline": self.polar_midline,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SlicePrep:
        """From ``to_dict`` output; a mapping without crop fields (older checkpoints) means no crop."""
        return cls(
            image_size=int(values["image_size"]),
            windows=values["windows"] if isinstance(values["windows"], WindowStack)
            else WindowStack.from_list(values["windows"]),
            head_crop=bool(values.get("head_crop", False)),
            crop_margin=float(values.get("crop_margin", 0.08)),
            crop_min_side=float(values.get("crop_min_side", 0.4)),
            context=int(values.get("context", 0)),
            polar=bool(values.get("polar", False)),
            polar_overlap=float(values.get("polar_overlap", 0.0)),
            crop_stretch=bool(values.get("crop_stretch", False)),
            polar_trace=bool(values.get("polar_trace", False)),
            polar_fold=int(values.get("polar_fold", 1)),
            polar_seam=str(values.get("polar_seam", "back")),
            polar_midline=float(values.get("polar_midline", 1.0)),
        )


def context_positions(n: int, context: int) -> np.ndarray:
    """(n, 2 context + 1) positions in a z-sorted series of ``n`` slices: for each slice, the slices
    ``-context .. +context`` away, with the first and last slice repeated past the series' ends (as the
    top RSNA 2019 solutions did). Position ``context`` of each row is the slice itself."""
    if n < 1:
        return np.zeros((0, 2 * context + 1), dtype=np.int64)
    offsets = np.arange(-context, context + 1, dtype=np.int64)
    return np.clip(np.arange(n, dtype=np.int64)[:, None] + offsets[None, :], 0, n - 1)


def stack_context(slices: list[np.ndarray] | tuple[np.ndarray, ...]) -> np.ndarray:
    """Prepared slices (each (C, S, S)) in z order, lowest first, -> one model input (C len, S, S)."""
    return np.ascontiguousarray(np.concatenate(list(slices), axis=0))


def centre_channels(image: np.ndarray | torch.Tensor, channels: int) -> np.ndarray | torch.Tensor:
    """The centre slice's ``channels`` of a stacked input or aligned image (.., C (2k + 1), S, S): what a
    person looks at. An image of ``channels`` channels is returned as it is."""
    total = image.shape[-3]
    if total == channels:
        return image
    if total % channels or (total // channels) % 2 == 0:
        raise ValueError(f"{total} channels are not an odd number of {channels}-channel slices")
    start = (total // channels // 2) * channels
    return image[..., start : start + channels, :, :]


def to_tensor(prepared: np.ndarray) -> torch.Tensor:
    """uint8 (C, S, S) -> float32 tensor in [0, 1], the model's input contract."""
    return torch.from_numpy(np.ascontiguousarray(prepared)).float().div_(255.0)
