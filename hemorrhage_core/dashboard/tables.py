"""Pure table builders behind the panels (pandas + hemorrhage_core.metrics; no Shiny, no files)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.labels import LABELS
from hemorrhage_core.plots import params_label as params_text
from hemorrhage_core.runs import RunSummary

# 1.96: the normal quantile for a two-sided 95% interval (used only for unpaired comparisons).
_Z95 = 1.959963984540054

OUTCOMES: tuple[str, ...] = ("all", "correct", "false positive", "false negative")


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h 02m``; ``75`` -> ``1m 15s``; None -> ``""``."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


RUNS_TABLE_COLUMNS: tuple[str, ...] = (
    "run",
    "kind",
    "backbone",
    "stage",
    "images (train/val)",
    "status",
    "epoch",
    "best epoch",
    "best AUC (mean)",
    "best AUC (any)",
    "weighted log loss",
    "duration",
    "started (UTC)",
    "note",
)


# The runs table shows the start of a failure note; the run's details show all of it.
NOTE_CHARS = 90


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def runs_table(summaries: Iterable[RunSummary]) -> pd.DataFrame:
    """One display row per run, in the given order (newest first from RunIndex.snapshot)."""
    rows = []
    for s in summaries:
        images = ""
        if s.n_images is not None:
            images = f"{s.n_images}"
            if s.n_train is not None and s.n_val is not None:
                images += f" ({s.n_train}/{s.n_val})"
        epoch = ""
        if s.last_epoch is not None:
            epoch = f"{s.last_epoch}" + (f"/{s.epochs_planned}" if s.epochs_planned else "")
        rows.append(
            {
                "run": s.path.name,
                "kind": s.kind or "",
                "backbone": s.backbone or "",
                "stage": "" if s.stage is None else str(s.stage),
                "images (train/val)": images,
                "status": s.status,
                "epoch": epoch,
                "best epoch": "" if s.best_epoch is None else str(s.best_epoch),
                "best AUC (mean)": _round(s.best_auc_mean),
                "best AUC (any)": _round(s.best_auc_any),
                "weighted log loss": _round(s.best_weighted_log_loss),
                "duration": format_duration(s.duration_s),
                "started (UTC)": (s.created or "").replace("T", " ").rstrip("Z"),
                "note": _shorten(s.reason or "", NOTE_CHARS),
            }
        )
    return pd.DataFrame(rows, columns=list(RUNS_TABLE_COLUMNS))


# ------------------------------------------------------------------------------ predictions helpers
def label_arrays(predictions: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(truth int array, probability float array) of one label, rows with a missing value dropped."""
    frame = predictions[[f"true_{label}", f"prob_{label}"]].apply(pd.to_numeric, errors="coerce").dropna()
    return frame.iloc[:, 0].to_numpy(dtype=int), frame.iloc[:, 1].to_numpy(dtype=float)


def threshold_table(result: metrics.ThresholdMetrics) -> pd.DataFrame:
    """The threshold panel's numbers as a two-column table (measure, value)."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    rows = [
        ("sensitivity (recall)", pct(result.sensitivity)),
        ("specificity", pct(result.specificity)),
        ("PPV (precision)", pct(result.ppv)),
        ("NPV", pct(result.npv)),
        ("accuracy", pct(result.accuracy)),
        ("true positives", str(result.tp)),
        ("false positives", str(result.fp)),
        ("true negatives", str(result.tn)),
        ("false negatives", str(result.fn)),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"])


# ------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Comparison:
    """Per-label AUCs of two runs with intervals and their difference (see comparison_table)."""

    table: pd.DataFrame
    paired: bool
    n_images_a: int
    n_images_b: int
    n_common: int


def comparison_table(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    *,
    labels: Sequence[str] = LABELS,
    n_resamples: int = 1000,
    seed: int = 0,
    min_overlap: float = 0.9,
) -> Comparison:
    """AUC of each label for runs A and B with patient-bootstrap intervals, and the difference A - B.

    When the two runs were validated on (nearly) the same images (shared ids cover ``min_overlap``
    of both sets), the comparison is paired on the shared images (``bootstrap_auc_difference``).
    Otherwise each run keeps its own validation set and the difference's interval combines the two
    intervals as independent normal errors, which is an approximation and is reported as unpaired.
    """
    a = pred_a.drop_duplicates("image_id").set_index("image_id")
    b = pred_b.drop_duplicates("image_id").set_index("image_id")
    common = a.index.intersection(b.index)
    paired = len(common) > 0 and len(common) >= min_overlap * max(len(a), len(b))
    rows = []
    for label in labels:
        row = {"label": label}
        if paired:
            ta, pa = (
                a.loc[common, f"true_{label}"].to_numpy(dtype=int),
                a.loc[common, f"prob_{label}"].to_numpy(float),
            )
            pb = b.loc[common, f"prob_{label}"].to_numpy(dtype=float)
            patients = a.loc[common, "patient"].astype(str).to_numpy()
            ci_a = metrics.bootstrap_auc(ta, pa, patients, n_resamples=n_resamples, seed=seed)
            ci_b = metrics.bootstrap_auc(ta, pb, patients, n_resamples=n_resamples, seed=seed)
            diff = metrics.bootstrap_auc_difference(ta, pa, pb, patients, n_resamples=n_resamples, seed=seed)
            row.update(_interval_cols(ci_a, "a"), **_interval_cols(ci_b, "b"))
            row.update(
                diff=_nan(diff and diff.difference),
                diff_lo=_nan(diff and diff.low),
                diff_hi=_nan(diff and diff.high),
                p_value=_nan(diff and diff.p_value),
            )
        else:
            ci_a = _own_interval(a, label, n_resamples, seed)
            ci_b = _own_interval(b, label, n_resamples, seed)
            row.update(_interval_cols(ci_a, "a"), **_interval_cols(ci_b, "b"))
            row.update(_unpaired_difference(ci_a, ci_b), p_value=float("nan"))
        rows.append(row)
    columns = [
        "label",
        "auc_a",
        "lo_a",
        "hi_a",
        "auc_b",
        "lo_b",
        "hi_b",
        "diff",
        "diff_lo",
        "diff_hi",
        "p_value",
    ]
    return Comparison(pd.DataFrame(rows, columns=columns), paired, len(a), len(b), len(common))


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _own_interval(frame: pd.DataFrame, label: str, n_resamples: int, seed: int) -> metrics.AucInterval | None:
    truth = frame[f"true_{label}"].to_numpy(dtype=int)
    prob = frame[f"prob_{label}"].to_numpy(dtype=float)
    return metrics.bootstrap_auc(
        truth, prob, frame["patient"].astype(str).to_numpy(), n_resamples=n_resamples, seed=seed
    )


def _interval_cols(ci: metrics.AucInterval | None, suffix: str) -> dict[str, float]:
    if ci is None:
        return {f"auc_{suffix}": math.nan, f"lo_{suffix}": math.nan, f"hi_{suffix}": math.nan}
    return {f"auc_{suffix}": ci.auc, f"lo_{suffix}": _nan(ci.low), f"hi_{suffix}": _nan(ci.high)}


def _unpaired_difference(
    ci_a: metrics.AucInterval | None, ci_b: metrics.AucInterval | None
) -> dict[str, float]:
    if ci_a is None or ci_b is None or None in (ci_a.low, ci_a.high, ci_b.low, ci_b.high):
        return {"diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan}
    se_a = (ci_a.high - ci_a.low) / (2 * _Z95)
    se_b = (ci_b.high - ci_b.low) / (2 * _Z95)
    diff = ci_a.auc - ci_b.auc
    half = _Z95 * math.sqrt(se_a**2 + se_b**2)
    return {"diff": diff, "diff_lo": diff - half, "diff_hi": diff + half}


# ---------------------------------------------------------------------------------------- gallery
def gallery_outcomes(frame: pd.DataFrame, label: str | None, threshold: float = 0.5) -> pd.Series:
    """Each gallery row's outcome at ``threshold``: correct, false positive or false negative.

    With ``label`` None every label counts: a row is a false negative if any label is missed, else a
    false positive if any label is wrongly called, else correct.
    """
    labels = LABELS if label is None else (label,)
    truth = np.stack([frame[f"true_{lb}"].to_numpy(dtype=float) for lb in labels], axis=1) > 0.5
    called = np.stack([frame[f"prob_{lb}"].to_numpy(dtype=float) for lb in labels], axis=1) >= threshold
    missed = (truth & ~called).any(axis=1)
    wrong = (~truth & called).any(axis=1)
    outcome = np.where(missed, "false negative", np.where(wrong, "false positive", "correct"))
    return pd.Series(outcome, index=frame.index, name="outcome")


def filter_gallery(
    frame: pd.DataFrame, *, label: str | None, outcome: str, threshold: float = 0.5
) -> pd.DataFrame:
    """Gallery rows showing ``label`` (truly positive or called positive; all rows for None) with ``outcome``."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    out = frame.assign(outcome=gallery_outcomes(frame, label, threshold))
    if label is not None:
        shows = (out[f"true_{label}"].astype(float) > 0.5) | (out[f"prob_{label}"].astype(float) >= threshold)
        if outcome in ("all", "correct"):
            out = out[shows]
        # A false positive / negative for the label is already about that label.
    if outcome != "all":
        out = out[out["outcome"] == outcome]
    return out


def parse_theta(text: object) -> np.ndarray | None:
    """The gallery's ``theta`` cell ("a b c d e f") as a 2x3 array, or None when unreadable."""
    try:
        values = [float(v) for v in str(text).split()]
    except ValueError:
        return None
    return np.array(values).reshape(2, 3) if len(values) == 6 and all(map(math.isfinite, values)) else None


# ------------------------------------------------------------------------------------ grid search
def grid_table(results: pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
    """Grid results in reading order (rank, parameters, mean ± std, per-split scores) and the best row.

    ``params`` holds JSON text (as RunWriter writes it); it becomes ``key=value`` text for display.
    """
    if results is None or results.empty:
        return pd.DataFrame(), None
    frame = results.copy()
    if "params" in frame:
        frame["params"] = [params_text(p) for p in frame["params"]]
    splits = sorted(
        (c for c in frame.columns if c.startswith("split") and c.endswith("_test_score")),
        key=lambda c: int("".join(ch for ch in c if ch.isdigit()) or 0),
    )
    ordered = [c for c in ("rank_test_score", "params", "mean_test_score", "std_test_score") if c in frame]
    ordered += splits + [c for c in ("mean_fit_time",) if c in frame]
    frame = frame[ordered]
    names = {
        "rank_test_score": "rank",
        "params": "parameters",
        "mean_test_score": "mean score",
        "std_test_score": "std",
        "mean_fit_time": "mean fit time (s)",
    }
    names.update({c: f"fold {i + 1}" for i, c in enumerate(splits)})
    for c in frame.columns:
        if pd.api.types.is_float_dtype(frame[c]):
            frame[c] = frame[c].round(4)
    if "rank_test_score" in frame:
        frame = frame.sort_values("rank_test_score", kind="stable").reset_index(drop=True)
        best = int(frame["rank_test_score"].idxmin())
    elif "mean_test_score" in frame:
        best = int(frame["mean_test_score"].idxmax())
    else:
        best = None
    return frame.rename(columns=names), best
