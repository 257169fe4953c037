"""Static figures for the HTML report: matplotlib drawn to SVG ``data:`` URIs (no Shiny, no files).

An ``<img src="data:image/svg+xml;base64,...">`` needs no script and no network, prints sharply and
keeps the report one file. Text stays text (``svg.fonttype = none``), so the file is small; the ids
matplotlib writes are salted with a constant, so the same data give the same bytes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from hemorrhage_core import metrics
from hemorrhage_core.calibration import ECE_BINS, reliability
from hemorrhage_core.labels import LABELS
from hemorrhage_core.plots import LABEL_COLORS

# Enough points for a curve that looks exact at report size; an RSNA-size ROC has ~10^5 points.
MAX_CURVE_POINTS = 1500
_RC = {"svg.fonttype": "none", "svg.hashsalt": "hemorrhage-report", "font.size": 9}


def svg_data_uri(fig: Figure) -> str:
    """The figure as a base64 ``data:image/svg+xml`` URI (deterministic: no date, fixed ids)."""
    buf = io.BytesIO()
    with rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_CURVE_POINTS points of a curve, the first and last kept."""
    if len(x) <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def roc_svg(frame: pd.DataFrame, title: str, labels: Sequence[str] = LABELS) -> str:
    """Per-class ROC curves of a predictions frame, AUC in the legend; a one-class label is 'n/a'."""
    with rc_context(_RC):
        fig = Figure(figsize=(4.6, 3.9))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#aaaaaa", linestyle=":", linewidth=1)
        for label in labels:
            curve = metrics.roc_curve(frame[f"true_{label}"].to_numpy(int), frame[f"prob_{label}"].to_numpy(float))
            color = LABEL_COLORS[label]
            if curve is None:
                ax.plot([], [], color=color, linestyle="--", label=f"{label} (n/a: one class)")
                continue
            x, y = _thin(curve.fpr, curve.tpr)
            ax.plot(x, y, color=color, linewidth=1.6, label=f"{label} (AUC {curve.auc:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)", title=title)
        ax.title.set_fontsize(9.5)
        ax.legend(loc="lower right", fontsize=7.5, frameon=True)
        ax.grid(alpha=0.25)
        return svg_data_uri(fig)


def reliability_svg(raw: pd.DataFrame, calibrated: pd.DataFrame | None, title: str) -> str:
    """Reliability diagrams, one panel per label: the model's probabilities (grey, dashed) and, when
    the run is calibrated, the calibrated ones (colour); marker area follows the bin's image count."""
    with rc_context(_RC):
        fig = Figure(figsize=(8.6, 5.2))
        axes = fig.subplots(2, 3, sharex=True, sharey=True)
        sides: list[tuple[str, pd.DataFrame, dict]] = [("model", raw, {"color": "#777777", "linestyle": "--"})]
        if calibrated is not None:
            sides.append(("calibrated", calibrated, {}))
        for ax, label in zip(axes.ravel(), LABELS, strict=True):
            ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", linewidth=1)
            truth = raw[f"true_{label}"].to_numpy(int)
            for name, frame, style in sides:
                rel = reliability(truth, frame[f"prob_{label}"].to_numpy(float), n_bins=ECE_BINS)
                used = rel.count > 0
                color = style.get("color", LABEL_COLORS[label])
                ece = "n/a" if rel.ece is None else f"{rel.ece:.3f}"
                ax.plot(rel.mean_predicted[used], rel.fraction_positive[used], color=color,
                        linestyle=style.get("linestyle", "-"), linewidth=1.3, label=f"{name} (ECE {ece})")
                sizes = 12 + 60 * rel.count[used] / max(1, rel.count.max())
                ax.scatter(rel.mean_predicted[used], rel.fraction_positive[used], s=sizes, color=color, zorder=3)
            ax.set_title(label, fontsize=9)
            ax.set(xlim=(0, 1), ylim=(0, 1))
            ax.grid(alpha=0.25)
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        for ax in axes[-1]:
            ax.set_xlabel("mean predicted probability")
        for ax in axes[:, 0]:
            ax.set_ylabel("fraction positive")
        fig.suptitle(title, fontsize=10)
        return svg_data_uri(fig)


def difference_svg(rows: Mapping[str, Mapping], title: str, name_a: str, name_b: str) -> str:
    """Forest plot of AUC(A) - AUC(B) per label with its bootstrap interval; untestable labels are skipped."""
    with rc_context(_RC):
        fig = Figure(figsize=(5.6, 2.9))
        ax = fig.add_subplot()
        shown = [(label, row) for label, row in rows.items() if row.get("diff") is not None]
        for i, (label, row) in enumerate(shown):
            low, high = row["ci"]
            color = LABEL_COLORS.get(label, "#333333")
            if low is not None and high is not None:
                ax.plot([low, high], [i, i], color=color, linewidth=2)
            ax.plot([row["diff"]], [i], marker="o", color=color)
        ax.axvline(0.0, color="#888888", linewidth=1, linestyle=":")
        ax.set_yticks(range(len(shown)), [label for label, _ in shown])
        ax.invert_yaxis()
        ax.set_xlabel(f"AUC difference ({name_a} minus {name_b}), 95% interval")
        ax.set_title(title, fontsize=9.5)
        ax.grid(axis="x", alpha=0.25)
        return svg_data_uri(fig)
