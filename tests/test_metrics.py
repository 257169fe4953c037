"""hemorrhage_core.metrics against hand-computed values and scikit-learn references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from hemorrhage_core import metrics as m
from hemorrhage_core.labels import LABEL_WEIGHTS, LABELS

ANY = LABELS.index("any")


def _random_set(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(int)
    y[:, ANY] = y[:, :5].max(axis=1)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 6)), 0, 1)
    return y, p


# ------------------------------------------------------------------------------------------ log loss
def test_weighted_log_loss_matches_hand_computed_reference():
    y = np.array([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]])
    p = np.array([[0.1, 0.2, 0.1, 0.1, 0.1, 0.3], [0.8, 0.1, 0.1, 0.1, 0.1, 0.9]])
    ln = math.log
    image1 = [ln(0.9), ln(0.8), ln(0.9), ln(0.9), ln(0.9), 2 * ln(0.7)]
    image2 = [ln(0.8), ln(0.9), ln(0.9), ln(0.9), ln(0.9), 2 * ln(0.9)]
    # sum of weighted terms over the sum of weights over all (image, label) pairs: 2 images x 7
    reference = -(sum(image1) + sum(image2)) / 14.0
    assert m.weighted_log_loss(y, p) == pytest.approx(reference, rel=1e-12)


def test_weighted_log_loss_matches_sklearn_per_label_average():
    y, p = _random_set()
    per_label = [log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(6)]
    assert m.weighted_log_loss(y, p) == pytest.approx(np.average(per_label, weights=LABEL_WEIGHTS), rel=1e-10)
    assert list(m.per_label_log_loss(y, p).values()) == pytest.approx(per_label, rel=1e-10)


def test_weighted_log_loss_clips_probabilities():
    y = np.array([[1, 0, 0, 0, 0, 1]])
    p = np.array([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])  # two certain mistakes, four certain hits
    clipped = -math.log(1e-7)
    # three subtypes (weight 1) and ``any`` (weight 2) are certain hits, clipped to 1 - 1e-7
    expected = (2 * clipped + (3 + 2) * -math.log(1 - 1e-7)) / 7.0
    value = m.weighted_log_loss(y, p)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-9)
    p_clipped = np.clip(p, 1e-7, 1 - 1e-7)
    per_label = [log_loss(y[:, j], p_clipped[:, j], labels=[0, 1]) for j in range(6)]
    assert value == pytest.approx(np.average(per_label, weights=LABEL_WEIGHTS), rel=1e-6)


def test_any_weighs_twice_a_subtype():
    y = np.zeros((1, 6), dtype=int)
    base = np.full((1, 6), 0.1)
    wrong_subtype, wrong_any = base.copy(), base.copy()
    wrong_subtype[0, 0] = 0.9
    wrong_any[0, ANY] = 0.9
    base_loss = m.weighted_log_loss(y, base)
    assert m.weighted_log_loss(y, wrong_any) - base_loss == pytest.approx(
        2 * (m.weighted_log_loss(y, wrong_subtype) - base_loss)
    )


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 10_000))
def test_weighted_log_loss_property_against_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, 6))
    p = rng.random((n, 6))
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    per_label = [log_loss(y[:, j], pc[:, j], labels=[0, 1]) for j in range(6)]
    assert m.weighted_log_loss(y, p) == pytest.approx(np.average(per_label, weights=LABEL_WEIGHTS), rel=1e-9)


def test_bad_inputs_are_refused():
    y, p = _random_set(10)
    with pytest.raises(ValueError):
        m.weighted_log_loss(y, p[:, :5])
    with pytest.raises(ValueError):
        m.weighted_log_loss(y * 2, p)
    bad = p.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        m.per_label_auc(y, bad)
    with pytest.raises(ValueError):
        m.weighted_log_loss(y, p, weights=(1, 1, 1))


# ------------------------------------------------------------------------------------ AUC and curves
def test_auc_and_curves_match_sklearn_and_are_none_for_one_class():
    y, p = _random_set()
    y[:, 0] = 0  # epidural absent
    aucs = m.per_label_auc(y, p)
    assert list(aucs) == list(LABELS)
    assert aucs["epidural"] is None
    for j, label in enumerate(LABELS[1:], start=1):
        assert aucs[label] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        curve = m.roc_curve(y[:, j], p[:, j])
        assert curve.auc == pytest.approx(aucs[label])
        assert curve.fpr[0] == 0 and curve.tpr[-1] == 1
        pr = m.pr_curve(y[:, j], p[:, j])
        assert pr.average_precision == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        assert pr.recall[0] == 1 and pr.precision[-1] == 1
    assert m.per_label_roc(y, p)["epidural"] is None
    assert m.per_label_pr(y, p)["epidural"] is None
    assert m.average_precision(y[:, 0], p[:, 0]) is None
    assert m.mean_defined(aucs) == pytest.approx(np.mean([v for v in aucs.values() if v is not None]))
    assert m.mean_defined({"a": None}) is None


def test_roc_on_all_positive_label_is_none():
    assert m.roc_auc(np.ones(5), np.linspace(0, 1, 5)) is None
    assert m.roc_curve(np.ones(5), np.linspace(0, 1, 5)) is None
    # AP is defined without negatives: every positive is retrieved at full precision
    assert m.average_precision(np.ones(5), np.linspace(0, 1, 5)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- accuracy, thresholds
def test_stage1_accuracy_by_hand():
    y = np.array(
        [
            [0, 0, 0, 0, 0, 0],  # none -> class 0
            [0, 1, 0, 0, 0, 1],  # intraparenchymal -> class 2
            [0, 0, 0, 0, 1, 1],  # subdural -> class 5
            [1, 1, 0, 0, 0, 1],  # two subtypes: not scorable in stage 1
        ]
    )
    assert m.stage1_targets(y).tolist() == [0, 2, 5, -1]
    assert m.stage1_accuracy(m.stage1_targets(y), [0, 2, 1, 3]) == pytest.approx(2 / 3)
    probs = np.eye(6)[[0, 2, 5, 1]] * 0.9 + 0.01
    assert m.stage1_accuracy(m.stage1_targets(y), probs) == pytest.approx(1.0)
    assert m.stage1_accuracy([-1, -1], [0, 1]) is None
    # a stage-1 model's label probabilities: subtypes = class p, any = 1 - p(none)
    classes = np.array([[0.7, 0.1, 0.05, 0.05, 0.05, 0.05], [0.1, 0.1, 0.6, 0.1, 0.05, 0.05]])
    labels = np.concatenate([classes[:, 1:], 1 - classes[:, :1]], axis=1)
    assert m.stage1_probs_from_labels(labels) == pytest.approx(classes)


def test_multilabel_accuracy_by_hand():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.7, 0.6, 0.1, 0.1, 0.1, 0.4], [0.2, 0.1, 0.5, 0.1, 0.1, 0.1]])
    per_label = m.label_accuracy(y, p)
    # epidural right twice; intraparenchymal wrong once; intraventricular: 0.5 counts as positive
    assert per_label == {
        "epidural": 1.0,
        "intraparenchymal": 0.5,
        "intraventricular": 0.5,
        "subarachnoid": 1.0,
        "subdural": 1.0,
        "any": 0.5,
    }
    assert m.multilabel_accuracy(y, p) == pytest.approx(4.5 / 6)


def test_threshold_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.1, 0.4])
    t = m.threshold_metrics(y, p, 0.5)
    assert (t.tp, t.fn, t.fp, t.tn) == (2, 1, 1, 4)
    assert t.sensitivity == pytest.approx(2 / 3)
    assert t.specificity == pytest.approx(4 / 5)
    assert t.ppv == pytest.approx(2 / 3)
    assert t.npv == pytest.approx(4 / 5)
    assert t.accuracy == pytest.approx(6 / 8)
    assert t.confusion_matrix().tolist() == [[4, 1], [1, 2]]
    none_predicted = m.threshold_metrics(y, p, 0.95)
    assert none_predicted.ppv is None and none_predicted.sensitivity == 0.0
    no_positives = m.threshold_metrics(np.zeros(3, int), [0.1, 0.2, 0.9], 0.5)
    assert no_positives.sensitivity is None and no_positives.specificity == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- bootstrap
def test_resampled_auc_equals_sklearn_on_the_explicitly_resampled_rows():
    rng = np.random.default_rng(3)
    n, n_patients = 300, 40
    patients = rng.integers(0, n_patients, n)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.round(0.3 * y + 0.7 * rng.random(n), 2)  # rounding makes ties
    index, count = m._patient_index(patients, n)
    groups = m._TieGroups(y, p, index, count)
    counts = next(m._resample_counts(count, 8, seed=1))
    fast = groups.auc(counts)
    for r in range(len(counts)):
        rows = np.concatenate([np.flatnonzero(index == k) for k in np.repeat(np.arange(count), counts[r].astype(int))])
        if 0 < y[rows].sum() < len(rows):
            assert fast[r] == pytest.approx(roc_auc_score(y[rows], p[rows]), abs=1e-12)
        else:
            assert np.isnan(fast[r])
    assert counts.sum(axis=1).tolist() == [count] * len(counts)  # n patients drawn per resample


def test_bootstrap_auc_is_seeded_and_brackets_the_estimate():
    y, p = _random_set(400, seed=5)
    patients = np.arange(400) // 8
    a = m.bootstrap_auc(y[:, ANY], p[:, ANY], patients, n_resamples=300, seed=7)
    b = m.bootstrap_auc(y[:, ANY], p[:, ANY], patients, n_resamples=300, seed=7)
    assert a == b
    assert a.auc == pytest.approx(roc_auc_score(y[:, ANY], p[:, ANY]))
    assert a.low < a.auc < a.high
    assert a.n_valid == 300
    c = m.bootstrap_auc(y[:, ANY], p[:, ANY], patients, n_resamples=300, seed=8)
    assert (c.low, c.high) != (a.low, a.high)


def test_bootstrap_resamples_patients_not_slices():
    # Each patient contributes 10 identical slices: resampling slices would treat them as 10
    # independent observations and give a much narrower interval than resampling patients.
    rng = np.random.default_rng(0)
    n_patients = 60
    y_patient = (rng.random(n_patients) < 0.4).astype(int)
    p_patient = np.clip(0.3 * y_patient + 0.7 * rng.random(n_patients), 0, 1)
    y, p = np.repeat(y_patient, 10), np.repeat(p_patient, 10)
    by_patient = m.bootstrap_auc(y, p, np.repeat(np.arange(n_patients), 10), n_resamples=400, seed=0)
    by_slice = m.bootstrap_auc(y, p, np.arange(len(y)), n_resamples=400, seed=0)
    assert (by_patient.high - by_patient.low) > 2 * (by_slice.high - by_slice.low)


def test_bootstrap_edge_cases():
    assert m.bootstrap_auc(np.zeros(5, int), np.linspace(0, 1, 5), np.arange(5)) is None
    perfect = m.bootstrap_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0, 1, 2, 3], n_resamples=200)
    assert perfect.auc == 1.0 and perfect.low == 1.0 and perfect.high == 1.0
    assert perfect.n_valid < 200  # some resamples drew one class only
    with pytest.raises(ValueError):
        m.bootstrap_auc([0, 1], [0.1, 0.9], [0])
    with pytest.raises(ValueError):
        m.bootstrap_auc([0, 1], [0.1, 0.9], [0, 1], confidence=1.5)


def test_bootstrap_difference_is_paired():
    rng = np.random.default_rng(1)
    n = 600
    patients = np.arange(n) // 6
    y = (rng.random(n) < 0.3).astype(int)
    good = np.clip(0.5 * y + 0.5 * rng.random(n), 0, 1)
    weak = np.clip(0.1 * y + 0.9 * rng.random(n), 0, 1)
    same = m.bootstrap_auc_difference(y, good, good, patients, n_resamples=200)
    assert same.difference == 0.0 and same.low == 0.0 and same.high == 0.0
    diff = m.bootstrap_auc_difference(y, good, weak, patients, n_resamples=300, seed=2)
    assert diff.difference == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))
    assert 0 < diff.low < diff.difference < diff.high
    assert diff.p_value < 0.01
    reverse = m.bootstrap_auc_difference(y, weak, good, patients, n_resamples=300, seed=2)
    assert reverse.low == pytest.approx(-diff.high) and reverse.high == pytest.approx(-diff.low)
    json.dumps(diff.to_dict())


def test_bootstrap_by_label_covers_all_labels():
    y, p = _random_set(120)
    y[:, 0] = 0
    out = m.bootstrap_auc_by_label(y, p, np.arange(120) // 4, n_resamples=50)
    assert list(out) == list(LABELS)
    assert out["epidural"] is None
    assert out["any"].auc == pytest.approx(roc_auc_score(y[:, ANY], p[:, ANY]))


# -------------------------------------------------------------------------------------- z-smoothing
def test_zsmooth_by_hand_with_shuffled_rows_and_two_series():
    # series A slices at z 0, 5, 10, 15 given out of order; series B one slice; series C two slices.
    series = np.array(["A", "B", "A", "C", "A", "C", "A"])
    z = np.array([10.0, 3.0, 0.0, 1.0, 15.0, -1.0, 5.0])
    p = np.array([0.3, 0.9, 0.1, 0.5, 0.4, 0.0, 0.2])
    out = m.zsmooth(p, series, z)
    # A in z order: 0.1 (z0), 0.2 (z5), 0.3 (z10), 0.4 (z15)
    a0 = (1.8 * 0.1 + 0.6 * 0.2) / 2.4
    a1 = (0.6 * 0.1 + 1.8 * 0.2 + 0.6 * 0.3) / 3.0
    a2 = (0.6 * 0.2 + 1.8 * 0.3 + 0.6 * 0.4) / 3.0
    a3 = (0.6 * 0.3 + 1.8 * 0.4) / 2.4
    c_low = (1.8 * 0.0 + 0.6 * 0.5) / 2.4  # z -1
    c_high = (0.6 * 0.0 + 1.8 * 0.5) / 2.4  # z 1
    assert out == pytest.approx([a2, 0.9, a0, c_high, a3, c_low, a1])


def test_zsmooth_multi_column_matches_per_column_and_keeps_constant_series():
    rng = np.random.default_rng(0)
    series = rng.integers(0, 5, 50).astype(str)
    z = rng.random(50) * 100
    p = rng.random((50, 6))
    out = m.zsmooth(p, series, z)
    for j in range(6):
        assert out[:, j] == pytest.approx(m.zsmooth(p[:, j], series, z))
    constant = m.zsmooth(np.full(50, 0.25), series, z)
    assert constant == pytest.approx(np.full(50, 0.25))
    with pytest.raises(ValueError):
        m.zsmooth(p, series[:10], z)


# ----------------------------------------------------------------------------------------- summaries
def test_summarise_fields_and_strict_json():
    y, p = _random_set(80)
    y[:, 0] = 0
    s = m.summarise(y, p)
    assert s["n_images"] == 80
    assert list(s["auc"]) == list(LABELS) and s["auc"]["epidural"] is None
    assert s["weighted_log_loss"] == pytest.approx(m.weighted_log_loss(y, p))
    assert s["accuracy"] == pytest.approx(m.multilabel_accuracy(y, p))
    assert s["accuracy_kind"] == "per_label@0.5"
    assert s["positives"]["any"] == int(y[:, ANY].sum())
    json.dumps(s, allow_nan=False)
    stage1 = m.summarise(y, p, stage1_pred=np.zeros(80, dtype=int))
    targets = m.stage1_targets(y)
    assert stage1["accuracy"] == pytest.approx(np.mean(targets[targets >= 0] == 0))
    assert stage1["accuracy_kind"] == "stage1"


def test_validation_metrics_columns():
    from hemorrhage_core.runs import METRICS_COLUMNS

    y, p = _random_set(60)
    row = m.validation_metrics(y, p, series_ids=np.arange(60) // 6, z=np.arange(60) % 6)
    assert set(row) <= set(METRICS_COLUMNS)
    assert {c for c in METRICS_COLUMNS if c.startswith("val_") and c != "val_loss"} == set(row)
    assert row["val_zs_weighted_log_loss"] == pytest.approx(
        m.weighted_log_loss(y, m.zsmooth(p, np.arange(60) // 6, np.arange(60) % 6))
    )
    assert m.validation_metrics(y, p)["val_zs_auc_any"] is None
