"""GridSearchCV over the trainer: patient-grouped folds, validation-metric scoring, a grid run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, GroupKFold
from train_fixtures import PATIENT_NAME, PATIENT_PREFIX, tiny_config, write_tiny_set

from hemorrhage_core import metrics
from hemorrhage_core.data import build_index
from hemorrhage_core.labels import LABELS
from training.config import ConfigError
from training.estimator import TUNABLE, HemorrhageEstimator, make_scorer
from training.grid_search_cmd import load_grid

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid_data")
    write_tiny_set(root, n_patients=9, slices_per_patient=3)
    return root


def test_estimator_clones_with_its_parameters():
    est = HemorrhageEstimator(tiny_config("d", "r"), lr=0.01, batch_size=15)
    copy = clone(est)
    assert copy.get_params()["lr"] == 0.01 and copy.get_params()["batch_size"] == 15
    assert copy.effective_config().lr == 0.01 and copy.effective_config().epochs == 1
    with pytest.raises(ConfigError):
        HemorrhageEstimator(tiny_config("d", "r"), lr=-1.0).effective_config()


def test_every_tunable_field_is_an_estimator_parameter():
    # GridSearchCV sets only parameters the estimator's __init__ declares.
    params = HemorrhageEstimator().get_params()
    assert set(TUNABLE) <= set(params)
    est = HemorrhageEstimator(tiny_config("d", "r"), stage1_multi="share", subtype_ce_weight=0.5)
    assert est.effective_config().stage1_multi == "share" and est.effective_config().subtype_ce_weight == 0.5
    est = HemorrhageEstimator(tiny_config("d", "r"), label_smoothing=0.1, label_weights=[1, 1, 1, 2, 1, 2])
    assert est.effective_config().label_smoothing == 0.1 and est.effective_config().label_weights == [1, 1, 1, 2, 1, 2]


@pytest.mark.slow
def test_group_kfold_never_puts_a_patient_in_both_folds(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path, max_steps_per_epoch=2)
    X = build_index(tiny_data, progress=False).table
    X = X[X["stage1_class"] >= 0].reset_index(drop=True)
    seen = []
    auc_mean = make_scorer("auc_mean")

    def recording_scorer(estimator, X_test, y=None):
        seen.append((set(estimator.fit_patients_), set(X_test["patient_id"]), estimator.n_fit_images_))
        probs = estimator.predict_proba(X_test)
        assert probs.shape == (len(X_test), len(LABELS)) and np.all((probs >= 0) & (probs <= 1))
        # The scorer is the validation AUC of the held-out patients' slices.
        expected = metrics.mean_defined(metrics.per_label_auc(X_test[list(LABELS)].to_numpy(), probs))
        value = auc_mean(estimator, X_test)
        assert value == pytest.approx(expected)
        return value

    search = GridSearchCV(
        HemorrhageEstimator(config), {"lr": [1e-3, 1e-2]}, scoring=recording_scorer, cv=GroupKFold(n_splits=3),
        refit=False, error_score="raise",
    )
    search.fit(X, X[list(LABELS)].to_numpy(), groups=X["patient_id"].to_numpy())
    assert len(seen) == 2 * 3
    everyone = set(X["patient_id"])
    for fit_patients, test_patients, n_fit in seen:
        assert not fit_patients & test_patients
        assert fit_patients | test_patients == everyone and n_fit > 0
    for k in range(2):  # each candidate tests every patient exactly once over its folds
        tested = [p for _, test, _ in seen[3 * k : 3 * k + 3] for p in test]
        assert sorted(tested) == sorted(everyone)


@pytest.mark.slow
def test_stage1_multi_decides_which_fold_images_train(tiny_data, tmp_path):
    # The folds keep the images with several subtypes; each fit's stage-1 dataset drops or shares them.
    X = build_index(tiny_data, progress=False).table
    single = int((X["stage1_class"] >= 0).sum())
    assert single < len(X)
    fitted = {
        multi: HemorrhageEstimator(tiny_config(tiny_data, tmp_path, max_steps_per_epoch=1), stage1_multi=multi).fit(X)
        for multi in ("drop", "share")
    }
    assert fitted["drop"].n_fit_images_ == single and fitted["share"].n_fit_images_ == len(X)


def test_grid_file_is_checked(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("grid: {learning_rate: [1]}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_grid(str(path))
    path.write_text("grid: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="list"):
        load_grid(str(path))
    example = load_grid(str(REPO / "training" / "configs" / "grid-example.yaml"))
    assert example["grid"]["batch_size"] == [10, 15] and len(example["grid"]["lr"]) >= 2


@pytest.mark.slow
def test_grid_search_command_writes_a_grid_run(tiny_data, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "scoring: weighted_log_loss\nfolds: 3\n"
        "base: {image_size: 32, input_size: 32, epochs: 1, max_steps_per_epoch: 2, threads: 1, augment: false,"
        " warmup_epochs: 0}\n"
        "grid: {batch_size: [2, 3]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "training", "grid-search", "--data", str(tiny_data), "--backbone", "resnet18",
         "--stage", "1", "--grid", str(grid), "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["kind"] == "grid" and info["status"] == "finished" and "-grid-resnet18-s1-" in info["id"]
    assert info["grid"] == {"batch_size": [2, 3]} and info["scoring"] == "weighted_log_loss" and info["folds"] == 3
    assert info["best_params"]["batch_size"] in (2, 3) and info["best_score"] > 0  # a log loss, not its negative
    assert all(fold["n_test_patients"] >= 3 for fold in info["fold_sizes"])
    table = pd.read_csv(run_dir / "grid_results.csv")
    assert len(table) == 2
    for column in ("params", "mean_test_score", "std_test_score", "rank_test_score", "split0_test_score", "split2_test_score"):
        assert column in table.columns
    assert -table["mean_test_score"].max() == pytest.approx(info["best_score"])
    for path in run_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert PATIENT_NAME.split("^")[0].encode() not in content and PATIENT_PREFIX.encode() not in content
