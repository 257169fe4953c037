"""hemorrhage_core.calibration against hand-computed values, scikit-learn and a known temperature."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.metrics import brier_score_loss, log_loss

from hemorrhage_core import calibration as cal
from hemorrhage_core.labels import LABELS


# ------------------------------------------------------------------------------------- reliability
def test_ece_matches_hand_computed_case():
    # 5 bins of width 0.2.
    # bin [0, 0.2): p 0.05, 0.15 -> mean 0.10, truth 0, 1 -> 0.5, gap 0.40, weight 2/5 -> 0.16
    # bin [0.2, 0.4): p 0.25 -> mean 0.25, truth 0 -> 0.0, gap 0.25, weight 1/5 -> 0.05
    # bin [0.8, 1.0]: p 0.85, 0.95 -> mean 0.90, truth 1, 1 -> 1.0, gap 0.10, weight 2/5 -> 0.04
    # ECE = 0.16 + 0.05 + 0.04 = 0.25
    y = [0, 1, 0, 1, 1]
    p = [0.05, 0.15, 0.25, 0.85, 0.95]
    rel = cal.reliability(y, p, n_bins=5)
    assert rel.count.tolist() == [2, 1, 0, 0, 2]
    assert rel.bin_lower == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert rel.bin_upper == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rel.mean_predicted[[0, 1, 4]] == pytest.approx([0.10, 0.25, 0.90], abs=1e-12)
    assert rel.fraction_positive[[0, 1, 4]] == pytest.approx([0.5, 0.0, 1.0], abs=1e-12)
    assert np.isnan(rel.fraction_positive[[2, 3]]).all() and np.isnan(rel.mean_predicted[[2, 3]]).all()
    assert rel.ece == pytest.approx(0.25, abs=1e-12)
    assert cal.expected_calibration_error(y, p, n_bins=5) == pytest.approx(0.25, abs=1e-12)
    as_json = json.loads(json.dumps(rel.to_dict()))  # NaN written as null, so the dict is valid JSON
    assert as_json["fraction_positive"][2] is None and as_json["count"] == [2, 1, 0, 0, 2]


def test_bin_edges_zero_and_one():
    rel = cal.reliability([0, 1], [0.0, 1.0])
    assert len(rel.count) == cal.ECE_BINS == 15
    assert rel.count[0] == 1 and rel.count[-1] == 1 and rel.count.sum() == 2
    assert rel.ece == 0.0
    # Bins are closed on the left: 0.2 starts the second of five bins, 0.8 the last.
    assert cal.reliability([0, 0], [0.2, 0.8], n_bins=5).count.tolist() == [0, 1, 0, 0, 1]


def test_empty_input_is_none():
    assert cal.expected_calibration_error([], []) is None
    assert cal.brier([], []) is None


def test_brier_matches_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.3).astype(int)
    p = rng.random(500)
    assert cal.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


# ------------------------------------------------------------------------------ temperature scaling
def _overconfident(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth drawn from sigmoid(z); the model reports sigmoid(z * temperature)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return y, expit(z * temperature)


def test_fit_recovers_known_temperature():
    y, p = _overconfident(20000, 3.0, seed=0)
    assert cal.fit_temperature(y, p) == pytest.approx(3.0, rel=0.10)


def test_one_class_label_keeps_temperature_one():
    assert cal.fit_temperature([0, 0, 0], [0.1, 0.9, 0.5]) == 1.0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 17.0])
def test_apply_and_invert_round_trip(temperature):
    apply, invert = cal.apply_temperature, cal.invert_temperature
    p = np.concatenate([[0.0, 1.0], np.linspace(1e-4, 1 - 1e-4, 1001)])
    assert invert(apply(p, temperature), temperature) == pytest.approx(p, abs=1e-9)
    # The other way round, where the raw sigmoid(T * logit(q)) stays > 1e-8 from 0 and 1: nearer, float64
    # keeps too few digits of 1 - p to recover q to 1e-9.
    q = p[np.abs(logit(p)) * temperature < 18]
    assert apply(invert(q, temperature), temperature) == pytest.approx(q, abs=1e-9)
    with pytest.raises(ValueError):
        cal.apply_temperature(p, 0.0)


def _six_labels(n: int = 4000) -> tuple[np.ndarray, np.ndarray, list[float]]:
    temps = [0.7, 1.5, 2.0, 3.0, 4.0, 1.2]
    cols = [_overconfident(n, t, seed=j) for j, t in enumerate(temps)]
    return np.stack([c[0] for c in cols], 1), np.stack([c[1] for c in cols], 1), temps


def test_calibration_lowers_nll_and_round_trips():
    y, p, temps = _six_labels()
    c = cal.Calibration.fit(y, p)
    assert c.method == "temperature" and c.fitted_on == "validation" and c.n_images == len(y)
    assert list(c.temperatures) == list(LABELS)
    assert [c.temperatures[label] for label in LABELS] == pytest.approx(temps, rel=0.2)
    calibrated = c.apply(p)
    for j, label in enumerate(LABELS):
        raw = log_loss(y[:, j], np.clip(p[:, j], 1e-7, 1 - 1e-7))
        after = log_loss(y[:, j], np.clip(calibrated[:, j], 1e-7, 1 - 1e-7))
        assert c.nll_before[label] == pytest.approx(raw, rel=1e-9)
        assert c.nll_after[label] == pytest.approx(after, rel=1e-9)
        assert after <= raw
    assert c.invert(calibrated) == pytest.approx(p, abs=1e-9)
    assert cal.Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _valid_dict() -> dict:
    y, p, _ = _six_labels(500)
    return cal.Calibration.fit(y, p).to_dict()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2.0", None, True])
def test_from_dict_refuses_bad_temperature(bad):
    d = _valid_dict()
    d["temperatures"]["subdural"] = bad
    with pytest.raises(ValueError, match="subdural"):
        cal.Calibration.from_dict(d)


def test_from_dict_refuses_missing_label_or_field():
    d = _valid_dict()
    del d["temperatures"]["any"]
    with pytest.raises(ValueError, match="any"):
        cal.Calibration.from_dict(d)
    d = _valid_dict()
    del d["temperatures"]
    with pytest.raises(ValueError, match="temperatures"):
        cal.Calibration.from_dict(d)
    with pytest.raises(ValueError):
        cal.Calibration.from_dict([1.0] * 6)
    with pytest.raises(ValueError, match="method"):
        cal.Calibration.from_dict({**_valid_dict(), "method": "isotonic"})


def test_calibration_refuses_wrong_shape():
    y, p, _ = _six_labels(50)
    c = cal.Calibration.fit(y, p)
    with pytest.raises(ValueError):
        c.apply(p[:, :5])
    with pytest.raises(ValueError):
        cal.Calibration.fit(y[:0], p[:0])
    assert math.isfinite(c.nll_after["any"])
