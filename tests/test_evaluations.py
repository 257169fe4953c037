"""Saved evaluations, operating points, study level and the held-out test split, checked against
independent recomputations (scikit-learn, hand-worked cases) and against damaged files on disk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from hemorrhage_core import evaluations as ev
from hemorrhage_core import metrics
from hemorrhage_core.calibration import Calibration
from hemorrhage_core.data import split_test
from hemorrhage_core.labels import LABELS, SUBTYPES


def predictions(n_patients: int = 30, slices: int = 6, seed: int = 0, signal: float = 2.0) -> pd.DataFrame:
    """A predictions.csv-like frame: one series per patient, labels correlated with the scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        bleed = rng.random() < 0.5
        for s in range(slices):
            row = {"image_id": f"ID_{p:04x}{s:05x}", "patient": f"p{p:03d}", "series": f"s{p:03d}", "z": float(s)}
            truth = {label: 0 for label in LABELS}
            if bleed and s >= slices // 2:
                sub = LABELS[p % 5]
                truth[sub] = truth["any"] = 1
            for label in LABELS:
                row[f"true_{label}"] = truth[label]
            for label in LABELS:
                logit = signal * (2 * truth[label] - 1) + rng.normal(0, 1.5)
                row[f"prob_{label}"] = float(1 / (1 + np.exp(-logit)))
            rows.append(row)
    return pd.DataFrame(rows)


def test_youden_threshold_on_a_hand_case():
    # scores 0.1 0.4 0.35 0.8 with truth 0 0 1 1: at 0.35 tpr 1, fpr 0.5 (J .5); at 0.8 tpr .5 fpr 0 (J .5);
    # at 0.4 tpr .5 fpr .5. Tie between 0.8 and 0.35: the higher threshold wins.
    assert metrics.youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8
    assert metrics.youden_threshold([0, 1, 0, 1], [0.1, 0.6, 0.3, 0.9]) == 0.6  # J = 1 at 0.6
    assert metrics.youden_threshold([1, 1], [0.2, 0.3]) is None


def test_study_frame_takes_the_maximum_per_series():
    frame = predictions(n_patients=4, slices=3)
    studies = ev.study_frame(frame)
    assert len(studies) == 4 and list(studies["n_slices"]) == [3, 3, 3, 3]
    for _, row in studies.iterrows():
        part = frame[frame["series"] == row["series"]]
        for label in LABELS:
            assert row[f"prob_{label}"] == part[f"prob_{label}"].max()
            assert row[f"true_{label}"] == part[f"true_{label}"].max()


def test_evaluation_metrics_agree_with_an_independent_recomputation():
    frame = predictions()
    thresholds = ev.choose_thresholds(predictions(seed=1))
    out = ev.evaluation_metrics(frame, thresholds, stage=2)
    assert out["n_images"] == len(frame) and out["n_patients"] == 30 and out["n_studies"] == 30
    assert out["ece_bins"] == 15
    for label in LABELS:
        t, p = frame[f"true_{label}"].to_numpy(), frame[f"prob_{label}"].to_numpy()
        assert out["auc"][label] == pytest.approx(roc_auc_score(t, p), abs=1e-12)
        assert out["brier"][label] == pytest.approx(brier_score_loss(t, p), abs=1e-12)
        th = thresholds["slice"][label]
        assert out["threshold"][label] == th
        pred = p >= th
        assert out["sensitivity"][label] == pytest.approx(pred[t == 1].mean())
        assert out["specificity"][label] == pytest.approx((~pred[t == 0]).mean())
        assert out["ppv"][label] == pytest.approx(t[pred].mean())
    # Study level: one row per series, maxima, scored with sklearn independently.
    grouped = frame.groupby("series").max(numeric_only=True)
    assert out["study"]["n_studies"] == len(grouped)
    for label in LABELS:
        expected = roc_auc_score(grouped[f"true_{label}"], grouped[f"prob_{label}"])
        assert out["study"]["auc"][label] == pytest.approx(expected, abs=1e-12)
        assert out["study"]["threshold"][label] == thresholds["study"][label]
    # The historic keys stay as they were.
    assert {"n_images", "auc", "weighted_log_loss", "accuracy"} <= set(out)
    json.dumps(out, allow_nan=False)


def test_consistent_report_scores_every_label_as_predictions_report_it():
    frame = predictions()
    # A subdural output that fires on slices without blood, where any is sure there is none.
    noisy = frame.copy()
    clear = noisy["true_any"] == 0
    noisy.loc[clear, "prob_any"] = 0.01
    noisy.loc[clear, "prob_subdural"] = np.linspace(0.05, 0.95, int(clear.sum()))
    out = ev.evaluation_metrics(noisy, ev.choose_thresholds(noisy), stage=2)["consistent"]
    y_true, y_prob = ev.arrays(noisy)
    ruled = np.minimum(y_prob[:, :5], y_prob[:, [5]])
    for j, label in enumerate(LABELS[:5]):
        assert out["own"]["auc"][label] == pytest.approx(roc_auc_score(y_true[:, j], y_prob[:, j]), abs=1e-12)
        assert out["rule"]["auc"][label] == pytest.approx(roc_auc_score(y_true[:, j], ruled[:, j]), abs=1e-12)
        assert out["lowered"][label] == pytest.approx(float(np.mean(ruled[:, j] < y_prob[:, j])), abs=1e-12)
    assert out["rule"]["auc"]["any"] == out["own"]["auc"]["any"]  # any is never moved
    assert out["rule"]["auc"]["subdural"] > out["own"]["auc"]["subdural"]  # its false alarms are gone
    assert out["lowered"]["subdural"] >= clear.mean()  # every clear slice's subdural was above 0.01
    assert out["rule"]["weighted_log_loss"] < out["own"]["weighted_log_loss"]


def test_subtype_auc_given_any_scores_the_bleed_slices_only():
    frame = predictions()
    out = ev.evaluation_metrics(frame, ev.choose_thresholds(frame), stage=2)["auc_given_any"]
    assert set(out) == set(LABELS) - {"any"}
    bleeds = frame[frame["true_any"] == 1]
    for label in out:
        assert out[label] == pytest.approx(roc_auc_score(bleeds[f"true_{label}"], bleeds[f"prob_{label}"]), abs=1e-12)
    # A subtype output that only says "blood" (the same score on every bleed slice) tells no type apart.
    flat = frame.copy()
    flat["prob_subdural"] = flat["true_any"] * 0.9
    assert ev.subtype_auc_given_any(*ev.arrays(flat))["subdural"] == 0.5
    assert ev.subtype_auc_given_any(*ev.arrays(frame[frame["true_any"] == 0]))["subdural"] is None


def test_subtype_pairs_score_each_output_against_each_other_type():
    frame = predictions()
    out = ev.evaluation_metrics(frame, ev.choose_thresholds(frame), stage=2)["subtype_pairs"]
    subtypes = [label for label in LABELS if label != "any"]
    assert set(out) == set(subtypes) and all(set(out[a]) == set(subtypes) - {a} for a in subtypes)
    for a in subtypes:
        for b in subtypes:
            if b == a:
                continue
            own = frame[frame[f"true_{a}"] == 1]
            other = frame[(frame[f"true_{b}"] == 1) & (frame[f"true_{a}"] == 0)]
            y = np.r_[np.ones(len(own)), np.zeros(len(other))]
            expected = roc_auc_score(y, np.r_[own[f"prob_{a}"], other[f"prob_{a}"]])
            assert out[a][b] == pytest.approx(expected, abs=1e-12)
    # An epidural output that reads "blood under the skull" (higher on subdural slices than on its own)
    # is taken for subdural: under 0.5 against it.
    taken = frame.copy()
    taken["prob_epidural"] = 0.2 * taken["true_epidural"] + 0.6 * taken["true_subdural"]
    taken = taken[(taken["true_epidural"] + taken["true_subdural"]) < 2]
    assert ev.subtype_pair_auc(*ev.arrays(taken))["epidural"]["subdural"] == 0.0
    no_edh = frame[frame["true_epidural"] == 0]
    assert ev.subtype_pair_auc(*ev.arrays(no_edh))["epidural"]["subdural"] is None


def test_along_z_asks_whether_each_series_peaks_on_its_bleed_slices():
    rows = []
    # s1 rises and separates (AUC 1, gap .7 - .1); s2 rises without separating; s3 falls (AUC 0);
    # s4 has no blood and s5 blood on every slice: neither counts.
    series = {
        "s1": ([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.1]),
        "s2": ([0, 1, 1, 0], [0.5, 0.9, 0.4, 0.2]),
        "s3": ([1, 0, 0], [0.1, 0.5, 0.6]),
        "s4": ([0, 0], [0.9, 0.1]),
        "s5": ([1, 1], [0.9, 0.1]),
    }
    for name, (truth, prob) in series.items():
        for k, (t, p) in enumerate(zip(truth, prob, strict=True)):
            row = {"image_id": f"{name}-{k}", "patient": name, "series": name, "z": float(k)}
            row.update({f"true_{label}": 0 for label in LABELS} | {"true_any": t})
            row.update({f"prob_{label}": 0.0 for label in LABELS} | {"prob_any": p})
            rows.append(row)
    out = ev.along_z(pd.DataFrame(rows))
    assert (out["n_series"], out["rising"], out["separated"]) == (3, 2, 1)
    # s2: bleed .9 and .4 against .5 and .2: pairs won 3 of 4; gap .65 - .35 = .3; s3: gap .1 - .55.
    assert out["auc_mean"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert out["gap_mean"] == pytest.approx((0.6 + 0.3 - 0.45) / 3)
    full = ev.evaluation_metrics(pd.DataFrame(rows), ev.choose_thresholds(pd.DataFrame(rows)), stage=2)
    assert full["along_z"] == out
    # each subtype's own output along z: here only subdural, on s1's slices 1 and 2, scored .7 against .2
    frame = pd.DataFrame(rows)
    frame.loc[frame["image_id"].isin(["s1-1", "s1-2"]), "true_subdural"] = 1
    frame["prob_subdural"] = np.where(frame["image_id"].isin(["s1-1", "s1-2"]), 0.7, 0.2)
    by_type = ev.evaluation_metrics(frame, ev.choose_thresholds(frame), stage=2)["along_z_subtypes"]
    assert list(by_type) == list(SUBTYPES)
    assert by_type["subdural"] == {"label": "subdural", "n_series": 1, "rising": 1, "separated": 1,
                                   "auc_mean": 1.0, "gap_mean": pytest.approx(0.5)}
    assert all(by_type[label]["n_series"] == 0 for label in SUBTYPES if label != "subdural")
    empty = ev.along_z(pd.DataFrame(rows[-4:]))  # s4 and s5 only
    assert empty == {"label": "any", "n_series": 0, "rising": 0, "separated": 0, "auc_mean": None, "gap_mean": None}


def test_a_label_with_one_class_gets_the_default_threshold_and_says_so():
    frame = predictions()
    frame["true_epidural"] = 0
    chosen = ev.choose_thresholds(frame)
    assert chosen["slice"]["epidural"] == ev.DEFAULT_THRESHOLD and "epidural" in chosen["slice_defaulted"]
    assert "any" not in chosen["slice_defaulted"]


def write_run(tmp_path, frame: pd.DataFrame):
    run = tmp_path / "run"
    run.mkdir()
    frame.to_csv(run / "predictions.csv", index=False)
    return run


def test_saved_evaluation_round_trips_and_lists_test_first(tmp_path):
    run = write_run(tmp_path, predictions(seed=3))
    frame = predictions(seed=4)
    result = ev.evaluation_metrics(frame, ev.run_thresholds(run, None), stage=2)
    ev.write_evaluation(run, "external", frame, result)
    ev.write_evaluation(run, "test", frame, result)
    names = [s.name for s in ev.list_evaluations(run)]
    assert names == ["test", "external", "validation"]
    data = ev.load_evaluation(run, "test")
    assert data.saved == json.loads(json.dumps(result))
    pd.testing.assert_frame_equal(data.predictions[frame.columns].reset_index(drop=True), frame, check_dtype=False)
    assert not data.optimistic and ev.load_evaluation(run, "validation").optimistic
    assert "optimistic" in ev.load_evaluation(run, "validation").describe()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "metrics.json").unlink(), "incomplete"),
        (lambda d: (d / "metrics.json").write_text("{half"), "not valid JSON"),
        (lambda d: (d / "predictions.csv").unlink(), "predictions.csv is missing"),
    ],
)
def test_damaged_or_half_written_evaluations_are_listed_with_a_reason(tmp_path, damage, reason):
    run = write_run(tmp_path, predictions())
    frame = predictions(seed=5)
    folder = ev.write_evaluation(run, "test", frame, ev.evaluation_metrics(frame, ev.run_thresholds(run, None), stage=2))
    damage(folder)
    status = {s.name: s for s in ev.list_evaluations(run)}
    assert not status["test"].ok and reason in status["test"].problem
    with pytest.raises(ev.EvaluationError, match=reason):
        ev.load_evaluation(run, "test")


def test_damaged_predictions_are_refused_with_a_reason(tmp_path):
    run = write_run(tmp_path, predictions())
    frame = predictions(seed=5)
    folder = ev.write_evaluation(run, "test", frame, ev.evaluation_metrics(frame, ev.run_thresholds(run, None), stage=2))
    broken = frame.copy()
    broken.loc[0, "prob_any"] = 7.0
    broken.to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(ev.EvaluationError, match=r"probabilities must be numbers in \[0, 1\]"):
        ev.load_evaluation(run, "test")
    with pytest.raises(ev.EvaluationError, match="must be 1-64"):
        ev.evaluation_dir(run, "../escape")


def overconfident(n_patients: int = 100, seed: int = 0) -> pd.DataFrame:
    """Truth drawn from sigmoid(z), the model saying sigmoid(3 z): a temperature of about 3 fixes it."""
    rng = np.random.default_rng(seed)
    frame = predictions(n_patients=n_patients, seed=seed)
    z = rng.normal(0, 1.5, (len(frame), len(LABELS)))
    frame[ev.TRUE_COLUMNS] = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(int)
    frame[ev.PROB_COLUMNS] = 1 / (1 + np.exp(-3 * z))
    return frame


def test_calibration_is_stored_applied_to_validation_and_inverted(tmp_path):
    frame = overconfident()
    run = write_run(tmp_path, frame)
    calibration = ev.fit_calibration(run)
    assert ev.read_calibration(run) == calibration
    assert all(2.0 < t < 4.5 for t in calibration.temperatures.values()), calibration.temperatures
    thresholds = json.loads((run / ev.THRESHOLDS_JSON).read_text())
    assert thresholds["calibrated"] is True
    data = ev.load_evaluation(run, "validation")
    raw = ev.arrays(frame)[1]
    np.testing.assert_allclose(ev.arrays(data.predictions)[1], calibration.apply(raw))
    np.testing.assert_allclose(ev.arrays(data.raw())[1], raw, atol=1e-9)
    # Calibrated thresholds are chosen on the calibrated scale: same ranking, so the same operating point.
    t = frame["true_any"].to_numpy()
    th = thresholds["slice"]["any"]
    calibrated_any = ev.arrays(data.predictions)[1][:, LABELS.index("any")]
    uncal = ev.choose_thresholds(frame)["slice"]["any"]
    assert ((calibrated_any >= th) == (raw[:, LABELS.index("any")] >= uncal)).all()
    assert t.sum() > 0


def test_a_damaged_calibration_file_is_an_evaluation_error(tmp_path):
    run = write_run(tmp_path, predictions())
    (run / ev.CALIBRATION_JSON).write_text(json.dumps({"method": "temperature"}))
    with pytest.raises(ev.EvaluationError, match="calibration.json is damaged"):
        ev.read_calibration(run)


def test_calibration_report_before_and_after():
    frame = overconfident()
    t, p = ev.arrays(frame)
    calibration = Calibration.fit(t, p)
    report = ev.calibration_report(t, p, calibration.apply(p))
    assert report["after"]["weighted_log_loss"] < report["before"]["weighted_log_loss"]
    assert set(report["before"]["ece"]) == set(LABELS)


def index_table(n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        bleed = int(rng.random() < 0.3)
        for s in range(3):
            row = {"image_id": f"ID_{p:03d}{s}", "patient_id": f"P{p:03d}"}
            row.update({label: 0 for label in LABELS})
            row["any"] = row["subdural"] = bleed
            rows.append(row)
    return pd.DataFrame(rows)


def test_split_test_is_patient_disjoint_stratified_and_fixed_by_the_seed():
    table = index_table()
    rest, test = split_test(table, fraction=0.2, seed=0)
    assert set(rest["patient_id"]).isdisjoint(test["patient_id"])
    assert len(rest) + len(test) == len(table)
    assert test["patient_id"].nunique() == 8  # round(0.2 * 40)
    patients = table.groupby("patient_id")["any"].max()
    held = patients[test["patient_id"].unique()]
    # Stratified on `any`: the test share of bleeding patients matches the whole within one patient.
    assert abs(held.sum() - 8 * patients.mean()) <= 1
    again = split_test(table, fraction=0.2, seed=0)[1]
    assert list(again["image_id"]) == list(test["image_id"])
    assert set(split_test(table, fraction=0.2, seed=1)[1]["patient_id"]) != set(test["patient_id"])


def test_split_test_refuses_a_fraction_that_leaves_nothing():
    from hemorrhage_core.errors import DatasetError

    with pytest.raises(DatasetError, match="no test patient"):
        split_test(index_table(n_patients=3), fraction=0.1)
