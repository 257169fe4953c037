"""Significance tests on plain arrays: DeLong's test for two correlated AUCs, Holm's adjustment.

Slices of one patient are correlated, so a test over slices that treats them as independent cases is
too confident. With ``clusters`` (a patient id per case) the variance is Obuchowski's (1997)
extension of DeLong's to clustered data: each patient's structural components are summed first, and
a patient who brings many slices counts as one draw. With one case per cluster it equals DeLong's.

Pure numpy/scipy, no I/O. A statistic that is undefined on the data is ``None``, never NaN, as in
``hemorrhage_core.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

from hemorrhage_core.metrics import _pair


@dataclass(frozen=True)
class DelongResult:
    """AUC(A) - AUC(B) of two models scored on the same cases, with DeLong's variance of the difference.

    ``z`` and ``p_value`` are None when the variance is 0 but the AUCs differ (the normal approximation
    has no spread, so no p-value is defined); when both the variance and the difference are 0 (e.g.
    identical scores) ``z`` is 0.0 and ``p_value`` 1.0.
    """

    auc_a: float
    auc_b: float
    difference: float
    variance: float
    z: float | None
    p_value: float | None  # two-sided, standard normal
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _components(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong structural components by the midrank algorithm of Sun & Xu (2014), O(n log n).

    ``scores`` is (K, N) for K models. Returns (auc (K,), v10 (K, m), v01 (K, n)): v10[k, i] is the share
    of negatives that positive i outranks (ties count 1/2), v01[k, j] the share of positives that
    outrank negative j.
    """
    pos, neg = scores[:, y_true == 1], scores[:, y_true == 0]
    m, n = pos.shape[1], neg.shape[1]
    ranks_all = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks over all cases
    # A case's midrank among all cases minus its midrank within its own class counts the cases of the
    # other class below it (ties 1/2).
    v10 = (ranks_all[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (ranks_all[:, m:] - rankdata(neg, axis=1)) / m
    return v10.mean(axis=1), v10, v01


def _variance(v10: np.ndarray, v01: np.ndarray) -> float:
    """DeLong variance S10/m + S01/n of one set of components (sample variances, ddof=1)."""
    # A constant component has variance exactly 0; np.var may leave ~1e-33 of rounding.
    s10 = 0.0 if np.ptp(v10) == 0 else float(np.var(v10, ddof=1))
    s01 = 0.0 if np.ptp(v01) == 0 else float(np.var(v01, ddof=1))
    return s10 / v10.size + s01 / v01.size


def _clustered_variance(y_true: np.ndarray, v10: np.ndarray, v01: np.ndarray, auc: float, clusters: np.ndarray) -> float | None:
    """Obuchowski (1997): S10/M + S01/N + 2 S11/(M N) over cluster sums of the components.

    ``v10`` (M,) and ``v01`` (N,) are the components of the positives and negatives in row order of
    ``y_true``; ``clusters`` (len(y_true),) the cluster of each row. None with fewer than 2 clusters
    holding positives or negatives (the between-cluster variance is then undefined).
    """
    _, index = np.unique(clusters.astype(str), return_inverse=True)
    n_clusters = int(index.max()) + 1
    pos, neg = y_true == 1, y_true == 0
    m_k = np.bincount(index[pos], minlength=n_clusters).astype(np.float64)
    n_k = np.bincount(index[neg], minlength=n_clusters).astype(np.float64)
    i10, i01 = int((m_k > 0).sum()), int((n_k > 0).sum())
    if i10 < 2 or i01 < 2:
        return None
    r10 = np.bincount(index[pos], weights=v10, minlength=n_clusters) - m_k * auc
    r01 = np.bincount(index[neg], weights=v01, minlength=n_clusters) - n_k * auc
    m, n = float(pos.sum()), float(neg.sum())
    s10 = i10 / ((i10 - 1) * m) * float(np.sum(r10**2))
    s01 = i01 / ((i01 - 1) * n) * float(np.sum(r01**2))
    s11 = n_clusters / (n_clusters - 1) * float(np.sum(r10 * r01))
    return max(0.0, s10 / m + s01 / n + 2.0 * s11 / (m * n))


def _check_clusters(clusters, n: int) -> np.ndarray:
    arr = np.asarray(clusters)
    if arr.shape != (n,):
        raise ValueError(f"clusters must be (N,) = ({n},), got {arr.shape}")
    return arr


def _enough_cases(y_true: np.ndarray) -> bool:
    # The sample variances divide by (m - 1) and (n - 1): each class needs two cases.
    n_pos = int(y_true.sum())
    return n_pos >= 2 and y_true.size - n_pos >= 2


def delong_auc_variance(y_true, prob, *, clusters=None) -> tuple[float, float] | None:
    """(AUC, DeLong variance of the AUC) for one model, or None with fewer than 2 cases (with
    ``clusters``: 2 clusters) in a class."""
    t, p = _pair(y_true, prob, 1)
    if not _enough_cases(t):
        return None
    auc, v10, v01 = _components(t, p[None, :])
    if clusters is None:
        return float(auc[0]), _variance(v10[0], v01[0])
    variance = _clustered_variance(t, v10[0], v01[0], float(auc[0]), _check_clusters(clusters, len(t)))
    return None if variance is None else (float(auc[0]), variance)


def delong_test(y_true, prob_a, prob_b, *, clusters=None, confidence: float = 0.95) -> DelongResult | None:
    """DeLong, DeLong & Clarke-Pearson (1988) test of AUC(A) = AUC(B) on the same cases.

    ``prob_a`` and ``prob_b`` are (N,) scores of two models for the same rows of ``y_true`` (N,);
    ``clusters`` (N,), e.g. patient ids, makes the variance Obuchowski's clustered one. The interval is
    the Wald interval ``difference +/- z_q * sqrt(variance)``. None with fewer than 2 cases (or
    clusters) in a class (one class only included), where the variance is undefined.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    t, pa = _pair(y_true, prob_a, 1)
    _, pb = _pair(y_true, prob_b, 1)
    if not _enough_cases(t):
        return None
    auc, v10, v01 = _components(t, np.stack([pa, pb]))
    difference = float(auc[0] - auc[1])
    # var(A - B) from the differences of the components = var A + var B - 2 cov(A, B).
    if clusters is None:
        variance = _variance(v10[0] - v10[1], v01[0] - v01[1])
    else:
        clustered = _clustered_variance(
            t, v10[0] - v10[1], v01[0] - v01[1], difference, _check_clusters(clusters, len(t))
        )
        if clustered is None:
            return None
        variance = clustered
    if variance > 0:
        z: float | None = difference / math.sqrt(variance)
        p_value: float | None = float(2.0 * norm.sf(abs(z)))
    elif difference == 0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = None, None
    half_width = float(norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(variance)
    return DelongResult(
        auc_a=float(auc[0]),
        auc_b=float(auc[1]),
        difference=difference,
        variance=variance,
        z=z,
        p_value=p_value,
        ci_low=difference - half_width,
        ci_high=difference + half_width,
        confidence=confidence,
    )


def holm(p_values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni step-down adjusted p-values, same keys; None stays None and is not counted.

    With the m defined p-values sorted ascending, the i-th (1-based) becomes
    ``max over j <= i of min(1, (m - j + 1) * p_(j))``, so adjusted values keep the raw order.
    """
    defined = {k: float(v) for k, v in p_values.items() if v is not None}
    if any(not 0.0 <= v <= 1.0 for v in defined.values()):  # NaN fails this test too
        raise ValueError("p-values must be in [0, 1] or None")
    keys = sorted(defined, key=defined.__getitem__)
    m = len(keys)
    scaled = np.minimum(1.0, [(m - i) * defined[k] for i, k in enumerate(keys)])
    adjusted = dict(zip(keys, np.maximum.accumulate(scaled).tolist(), strict=True)) if m else {}
    return {k: adjusted.get(k) for k in p_values}
