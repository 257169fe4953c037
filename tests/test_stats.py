"""hemorrhage_core.stats against hand-worked values, a slow reference DeLong and a case bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from hemorrhage_core import stats

# Two positives X1, X2 and three negatives Y1..Y3, scored by two models.
HAND_Y = [1, 1, 0, 0, 0]
HAND_A = [0.9, 0.4, 0.5, 0.2, 0.4]  # X2 ties Y3
HAND_B = [0.8, 0.3, 0.6, 0.1, 0.2]


def test_delong_matches_hand_worked_case():
    # psi(X, Y) = 1 if X > Y, 1/2 if equal, 0 otherwise.
    # A: V10 (per positive, mean over negatives) = [1, (0 + 1 + 1/2)/3 = 1/2]; AUC_A = 3/4
    #    V01 (per negative, mean over positives) = [1/2, 1, 3/4]
    # B: V10 = [1, 2/3]; AUC_B = 5/6;  V01 = [1/2, 1, 1]
    # A - B: V10 diff = [0, -1/6] -> S10 = 2 (1/12)^2 / 1 = 1/72
    #        V01 diff = [0, 0, -1/4] -> deviations from -1/12: [1/12, 1/12, -1/6] -> S01 = (6/144) / 2 = 1/48
    # var = S10/m + S01/n = 1/144 + 1/144 = 1/72;  z = (-1/12) / sqrt(1/72) = -1/sqrt(2)
    # p = 2 Phi(-1/sqrt(2)) = erfc(1/2)
    r = stats.delong_test(HAND_Y, HAND_A, HAND_B)
    assert r.auc_a == pytest.approx(3 / 4, abs=1e-12)
    assert r.auc_b == pytest.approx(5 / 6, abs=1e-12)
    assert r.difference == pytest.approx(-1 / 12, abs=1e-12)
    assert r.variance == pytest.approx(1 / 72, abs=1e-12)
    assert r.z == pytest.approx(-1 / math.sqrt(2), abs=1e-12)
    assert r.p_value == pytest.approx(math.erfc(0.5), abs=1e-12)
    half = 1.959963984540054 / math.sqrt(72)
    assert (r.ci_low, r.ci_high) == pytest.approx((-1 / 12 - half, -1 / 12 + half), abs=1e-12)
    assert r.to_dict()["p_value"] == r.p_value
    # Model A alone: S10 = 2 (1/4)^2 / 1 = 1/8, S01 = ((1/4)^2 + (1/4)^2 + 0) / 2 = 1/16
    # var = (1/8)/2 + (1/16)/3 = 1/12
    auc, var = stats.delong_auc_variance(HAND_Y, HAND_A)
    assert auc == pytest.approx(3 / 4, abs=1e-12)
    assert var == pytest.approx(1 / 12, abs=1e-12)


def _slow_delong(y, scores):
    """O(m n) DeLong: psi matrix per model, then the covariance of the structural components."""
    y = np.asarray(y)
    v10, v01 = [], []
    for s in scores:
        x, yy = s[y == 1][:, None], s[y == 0][None, :]
        psi = (x > yy) + 0.5 * (x == yy)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / len(v10[0]) + s01 / len(v01[0])
    return np.array([v.mean() for v in v10]), np.atleast_2d(cov)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_slow_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = (rng.random(n) < 0.3).astype(int)
    # Rounded to 2 decimals so that many scores tie, within and across classes.
    a = np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1), 2)
    b = np.round(np.clip(0.5 * a + 0.2 * y + 0.3 * rng.random(n), 0, 1), 2)
    aucs, cov = _slow_delong(y, [a, b])
    r = stats.delong_test(y, a, b)
    assert (r.auc_a, r.auc_b) == pytest.approx(tuple(aucs), abs=1e-12)
    assert r.variance == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], abs=1e-12)
    assert r.p_value == pytest.approx(2 * norm.sf(abs(r.difference) / math.sqrt(r.variance)), abs=1e-12)
    auc_a, var_a = stats.delong_auc_variance(y, a)
    assert auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert var_a == pytest.approx(cov[0, 0], abs=1e-12)


def test_midranks_give_sklearn_auc_on_tied_scores():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.4).astype(int)
    a = np.round(0.8 * (0.2 * y + rng.random(500)), 1)
    b = np.round(rng.random(500), 1)
    r = stats.delong_test(y, a, b)
    assert r.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_delong_variance_agrees_with_case_bootstrap():
    rng = np.random.default_rng(42)
    n = 3000
    y = (rng.random(n) < 0.3).astype(int)
    shared = rng.normal(size=n)  # noise both models see, so their AUCs are correlated
    a = expit(1.0 * y + shared + 0.6 * rng.normal(size=n))
    b = expit(0.93 * y + shared + 0.6 * rng.normal(size=n))
    r = stats.delong_test(y, a, b)
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    boot_var = np.var(diffs, ddof=1)
    assert r.variance == pytest.approx(boot_var, rel=0.10)
    boot_p = 2 * norm.sf(abs(r.difference) / math.sqrt(boot_var))
    assert 0.01 < r.p_value < 0.2  # a close comparison, where the variance decides the answer
    assert r.p_value == pytest.approx(boot_p, abs=0.02)


def test_identical_predictions_give_p_one():
    rng = np.random.default_rng(0)
    y = (rng.random(100) < 0.5).astype(int)
    p = rng.random(100)
    r = stats.delong_test(y, p, p.copy())
    assert (r.difference, r.variance, r.z, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (r.ci_low, r.ci_high) == (0.0, 0.0)


def test_zero_variance_with_a_difference_has_no_p_value():
    # A separates perfectly, B is constant: every component is constant, yet AUCs are 1 and 1/2.
    y = [1, 1, 0, 0]
    r = stats.delong_test(y, [0.9, 0.8, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5])
    assert (r.difference, r.variance, r.z, r.p_value) == (0.5, 0.0, None, None)


def test_one_class_or_too_few_cases_is_none():
    assert stats.delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) is None
    assert stats.delong_test([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) is None
    assert stats.delong_test([1, 0, 0, 0], [0.9, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) is None
    assert stats.delong_auc_variance([0, 0], [0.1, 0.2]) is None


def test_delong_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        stats.delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3])


def test_holm_hand_case():
    # m = 3 defined: sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, 1*0.04 = 0.03, 0.06, 0.04 -> cummax 0.03, 0.06, 0.06
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert list(adjusted) == ["a", "b", "c", "d"]
    assert adjusted["a"] == pytest.approx(0.03, abs=1e-15)
    assert adjusted["b"] == pytest.approx(0.06, abs=1e-15)
    assert adjusted["c"] == pytest.approx(0.06, abs=1e-15)
    assert adjusted["d"] is None
    assert stats.holm({"x": 0.4, "y": 0.6}) == {"x": 0.8, "y": 0.8}  # 2*0.6 capped at 1, then cummax
    assert stats.holm({}) == {}
    assert stats.holm({"x": None}) == {"x": None}
    with pytest.raises(ValueError):
        stats.holm({"x": 1.5})


def test_holm_is_monotone_and_bounded():
    rng = np.random.default_rng(7)
    raw = dict(enumerate(rng.random(40) ** 3))
    adjusted = stats.holm(raw)
    order = sorted(raw, key=raw.get)
    values = [adjusted[k] for k in order]
    assert values == sorted(values)
    assert all(raw[k] <= adjusted[k] <= 1.0 for k in raw)
    assert adjusted[order[0]] == pytest.approx(40 * raw[order[0]])


# ----------------------------------------------------------------- clustered DeLong (Obuchowski 1997)
def test_clustered_delong_with_one_case_per_cluster_is_delong():
    rng = np.random.default_rng(5)
    y = (rng.random(200) < 0.4).astype(int)
    a, b = rng.random(200) * 0.6 + 0.4 * y, rng.random(200)
    plain = stats.delong_test(y, a, b)
    clustered = stats.delong_test(y, a, b, clusters=np.arange(200))
    assert clustered.variance == pytest.approx(plain.variance, rel=1e-12)
    assert clustered.p_value == pytest.approx(plain.p_value, rel=1e-9)
    assert stats.delong_auc_variance(y, a, clusters=np.arange(200))[1] == pytest.approx(
        stats.delong_auc_variance(y, a)[1], rel=1e-12)


def test_clustered_delong_hand_case():
    # Two clusters of two cases: P1 = {pos 0.9, neg 0.2}, P2 = {pos 0.4, neg 0.5}; model A only.
    # psi: 0.9 beats both negatives (1, 1); 0.4 beats 0.2 only (1, 0). AUC = 3/4.
    # v10 = (1, 1/2), v01 = (1, 1/2) (0.2 is beaten by both positives, 0.5 by one).
    # Cluster sums minus m_k AUC: r10 = (1 - 3/4, 1/2 - 3/4) = (1/4, -1/4); r01 the same.
    # S10 = 2 / (1 * 2) * (1/16 + 1/16) = 1/8 = S01; S11 = 2 * (1/16 + 1/16) = 1/4.
    # var = (1/8)/2 + (1/8)/2 + 2 (1/4) / 4 = 1/4.
    y = np.array([1, 0, 1, 0])
    a = np.array([0.9, 0.2, 0.4, 0.5])
    auc, var = stats.delong_auc_variance(y, a, clusters=["P1", "P1", "P2", "P2"])
    assert auc == pytest.approx(0.75, abs=1e-12) and var == pytest.approx(0.25, abs=1e-12)
    # One patient with all the positives: no between-patient variance, so no test.
    assert stats.delong_test(y, a, a[::-1].copy(), clusters=["P1", "P1", "P1", "P2"]) is None


def test_clustered_delong_matches_a_patient_bootstrap_where_plain_delong_is_too_confident():
    # 150 patients x 8 slices; each model has a patient effect shared by all that patient's slices.
    rng = np.random.default_rng(11)
    n_pat, per = 150, 8
    patient = np.repeat(np.arange(n_pat), per)
    bleed = np.repeat(rng.random(n_pat) < 0.4, per) & (rng.random(n_pat * per) < 0.7)
    y = bleed.astype(int)
    effect_a, effect_b = (np.repeat(rng.normal(0, 1.0, n_pat), per) for _ in range(2))
    a = expit(1.2 * y + effect_a + 0.5 * rng.normal(size=y.size))
    b = expit(0.9 * y + effect_b + 0.5 * rng.normal(size=y.size))
    clustered = stats.delong_test(y, a, b, clusters=patient)
    plain = stats.delong_test(y, a, b)
    diffs = []
    for _ in range(1500):
        drawn = rng.integers(0, n_pat, n_pat)
        rows = (drawn[:, None] * per + np.arange(per)).ravel()
        diffs.append(roc_auc_score(y[rows], a[rows]) - roc_auc_score(y[rows], b[rows]))
    boot_var = np.var(diffs, ddof=1)
    assert clustered.variance == pytest.approx(boot_var, rel=0.15)
    # Slices as independent cases understate the spread (measured: about a quarter of it).
    assert plain.variance < 0.5 * boot_var
