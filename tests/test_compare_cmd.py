"""``python -m training compare``: a paired comparison of two runs' saved evaluations, checked against
the statistics computed directly, with refusals for evaluations that cannot be paired."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluations import predictions

from hemorrhage_core import evaluations as ev
from hemorrhage_core import metrics
from hemorrhage_core.comparison import paired_comparison, summary_sentences
from hemorrhage_core.labels import LABELS
from hemorrhage_core.stats import delong_test, holm
from training import cli


def make_run(root, name: str, frame, *, evaluation: str = "test", backbone: str = "vgg16_bn"):
    run = root / name
    run.mkdir(parents=True)
    info = {"format_version": 1, "id": name, "kind": "train", "backbone": backbone, "stage": 2,
            "status": "finished", "config": {}}
    (run / "run.json").write_text(json.dumps(info))
    frame.to_csv(run / "predictions.csv", index=False)
    ev.write_evaluation(run, evaluation, frame, ev.evaluation_metrics(frame, ev.run_thresholds(run, None), stage=2))
    return run


@pytest.fixture
def two_runs(tmp_path):
    strong = predictions(n_patients=60, seed=0, signal=3.0)
    weak = strong.copy()
    rng = np.random.default_rng(7)
    # B's scores are A's with extra noise: the same images, correlated, B weaker.
    noisy = np.clip(weak[ev.PROB_COLUMNS].to_numpy() + rng.normal(0, 0.35, (len(weak), len(LABELS))), 0, 1)
    weak[ev.PROB_COLUMNS] = noisy
    return make_run(tmp_path, "run-a", strong), make_run(tmp_path, "run-b", weak, backbone="inception_v3"), strong, weak


def call(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_json_matches_the_statistics_computed_directly(two_runs, capsys):
    run_a, run_b, fa, fb = two_runs
    code, out, err = call(capsys, "compare", "--a", str(run_a), "--b", str(run_b), "--json", "--resamples", "200")
    assert code == 0, err
    result = json.loads(out)
    assert result["paired"] is True and result["n_images"] == len(fa) and result["n_patients"] == 60
    p_values = {}
    t, pa = ev.arrays(fa)
    _, pb = ev.arrays(fb)
    for j, label in enumerate(LABELS):
        row = result["labels"][label]
        direct = delong_test(t[:, j], pa[:, j], pb[:, j], clusters=fa["patient"].to_numpy())
        assert row["auc_a"] == pytest.approx(direct.auc_a) and row["auc_b"] == pytest.approx(direct.auc_b)
        assert row["diff"] == pytest.approx(direct.auc_a - direct.auc_b)
        assert row["p_value"] == pytest.approx(direct.p_value)
        boot = metrics.bootstrap_auc_difference(t[:, j], pa[:, j], pb[:, j], fa["patient"], n_resamples=200, seed=0)
        assert row["ci"] == [pytest.approx(boot.low), pytest.approx(boot.high)]
        assert row["ci"][0] <= row["diff"] <= row["ci"][1]
        p_values[label] = row["p_value"]
    adjusted = holm(p_values)
    assert all(result["labels"][label]["p_holm"] == pytest.approx(adjusted[label]) for label in LABELS)
    # Study level: one row per series (60), maxima per label.
    assert result["study"]["n_studies"] == 60
    studies_a, studies_b = ev.study_frame(fa), ev.study_frame(fb)
    st, spa = ev.arrays(studies_a)
    _, spb = ev.arrays(studies_b)
    j = LABELS.index("any")
    direct = delong_test(st[:, j], spa[:, j], spb[:, j], clusters=studies_a["patient"].to_numpy())
    assert result["study"]["labels"]["any"]["p_value"] == pytest.approx(direct.p_value)
    assert result["a"]["backbone"] == "vgg16_bn" and result["b"]["backbone"] == "inception_v3"


def test_compare_table_says_which_differences_hold(two_runs, capsys):
    run_a, run_b, _, _ = two_runs
    code, out, _ = call(capsys, "compare", "--a", str(run_a), "--b", str(run_b), "--resamples", "50")
    assert code == 0
    assert "p Holm" in out and "study level" in out and "Paired on the same 360 images of 60 patients" in out


def test_two_runs_of_one_backbone_are_told_apart_as_a_and_b(tmp_path, capsys):
    strong = predictions(n_patients=60, seed=0, signal=3.0)
    weak = strong.copy()
    noise = np.random.default_rng(7).normal(0, 0.6, (len(weak), len(LABELS)))
    weak[ev.PROB_COLUMNS] = np.clip(weak[ev.PROB_COLUMNS].to_numpy() + noise, 0, 1)
    a, b = make_run(tmp_path, "a", strong), make_run(tmp_path, "b", weak)
    code, out, _ = call(capsys, "compare", "--a", str(a), "--b", str(b), "--resamples", "50")
    assert code == 0 and "A (vgg16_bn) has the higher AUC for" in out
    code, out, _ = call(capsys, "compare", "--a", str(b), "--b", str(a), "--resamples", "50")
    assert code == 0 and "B (vgg16_bn) has the higher AUC for" in out


def test_compare_pairs_only_the_shared_images(tmp_path):
    frame = predictions(n_patients=20)
    subset = frame[frame["patient"] < "p010"]
    result = paired_comparison(frame, subset, n_resamples=20)
    assert result["n_images"] == len(subset) and result["n_patients"] == 10


def test_compare_refuses_evaluations_with_no_shared_image(tmp_path, capsys):
    a = make_run(tmp_path, "a", predictions(n_patients=10))
    other = predictions(n_patients=10)
    other["image_id"] = other["image_id"] + "x"
    b = make_run(tmp_path, "b", other)
    code, out, err = call(capsys, "compare", "--a", str(a), "--b", str(b))
    assert code == 2 and out == "" and "share no image" in err


def test_compare_refuses_evaluations_whose_labels_disagree(tmp_path, capsys):
    frame = predictions(n_patients=10)
    a = make_run(tmp_path, "a", frame)
    flipped = frame.copy()
    flipped.loc[:2, "true_any"] = 1 - flipped.loc[:2, "true_any"]
    b = make_run(tmp_path, "b", flipped)
    code, _, err = call(capsys, "compare", "--a", str(a), "--b", str(b))
    assert code == 2 and "different labels for 3 of 60" in err


def test_compare_refuses_a_missing_evaluation(tmp_path, capsys):
    a = make_run(tmp_path, "a", predictions(n_patients=10))
    b = make_run(tmp_path, "b", predictions(n_patients=10), evaluation="external")
    code, _, err = call(capsys, "compare", "--a", str(a), "--b", str(b))
    assert code == 2 and "run b" in err and "no such evaluation" in err


def test_summary_says_when_a_difference_is_not_significant():
    row = {"auc_a": 0.9, "auc_b": 0.89, "diff": 0.01, "ci": [-0.02, 0.04], "p_value": 0.4, "p_holm": 0.8}
    sig = {"auc_a": 0.95, "auc_b": 0.7, "diff": 0.25, "ci": [0.2, 0.3], "p_value": 1e-6, "p_holm": 6e-6}
    none = {"auc_a": None, "auc_b": None, "diff": None, "ci": [None, None], "p_value": None, "p_holm": None}
    result = {"n_images": 10, "n_patients": 5, "labels": {"any": sig, "subdural": row, "epidural": none}}
    text = " ".join(summary_sentences(result, "VGG16", "Inception"))
    assert "VGG16 has the higher AUC for any" in text
    assert "No significant difference for subdural" in text
    assert "Not testable (epidural): one class only, or all positives from one patient" in text
