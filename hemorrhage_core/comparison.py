"""Paired comparison of two runs evaluated on the same images: per-label AUC difference, a patient
bootstrap interval, DeLong's test for correlated ROC curves (clustered by patient, Obuchowski 1997)
and Holm's adjustment over the six labels.

Slice level resamples patients (a drawn patient brings all their slices); study level compares one row
per series (the maximum over its slices) and resamples patients too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.evaluations import TRUE_COLUMNS, arrays, study_frame
from hemorrhage_core.labels import LABELS
from hemorrhage_core.stats import delong_test, holm

CONFIDENCE = 0.95
N_RESAMPLES = 1000


class ComparisonError(HemorrhageError):
    """Two evaluations that cannot be compared pairwise (no shared image, conflicting labels)."""


def paired_frames(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of two predictions frames for the images both hold, in the same order.

    ComparisonError when they share no image, or when the shared images' labels disagree (then they
    are not the same data set and a paired test would be meaningless).
    """
    shared = np.intersect1d(a["image_id"].astype(str).unique(), b["image_id"].astype(str).unique())
    if not len(shared):
        raise ComparisonError(
            "the two evaluations share no image: evaluate both runs on the same data set "
            "(the pipeline's held-out test set, or `evaluate --save NAME` on one folder)"
        )
    pa = a.drop_duplicates("image_id").set_index("image_id").loc[shared].reset_index()
    pb = b.drop_duplicates("image_id").set_index("image_id").loc[shared].reset_index()
    differ = (pa[TRUE_COLUMNS].to_numpy() != pb[TRUE_COLUMNS].to_numpy()).any(axis=1)
    if differ.any():
        raise ComparisonError(
            f"the two evaluations give different labels for {int(differ.sum())} of {len(shared)} shared "
            "images: they do not come from the same data set"
        )
    return pa, pb


def _label_rows(
    t: np.ndarray, pa: np.ndarray, pb: np.ndarray, patients: np.ndarray, *, n_resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(LABELS):
        test = delong_test(t[:, j], pa[:, j], pb[:, j], clusters=patients)
        boot = metrics.bootstrap_auc_difference(
            t[:, j], pa[:, j], pb[:, j], patients, n_resamples=n_resamples, confidence=CONFIDENCE, seed=seed
        )
        # AUCs are shown whenever defined; the test needs two patients on each side.
        auc_a, auc_b = metrics.roc_auc(t[:, j], pa[:, j]), metrics.roc_auc(t[:, j], pb[:, j])
        rows[label] = {
            "auc_a": auc_a,
            "auc_b": auc_b,
            "diff": None if auc_a is None or auc_b is None else auc_a - auc_b,
            # A resample without the one positive patient has no AUC: no honest interval either.
            "ci": [None, None] if boot is None or test is None else [boot.low, boot.high],
            "p_value": None if test is None else test.p_value,
            "positives": int(t[:, j].sum()),
        }
    adjusted = holm({label: row["p_value"] for label, row in rows.items()})
    for label, row in rows.items():
        row["p_holm"] = adjusted[label]
    return rows


def paired_comparison(
    a: pd.DataFrame, b: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Compare run A's and run B's predictions (PREDICTION_COLUMNS frames) on their shared images.

    Returns ``{"paired": True, "n_images", "n_patients", "n_studies", "labels": {label: {"auc_a", "auc_b",
    "diff" (A minus B), "ci" [low, high] (95% patient bootstrap of the difference), "p_value" (DeLong),
    "p_holm" (Holm over the six labels), "positives"}}, "study": {"n_studies", "n_patients", "labels":
    {...the same...}}, "method": {...}}``. A label with one class only has None values; one whose
    positives (or negatives) come from a single patient keeps its AUCs but has no p-value.
    """
    fa, fb = paired_frames(a, b)
    t, pa = arrays(fa)
    _, pb = arrays(fb)
    patients = fa["patient"].astype(str).to_numpy()
    out: dict[str, Any] = {
        "paired": True,
        "n_images": len(fa),
        "n_patients": int(len(np.unique(patients))),
        "n_studies": int(fa["series"].nunique()),
        "labels": _label_rows(t, pa, pb, patients, n_resamples=n_resamples, seed=seed),
    }
    sa, sb = study_frame(fa), study_frame(fb)
    st, spa = arrays(sa)
    _, spb = arrays(sb)
    out["study"] = {
        "n_studies": len(sa),
        "n_patients": int(sa["patient"].nunique()),
        "labels": _label_rows(st, spa, spb, sa["patient"].astype(str).to_numpy(), n_resamples=n_resamples, seed=seed),
    }
    out["method"] = {
        "ci": f"{int(CONFIDENCE * 100)}% percentile bootstrap of AUC(A) - AUC(B), {n_resamples} resamples of patients (seed {seed})",
        "p_value": "DeLong's test for two correlated ROC curves (two-sided), with Obuchowski's (1997) "
                   "clustered variance: a patient's slices count as one draw",
        "p_holm": "Holm's step-down adjustment over the labels with a p-value",
        "study": "one row per series: the maximum over its slices of each truth and probability",
    }
    return out


def significant(row: dict[str, Any], alpha: float = 0.05) -> bool | None:
    """Whether a label's difference is significant after Holm's adjustment (None when untestable)."""
    p = row.get("p_holm")
    return None if p is None else bool(p < alpha)


def summary_sentences(result: dict[str, Any], name_a: str, name_b: str, *, level: str = "slice") -> list[str]:
    """Plain-language reading of a paired comparison: which differences hold after adjustment."""
    rows = result["labels"] if level == "slice" else result["study"]["labels"]
    n = result["n_images"] if level == "slice" else result["study"]["n_studies"]
    unit = "images" if level == "slice" else "series"
    out = [f"Paired on the same {n} {unit} of {result['n_patients']} patients ({level} level)."]
    better, worse, tied, untestable = [], [], [], []
    for label, row in rows.items():
        verdict = significant(row)
        if verdict is None:
            untestable.append(label)
        elif not verdict:
            tied.append(label)
        elif row["diff"] > 0:
            better.append(label)
        else:
            worse.append(label)
    if better:
        out.append(f"{name_a} has the higher AUC for {', '.join(better)} (Holm-adjusted p < 0.05).")
    if worse:
        out.append(f"{name_b} has the higher AUC for {', '.join(worse)} (Holm-adjusted p < 0.05).")
    if tied:
        out.append(
            f"No significant difference for {', '.join(tied)}: these data cannot tell the two models apart there."
        )
    if untestable:
        out.append(
            f"Not testable ({', '.join(untestable)}): one class only, or all positives from one patient."
        )
    return out
