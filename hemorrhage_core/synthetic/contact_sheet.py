"""A contact sheet of the phantom population: every hemorrhage type, clear and subtle, healthy slices,
and bone / subdural window tiles, each titled with its labels. For looking, not for training."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemorrhage_core.labels import SHORT_NAMES, SUBTYPES
from hemorrhage_core.synthetic.dataset import plan_series
from hemorrhage_core.synthetic.phantom import PhantomConfig, render_slice, sample_patient
from hemorrhage_core.windowing import PRESETS, Window

# Contour colours of the blood-mask overlay tiles.
_COLOURS = {
    "epidural": "#ff3b30",
    "intraparenchymal": "#ffcc00",
    "intraventricular": "#34c759",
    "subarachnoid": "#0a84ff",
    "subdural": "#ff2dff",
}
_SCAN_SIZE = 128  # slices are scanned small to find examples, then rendered at full size


@dataclass(frozen=True)
class Tile:
    patient: int
    slice_index: int
    window: Window
    note: str = ""
    overlay: bool = False


def _scan(seed: int, patients: int, slices: int, config: PhantomConfig) -> list[tuple[int, int, dict, dict]]:
    """(patient, slice, labels, blood area by subtype) for every slice, rendered small."""
    found = []
    for p in range(patients):
        patient = sample_patient(seed, p, slices, config)
        for s in range(slices):
            r = render_slice(patient, s, size=_SCAN_SIZE, config=config)
            found.append((p, s, r.labels, {k: int(v.sum()) for k, v in r.blood.items()}))
    return found


def choose_tiles(seed: int, patients: int, slices: int, config: PhantomConfig | None = None) -> list[Tile]:
    """Pick examples: per type a clear and a subtle one, multi-type, healthy, and window variants."""
    config = config or PhantomConfig()
    found = _scan(seed, patients, slices, config)
    brain, subdural, bone = PRESETS["brain"], PRESETS["subdural"], PRESETS["bone"]
    tiles: list[Tile] = []
    used: set[tuple[int, int]] = set()

    def add(p: int, s: int, window: Window = brain, note: str = "", overlay: bool = False) -> None:
        tiles.append(Tile(p, s, window, note, overlay))
        used.add((p, s))

    for name in SUBTYPES:
        only = [f for f in found if f[2][name] and sum(f[2][k] for k in SUBTYPES) == 1]
        pool = sorted(only or [f for f in found if f[2][name]], key=lambda f: f[3][name])
        if pool:
            add(pool[-1][0], pool[-1][1], note="clear")
            small = [f for f in pool if (f[0], f[1]) not in used]
            if small:
                # The 20th percentile by blood area: small and subtle, yet visible in a thumbnail.
                pick = small[len(small) // 5]
                add(pick[0], pick[1], note="subtle")
    multi = sorted(
        (f for f in found if sum(f[2][k] for k in SUBTYPES) >= 2),
        key=lambda f: -sum(f[2][k] for k in SUBTYPES),
    )
    for f in multi[:2]:
        add(f[0], f[1], note="2+ types")
    if multi:
        add(multi[0][0], multi[0][1], note="blood masks", overlay=True)
    healthy = [f for f in found if not f[2]["any"]]
    for f in healthy[:: max(1, len(healthy) // 4)][:4]:
        add(f[0], f[1], note="healthy")
    edh = [t for t in tiles if t.note == "clear" and found[t.patient * slices + t.slice_index][2]["epidural"]]
    bone_source = edh[0] if edh else tiles[0]
    add(bone_source.patient, bone_source.slice_index, bone, note="bone window")
    sdh = [
        t for t in tiles if t.note == "subtle" and found[t.patient * slices + t.slice_index][2]["subdural"]
    ]
    if sdh:
        add(sdh[0].patient, sdh[0].slice_index, subdural, note="subdural window")
    return tiles


def _head_box(hu: np.ndarray, margin: int = 6) -> tuple[slice, slice]:
    """Square crop around the head (everything denser than air), so tiles show anatomy, not air."""
    rows = np.flatnonzero((hu > -500).any(axis=1))
    cols = np.flatnonzero((hu > -500).any(axis=0))
    if rows.size == 0:
        return slice(None), slice(None)
    half = (max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1) // 2 + margin
    rc, cc = (rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2
    n = hu.shape[0]
    r0, c0 = min(max(0, rc - half), max(0, n - 2 * half)), min(max(0, cc - half), max(0, n - 2 * half))
    return slice(r0, r0 + 2 * half), slice(c0, c0 + 2 * half)


def write_contact_sheet(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    patients: int = 60,
    slices_per_patient: int = 10,
    size: int = 512,
    config: PhantomConfig | None = None,
    columns: int = 5,
) -> Path:
    """Render the contact sheet of the population (``seed``, ``patients``, ...) to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    config = config or PhantomConfig()
    tiles = choose_tiles(seed, patients, slices_per_patient, config)
    plans = plan_series(seed, patients, slices_per_patient, config)
    rows = -(-len(tiles) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.45 * rows), facecolor="black")
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(rows, columns, i + 1)
        patient = sample_patient(seed, tile.patient, slices_per_patient, config)
        r = render_slice(patient, tile.slice_index, size=size, config=config)
        crop = _head_box(r.hu)
        ax.imshow(tile.window.apply(r.hu[crop]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
        if tile.overlay:
            for name, mask in r.blood.items():
                if mask.any():
                    ax.contour(
                        mask[crop].astype(np.float32), levels=[0.5], colors=_COLOURS[name], linewidths=0.9
                    )
        kinds = [SHORT_NAMES[k] for k in SUBTYPES if r.labels[k]]
        label = "+".join(kinds) if kinds else "no hemorrhage"
        iid = plans[tile.patient].image_ids[tile.slice_index]
        ax.set_title(f"{label}\n{iid}: {tile.note}, {tile.window.name}", color="white", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        f"Synthetic head-CT phantoms (seed {seed}): titles are the slice labels", color="white", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    return out
