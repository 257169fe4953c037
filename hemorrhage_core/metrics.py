"""Evaluation metrics on plain arrays (numpy + scikit-learn only; no torch, no I/O).

Arrays follow ``LABELS`` order: ``y_true`` and ``y_prob`` are (N, 6) for the six labels, or (N,) for
one label. A metric that is undefined on the data (AUC when a label has one class only, a ratio with
an empty denominator) is ``None``, never NaN, so it serialises to JSON ``null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from hemorrhage_core.labels import LABEL_WEIGHTS, LABELS, STAGE1_CLASSES, SUBTYPES, stage1_class

# The RSNA metric clips probabilities away from 0 and 1 so one confident mistake stays finite.
PROB_CLIP = 1e-7
# Z-smoothing weights (previous, this, next slice) as used by one RSNA 2019 team.
ZSMOOTH_WEIGHTS: tuple[float, float, float] = (0.6, 1.8, 0.6)


# --------------------------------------------------------------------------------------------- checks
def _as_binary(y_true: np.ndarray | Sequence, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y_true)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return arr.astype(np.int64)


def _as_prob(y_prob: np.ndarray | Sequence, name: str = "y_prob") -> np.ndarray:
    arr = np.asarray(y_prob, dtype=np.float64)
    if arr.size and (not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must hold finite probabilities in [0, 1]")
    return arr


def _pair(y_true, y_prob, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_binary(y_true), _as_prob(y_prob)
    if t.shape != p.shape or t.ndim != ndim:
        raise ValueError(f"y_true {t.shape} and y_prob {p.shape} must have the same {ndim}-D shape")
    if ndim == 2 and t.shape[1] != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} columns in LABELS order, got {t.shape[1]}")
    return t, p


def _has_both_classes(y_true: np.ndarray) -> bool:
    return y_true.size > 0 and 0 < int(y_true.sum()) < y_true.size


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


# ------------------------------------------------------------------------------------- curves and AUC
@dataclass(frozen=True)
class RocCurve:
    """One label's ROC curve: false/true positive rates at decreasing thresholds, and its area."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


@dataclass(frozen=True)
class PrCurve:
    """One label's precision-recall curve and its average precision (sklearn's step-wise area)."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    average_precision: float


def roc_auc(y_true, y_prob) -> float | None:
    """ROC AUC of one label, or None when only one class is present."""
    t, p = _pair(y_true, y_prob, 1)
    if not _has_both_classes(t):
        return None
    return float(skm.roc_auc_score(t, p))


def roc_curve(y_true, y_prob) -> RocCurve | None:
    """ROC curve of one label, or None when only one class is present."""
    t, p = _pair(y_true, y_prob, 1)
    if not _has_both_classes(t):
        return None
    fpr, tpr, thresholds = skm.roc_curve(t, p)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(skm.auc(fpr, tpr)))


def pr_curve(y_true, y_prob) -> PrCurve | None:
    """Precision-recall curve of one label, or None when it has no positives (recall undefined)."""
    t, p = _pair(y_true, y_prob, 1)
    if t.sum() == 0:
        return None
    precision, recall, thresholds = skm.precision_recall_curve(t, p)
    ap = float(skm.average_precision_score(t, p))
    return PrCurve(precision=precision, recall=recall, thresholds=thresholds, average_precision=ap)


def average_precision(y_true, y_prob) -> float | None:
    """Average precision of one label, or None when it has no positives."""
    t, p = _pair(y_true, y_prob, 1)
    if t.sum() == 0:
        return None
    return float(skm.average_precision_score(t, p))


def per_label_auc(y_true, y_prob) -> dict[str, float | None]:
    """{label: ROC AUC or None} over the six LABELS."""
    t, p = _pair(y_true, y_prob, 2)
    return {label: roc_auc(t[:, j], p[:, j]) for j, label in enumerate(LABELS)}


def per_label_roc(y_true, y_prob) -> dict[str, RocCurve | None]:
    """{label: RocCurve or None} over the six LABELS."""
    t, p = _pair(y_true, y_prob, 2)
    return {label: roc_curve(t[:, j], p[:, j]) for j, label in enumerate(LABELS)}


def per_label_pr(y_true, y_prob) -> dict[str, PrCurve | None]:
    """{label: PrCurve or None} over the six LABELS."""
    t, p = _pair(y_true, y_prob, 2)
    return {label: pr_curve(t[:, j], p[:, j]) for j, label in enumerate(LABELS)}


def mean_defined(values: dict[str, float | None] | Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when none is defined)."""
    vals = [v for v in (values.values() if isinstance(values, dict) else values) if v is not None]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------------ log loss
def per_label_log_loss(y_true, y_prob, *, clip: float = PROB_CLIP) -> dict[str, float]:
    """{label: mean binary log loss} with probabilities clipped to [clip, 1 - clip]."""
    t, p = _pair(y_true, y_prob, 2)
    if not len(t):
        raise ValueError("log loss of an empty set is undefined")
    p = np.clip(p, clip, 1.0 - clip)
    losses = -(t * np.log(p) + (1 - t) * np.log1p(-p))
    return {label: float(losses[:, j].mean()) for j, label in enumerate(LABELS)}


def weighted_log_loss(
    y_true, y_prob, *, weights: Sequence[float] = LABEL_WEIGHTS, clip: float = PROB_CLIP
) -> float:
    """The RSNA 2019 metric: per-label log losses averaged with ``weights`` (``any`` x2).

    Every (image, label) term has its label's weight and the sum is divided by the total weight,
    which equals the weighted mean of the per-label mean losses.
    """
    per_label = per_label_log_loss(y_true, y_prob, clip=clip)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(LABELS),) or not (w >= 0).all() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(LABELS)} non-negative numbers with a positive sum")
    return float(np.dot(w, [per_label[label] for label in LABELS]) / w.sum())


# ------------------------------------------------------------------------------------------ accuracy
def stage1_targets(y_true) -> np.ndarray:
    """(N, 6) multi-label truth -> (N,) stage-1 class index over STAGE1_CLASSES; -1 for 2+ subtypes."""
    t = _as_binary(y_true)
    if t.ndim != 2 or t.shape[1] < len(SUBTYPES):
        raise ValueError(f"expected (N, {len(LABELS)}) labels, got {t.shape}")
    classes = [stage1_class(row) for row in t[:, : len(SUBTYPES)].tolist()]
    return np.array([-1 if c is None else c for c in classes], dtype=np.int64)


def stage1_accuracy(true_class, pred) -> float | None:
    """Multi-class accuracy over STAGE1_CLASSES.

    ``true_class`` is (N,) class indices (-1 = image with several subtypes, left out); ``pred`` is (N,)
    predicted indices or (N, 6) class probabilities (argmax taken). None when nothing is scorable.
    """
    truth = np.asarray(true_class, dtype=np.int64)
    guess = np.asarray(pred)
    if guess.ndim == 2:
        if guess.shape[1] != len(STAGE1_CLASSES):
            raise ValueError(f"stage-1 probabilities need {len(STAGE1_CLASSES)} columns, got {guess.shape[1]}")
        guess = guess.argmax(axis=1)
    guess = guess.astype(np.int64)
    if truth.shape != guess.shape or truth.ndim != 1:
        raise ValueError(f"true classes {truth.shape} and predictions {guess.shape} must be (N,)")
    keep = truth >= 0
    if not keep.any():
        return None
    return float(skm.accuracy_score(truth[keep], guess[keep]))


def stage1_probs_from_labels(y_prob) -> np.ndarray:
    """A stage-1 model's six label probabilities -> (N, 6) class probabilities over STAGE1_CLASSES.

    Stage-1 models report p(subtype) = p(class) and p(any) = 1 - p(none) (hemorrhage_core.models
    .probabilities), so the class distribution is (1 - p(any), p(subtype) x5).
    """
    p = _as_prob(y_prob)
    if p.ndim != 2 or p.shape[1] != len(LABELS):
        raise ValueError(f"expected (N, {len(LABELS)}) probabilities, got {p.shape}")
    return np.concatenate([1.0 - p[:, LABELS.index("any") :][:, :1], p[:, : len(SUBTYPES)]], axis=1)


def label_accuracy(y_true, y_prob, *, threshold: float = 0.5) -> dict[str, float]:
    """{label: accuracy of ``prob >= threshold``} over the six LABELS."""
    t, p = _pair(y_true, y_prob, 2)
    if not len(t):
        raise ValueError("accuracy of an empty set is undefined")
    hits = (p >= threshold).astype(np.int64) == t
    return {label: float(hits[:, j].mean()) for j, label in enumerate(LABELS)}


def multilabel_accuracy(y_true, y_prob, *, threshold: float = 0.5) -> float:
    """Stage-2 accuracy: the mean over the six labels of the per-label accuracy at ``threshold``."""
    return float(np.mean(list(label_accuracy(y_true, y_prob, threshold=threshold).values())))


# -------------------------------------------------------------------------------- threshold metrics
@dataclass(frozen=True)
class ThresholdMetrics:
    """Confusion counts of ``prob >= threshold`` for one label, and the rates derived from them."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    accuracy: float | None

    def confusion_matrix(self) -> np.ndarray:
        """2x2 [[tn, fp], [fn, tp]] (rows: truth 0/1, columns: predicted 0/1), as sklearn lays it out."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def threshold_metrics(y_true, y_prob, threshold: float = 0.5) -> ThresholdMetrics:
    """Confusion matrix, sensitivity, specificity, PPV and NPV of one label at ``threshold``."""
    t, p = _pair(y_true, y_prob, 1)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(t, pred, labels=[0, 1]).ravel())
    return ThresholdMetrics(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        accuracy=_ratio(tp + tn, tp + tn + fp + fn),
    )


def youden_threshold(y_true, y_prob) -> float | None:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) of one label, or None when
    only one class is present. Ties go to the highest such threshold (fewest false alarms)."""
    t, p = _pair(y_true, y_prob, 1)
    if not _has_both_classes(t):
        return None
    fpr, tpr, thresholds = skm.roc_curve(t, p, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing called positive)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))])


# ------------------------------------------------------------------------- patient-level bootstrap
@dataclass(frozen=True)
class AucInterval:
    """A label's AUC and its percentile bootstrap interval (resampling patients)."""

    auc: float
    low: float | None
    high: float | None
    confidence: float
    n_resamples: int
    n_valid: int  # resamples with both classes present (the others have no AUC)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class AucDifference:
    """AUC of run A minus AUC of run B on the same images, with a paired patient-level bootstrap."""

    auc_a: float
    auc_b: float
    difference: float
    low: float | None
    high: float | None
    p_value: float | None  # two-sided: twice the share of resamples on the far side of 0
    confidence: float
    n_resamples: int
    n_valid: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _TieGroups:
    """Scores sorted once into tie groups, so a weighted AUC costs one sparse product per resample."""

    def __init__(self, y_true: np.ndarray, y_prob: np.ndarray, patient_index: np.ndarray, n_patients: int):
        from scipy import sparse

        levels, group = np.unique(y_prob, return_inverse=True)
        shape = (n_patients, len(levels))
        ones = np.ones(len(y_true))
        # (patients x tie groups) counts of positive and negative slices: a resample's weighted
        # class totals per group are then counts @ these matrices.
        self.pos = sparse.csr_matrix((ones * y_true, (patient_index, group)), shape=shape)
        self.neg = sparse.csr_matrix((ones * (1 - y_true), (patient_index, group)), shape=shape)

    def auc(self, patient_counts: np.ndarray) -> np.ndarray:
        """AUC for each row of ``patient_counts`` (R, n_patients); NaN where a class is absent."""
        pos = np.asarray((self.pos.T @ patient_counts.T).T, dtype=np.float64)  # (R, G)
        neg = np.asarray((self.neg.T @ patient_counts.T).T, dtype=np.float64)
        neg_below = np.cumsum(neg, axis=1) - neg
        # Mann-Whitney: each positive beats the negatives scored lower and ties half the equal ones.
        wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
        total = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def _patient_index(patient_ids, n: int) -> tuple[np.ndarray, int]:
    ids = np.asarray(patient_ids)
    if ids.shape != (n,):
        raise ValueError(f"patient_ids must be (N,) = ({n},), got {ids.shape}")
    _, index = np.unique(ids.astype(str), return_inverse=True)
    return index.astype(np.int64), int(index.max()) + 1 if n else 0


def _resample_counts(n_patients: int, n_resamples: int, seed: int | None):
    """Yield (R, n_patients) chunks: how often each patient is drawn in each resample."""
    rng = np.random.default_rng(seed)
    if n_patients <= 0:
        raise ValueError("bootstrap needs at least one patient")
    # Chunks bound memory (R x tie groups floats) on large validation sets.
    chunk = max(1, min(n_resamples, 64))
    done = 0
    while done < n_resamples:
        r = min(chunk, n_resamples - done)
        draws = rng.integers(0, n_patients, size=(r, n_patients))
        flat = (draws + np.arange(r)[:, None] * n_patients).ravel()
        yield np.bincount(flat, minlength=r * n_patients).reshape(r, n_patients).astype(np.float64)
        done += r


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")


def bootstrap_auc(
    y_true,
    y_prob,
    patient_ids,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> AucInterval | None:
    """One label's AUC with a percentile interval from resampling patients with replacement.

    A drawn patient brings all their slices (slices of one patient are correlated, so resampling
    slices would make the interval too narrow). None when the data have one class only.
    """
    _check_bootstrap_args(n_resamples, confidence)
    t, p = _pair(y_true, y_prob, 1)
    estimate = roc_auc(t, p)
    if estimate is None:
        return None
    index, n_patients = _patient_index(patient_ids, len(t))
    groups = _TieGroups(t, p, index, n_patients)
    aucs = np.concatenate([groups.auc(c) for c in _resample_counts(n_patients, n_resamples, seed)])
    low, high = _interval(aucs, confidence)
    return AucInterval(estimate, low, high, confidence, n_resamples, int(np.isfinite(aucs).sum()))


def bootstrap_auc_difference(
    y_true,
    prob_a,
    prob_b,
    patient_ids,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> AucDifference | None:
    """AUC(A) - AUC(B) of two models' probabilities for the same images (same rows, same order).

    Both AUCs are computed on each patient resample, so the interval accounts for their correlation.
    None when the data have one class only.
    """
    _check_bootstrap_args(n_resamples, confidence)
    t, pa = _pair(y_true, prob_a, 1)
    _, pb = _pair(y_true, prob_b, 1)
    auc_a, auc_b = roc_auc(t, pa), roc_auc(t, pb)
    if auc_a is None or auc_b is None:
        return None
    index, n_patients = _patient_index(patient_ids, len(t))
    groups_a = _TieGroups(t, pa, index, n_patients)
    groups_b = _TieGroups(t, pb, index, n_patients)
    diffs = np.concatenate(
        [groups_a.auc(c) - groups_b.auc(c) for c in _resample_counts(n_patients, n_resamples, seed)]
    )
    valid = diffs[np.isfinite(diffs)]
    low, high = _interval(diffs, confidence)
    p_value = None
    if len(valid):
        p_value = float(min(1.0, 2.0 * min((valid <= 0).mean(), (valid >= 0).mean())))
    return AucDifference(
        auc_a=auc_a,
        auc_b=auc_b,
        difference=auc_a - auc_b,
        low=low,
        high=high,
        p_value=p_value,
        confidence=confidence,
        n_resamples=n_resamples,
        n_valid=len(valid),
    )


def bootstrap_auc_by_label(
    y_true, y_prob, patient_ids, **kwargs
) -> dict[str, AucInterval | None]:
    """``bootstrap_auc`` for each of the six LABELS (same seed, so the same patient resamples)."""
    t, p = _pair(y_true, y_prob, 2)
    return {label: bootstrap_auc(t[:, j], p[:, j], patient_ids, **kwargs) for j, label in enumerate(LABELS)}


# ------------------------------------------------------------------------------------- z-smoothing
def zsmooth(
    y_prob,
    series_ids,
    z,
    *,
    weights: tuple[float, float, float] = ZSMOOTH_WEIGHTS,
) -> np.ndarray:
    """Smooth each slice's probabilities with its neighbours along z in the same series.

    ``y_prob`` is (N,) or (N, K), rows in any order; ``series_ids`` and ``z`` are (N,). Within a series
    slices are ordered by z (ties keep input order); each slice becomes the weighted mean of
    (previous, itself, next) with ``weights``, normalised over the neighbours that exist, so a series'
    first and last slices use two terms and a one-slice series is unchanged. Returns input row order.
    """
    probs = np.asarray(y_prob, dtype=np.float64)
    n = probs.shape[0] if probs.ndim else 0
    series = np.asarray(series_ids).astype(str)
    zz = np.asarray(z, dtype=np.float64)
    if probs.ndim not in (1, 2) or series.shape != (n,) or zz.shape != (n,):
        raise ValueError("y_prob must be (N,) or (N, K) with series_ids and z of shape (N,)")
    w_prev, w_self, w_next = (float(w) for w in weights)
    if n == 0:
        return probs.copy()
    order = np.lexsort((np.arange(n), zz, series))  # by series, then z, then input position
    p = probs[order]
    s = series[order]
    same_prev = np.zeros(n, dtype=bool)
    same_prev[1:] = s[1:] == s[:-1]
    same_next = np.zeros(n, dtype=bool)
    same_next[:-1] = same_prev[1:]
    prev_p = np.roll(p, 1, axis=0)
    next_p = np.roll(p, -1, axis=0)
    shape = (n,) + (1,) * (p.ndim - 1)
    wp = np.where(same_prev, w_prev, 0.0).reshape(shape)
    wn = np.where(same_next, w_next, 0.0).reshape(shape)
    smoothed = (wp * prev_p + w_self * p + wn * next_p) / (wp + w_self + wn)
    out = np.empty_like(smoothed)
    out[order] = smoothed
    return out


# --------------------------------------------------------------------------------------- summaries
def summarise(y_true, y_prob, stage1_pred=None) -> dict:
    """The evaluate command's metrics over the six LABELS, as JSON-ready Python values.

    ``stage1_pred`` (a stage-1 model's (N,) class indices or (N, 6) class probabilities over
    STAGE1_CLASSES) makes ``accuracy`` the multi-class accuracy; otherwise it is the mean per-label
    accuracy at 0.5. Keys: n_images, auc {label: value|None}, auc_mean, weighted_log_loss, accuracy,
    accuracy_kind ("stage1" | "per_label@0.5"), log_loss {label}, average_precision {label: value|None},
    positives {label: count}.
    """
    t, p = _pair(y_true, y_prob, 2)
    if not len(t):
        raise ValueError("no images to summarise")
    auc = per_label_auc(t, p)
    if stage1_pred is not None:
        accuracy = stage1_accuracy(stage1_targets(t), stage1_pred)
        kind = "stage1"
    else:
        accuracy = multilabel_accuracy(t, p)
        kind = "per_label@0.5"
    return {
        "n_images": int(len(t)),
        "auc": auc,
        "auc_mean": mean_defined(auc),
        "weighted_log_loss": weighted_log_loss(t, p),
        "accuracy": accuracy,
        "accuracy_kind": kind,
        "log_loss": per_label_log_loss(t, p),
        "average_precision": {label: average_precision(t[:, j], p[:, j]) for j, label in enumerate(LABELS)},
        "positives": {label: int(t[:, j].sum()) for j, label in enumerate(LABELS)},
    }


def validation_metrics(y_true, y_prob, *, stage1_pred=None, series_ids=None, z=None) -> dict[str, float | None]:
    """The ``val_*`` columns of a run's metrics.csv row (see hemorrhage_core.runs.METRICS_COLUMNS).

    With ``series_ids`` and ``z`` the z-smoothed columns are filled, otherwise they are None.
    """
    s = summarise(y_true, y_prob, stage1_pred)
    row: dict[str, float | None] = {
        "val_accuracy": s["accuracy"],
        "val_weighted_log_loss": s["weighted_log_loss"],
        "val_auc_mean": s["auc_mean"],
    }
    row.update({f"val_auc_{label}": s["auc"][label] for label in LABELS})
    row["val_zs_weighted_log_loss"] = None
    row["val_zs_auc_any"] = None
    if series_ids is not None and z is not None:
        t, p = _pair(y_true, y_prob, 2)
        smoothed = zsmooth(p, series_ids, z)
        row["val_zs_weighted_log_loss"] = weighted_log_loss(t, smoothed)
        row["val_zs_auc_any"] = roc_auc(t[:, LABELS.index("any")], smoothed[:, LABELS.index("any")])
    return row

