"""How much a recipe's AUCs move between training seeds, and whether one recipe beats another beyond it.

A paired test of two runs (hemorrhage_core.comparison) says how far the test images alone could move a
difference. Runs of one recipe at other training seeds (initialisation, order, validation split) move
the thin labels further than that on the quick recipe (docs/model-card.md), so a claim about a recipe
needs its spread over seeds, and a claim that one recipe beats another needs a difference larger than
that spread: per label the mean difference of the two groups' AUCs with a t interval over the runs,
paired by training seed when both groups ran the same seeds, else Welch's. Every run must be scored
on the same images, so the spread is the training's and not the test set's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.evaluations import arrays
from hemorrhage_core.labels import LABELS, SUBTYPES

CONFIDENCE = 0.95


class SeedSpreadError(HemorrhageError):
    """Runs that cannot be summarised together (too few, or scored on different images)."""


def parse_bars(specs: Sequence[str]) -> dict[str, float]:
    """``["any=0.95", "subtypes=0.90"]`` -> a minimum AUC per label (``subtypes`` names all five)."""
    bars: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        try:
            bar = float(value)
        except ValueError:
            bar = float("nan")
        if not sep or not 0.0 <= bar <= 1.0:
            raise SeedSpreadError(f"a bar is LABEL=AUC with an AUC in [0, 1], got {spec!r}")
        names = SUBTYPES if name == "subtypes" else (name,)
        if names[0] not in LABELS:
            raise SeedSpreadError(f"no label {name!r} to set a bar on: {', '.join(LABELS)} or subtypes")
        bars.update(dict.fromkeys(names, bar))
    return bars


def run_aucs(frames: Sequence[pd.DataFrame]) -> np.ndarray:
    """(runs, 6) AUC per label of each predictions frame (NaN where a label has one class only).

    SeedSpreadError unless every frame holds the same images with the same labels.
    """
    if not frames:
        raise SeedSpreadError("no run to summarise")
    reference = _truth(frames[0])
    rows = []
    for i, frame in enumerate(frames):
        truth = _truth(frame)
        if not truth.index.equals(reference.index):
            raise SeedSpreadError(
                f"run {i + 1} was scored on other images than run 1 ({len(truth)} against {len(reference)}): "
                "evaluate every run on one data set (`evaluate --save NAME`, or the pipeline's test set)"
            )
        if not truth.equals(reference):
            raise SeedSpreadError(f"run {i + 1} labels the same images differently from run 1: not one data set")
        y_true, y_prob = arrays(frame)
        aucs = metrics.per_label_auc(y_true, y_prob)
        rows.append([np.nan if aucs[label] is None else aucs[label] for label in LABELS])
    return np.asarray(rows, dtype=np.float64)


def spread(aucs: np.ndarray, seeds: Sequence[int | None], bars: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per label mean, SD (n - 1), min and max over the runs, and the runs below each bar; with
    ``bars`` also which runs meet every bar."""
    bars = dict(bars or {})
    labels = {}
    for j, label in enumerate(LABELS):
        values = aucs[:, j][np.isfinite(aucs[:, j])]
        bar = bars.get(label)
        labels[label] = {
            "n": int(len(values)),
            "mean": _num(values.mean()) if len(values) else None,
            "sd": _num(values.std(ddof=1)) if len(values) > 1 else None,
            "min": _num(values.min()) if len(values) else None,
            "max": _num(values.max()) if len(values) else None,
            "bar": bar,
            "below": None if bar is None else int((values < bar).sum()),
        }
    runs = []
    for i, row in enumerate(aucs):
        missed = [label for j, label in enumerate(LABELS) if label in bars and not row[j] >= bars[label]]
        runs.append({"seed": seeds[i], "auc": {label: _num(row[j]) for j, label in enumerate(LABELS)},
                     "meets_bars": None if not bars else not missed, "missed": missed})
    return {"n_runs": len(aucs), "labels": labels, "runs": runs,
            "meet_bars": None if not bars else sum(bool(r["meets_bars"]) for r in runs)}


def seed_difference(
    aucs_a: np.ndarray, seeds_a: Sequence[int | None], aucs_b: np.ndarray, seeds_b: Sequence[int | None],
    *, confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Per label: mean AUC of A minus mean AUC of B, a t interval and p-value over the runs.

    Paired (one difference per training seed) when both groups ran the same distinct seeds, else Welch's
    unequal-variance test; at least two runs on each side.
    """
    from scipy import stats

    if len(aucs_a) < 2 or len(aucs_b) < 2:
        raise SeedSpreadError("a difference over training seeds needs at least two runs on each side")
    paired = _distinct(seeds_a) and _distinct(seeds_b) and set(seeds_a) == set(seeds_b)
    if paired:
        order_b = [list(seeds_b).index(seed) for seed in seeds_a]
        aucs_b = aucs_b[order_b]
    labels = {}
    for j, label in enumerate(LABELS):
        a, b = aucs_a[:, j], aucs_b[:, j]
        if paired:
            keep = np.isfinite(a) & np.isfinite(b)
            a, b = a[keep], b[keep]
            enough = len(a) >= 2
        else:
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            enough = len(a) >= 2 and len(b) >= 2
        if not enough:
            labels[label] = {"diff": None, "ci": [None, None], "p_value": None}
            continue
        diff = float(a.mean() - b.mean())
        if paired:
            d = a - b
            se, dof = d.std(ddof=1) / np.sqrt(len(d)), len(d) - 1
        else:
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            se = np.sqrt(va + vb)
            # Welch-Satterthwaite degrees of freedom; with no spread at all the difference is exact.
            dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else np.inf
        if se == 0:
            p_value = 1.0 if diff == 0 else 0.0
            ci = [diff, diff]
        else:
            p_value = float(2 * stats.t.sf(abs(diff) / se, dof))
            half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
            ci = [diff - half, diff + half]
        labels[label] = {"diff": _num(diff), "ci": [_num(ci[0]), _num(ci[1])], "p_value": _num(p_value)}
    return {"test": "paired by training seed" if paired else "Welch", "confidence": confidence, "labels": labels}


def _truth(frame: pd.DataFrame) -> pd.DataFrame:
    truth, _ = arrays(frame)
    ids = frame["image_id"].astype(str)
    if ids.duplicated().any():
        raise SeedSpreadError("an evaluation lists an image twice")
    return pd.DataFrame(truth, index=pd.Index(ids, name="image_id"), columns=list(LABELS)).sort_index()


def _distinct(seeds: Sequence[int | None]) -> bool:
    return None not in seeds and len(set(seeds)) == len(seeds)


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
