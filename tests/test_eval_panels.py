"""The metric panels' data selector and evaluation figures, without a browser: choices and defaults over
saved, damaged and validation data; the shared cache; paired and unpaired comparisons; reliability
diagrams; per-class gallery thresholds. Values are checked against independent recomputations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import damage_evaluations, synthetic_predictions, write_evaluation_from, write_run
from sklearn.metrics import brier_score_loss, roc_auc_score

from hemorrhage_core import eval_plots
from hemorrhage_core import evaluations as ev
from hemorrhage_core.calibration import expected_calibration_error, reliability
from hemorrhage_core.comparison import paired_comparison
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.compare_panel import default_pair
from hemorrhage_core.dashboard.evaluation_data import (
    EvaluationCache,
    RunData,
    data_choices,
    default_data,
    describe,
    evaluation_stamp,
    pipeline_pair,
)
from hemorrhage_core.evaluations import EvaluationStatus, study_frame
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import list_runs


def status(name: str, ok: bool = True, n: int | None = 16, problem: str | None = None) -> EvaluationStatus:
    return EvaluationStatus(name, ok, n_images=n if ok else None, problem=problem)


# ------------------------------------------------------------------------------- choices
def test_one_run_lists_test_first_validation_last_and_damaged_ones_with_their_reason():
    found = [status("validation", n=96), status("external", n=40), status("half", False, problem="incomplete (x)"),
             status("test")]
    choices = data_choices([("run", found)])
    assert list(choices) == ["test", "external", "half", "validation"]
    assert choices["test"] == "test (16 images)"
    assert choices["half"] == "half (unusable: incomplete (x))"
    assert "optimistic" in choices["validation"]
    assert default_data([("run", found)]) == "test"


def test_several_runs_label_each_run_and_default_to_what_all_can_use():
    a = [status("test"), status("validation", n=96)]
    b = [status("test", False, problem="incomplete (no metrics.json)"), status("validation", n=80)]
    per_run = [("A", a), ("B", b)]
    choices = data_choices(per_run)
    assert choices["test"] == "test (A: 16 images; B: unusable, incomplete (no metrics.json))"
    assert choices["validation"] == "validation (A: 96 images; B: 80 images; chose the epoch, optimistic)"
    assert default_data(per_run) == "validation"  # test is not usable by B
    # A name only one run has is listed for it and said missing for the other.
    assert data_choices([("A", a), ("B", [status("validation", n=96)])])["test"] == "test (A: 16 images; B: none)"
    assert default_data([("A", a), ("B", [status("test")])]) == "test"
    # Same size everywhere: the plain label.
    assert data_choices([("A", a), ("B", [status("test")])])["test"] == "test (16 images)"
    assert default_data([("A", [])]) is None


def test_damaged_folders_on_disk_become_choices_with_a_status_and_refuse_to_load(tmp_path):
    run = write_run(tmp_path / "runs")
    write_evaluation_from(run, "test", synthetic_predictions(seed=3))
    damage_evaluations(run)
    found = ev.list_evaluations(run)
    choices = data_choices([("run", found)])
    assert list(choices) == ["test", "garbled", "half", "validation"]
    assert choices["half"].startswith("half (unusable: incomplete")
    assert choices["garbled"].startswith("garbled (unusable: metrics.json is damaged")
    assert default_data([("run", found)]) == "test"
    cache = EvaluationCache()
    with pytest.raises(ev.EvaluationError, match="incomplete"):
        cache.load(run, "half")
    assert cache.load(run, "test").n_images == len(synthetic_predictions(seed=3))


def test_cache_rereads_only_when_the_files_change_and_stamps_see_new_evaluations(tmp_path):
    run = write_run(tmp_path / "runs")
    before = evaluation_stamp(run)
    cache = EvaluationCache(size=2)
    first = cache.load(run, "validation")
    assert cache.load(run, "validation") is first
    write_evaluation_from(run, "test", synthetic_predictions(seed=4))
    assert evaluation_stamp(run) != before  # a new saved evaluation is seen by stat calls alone
    test = cache.load(run, "test")
    assert test.name == "test" and not test.optimistic
    frame = synthetic_predictions(seed=5, n_patients=5)
    write_evaluation_from(run, "test", frame)
    assert cache.load(run, "test") is not test and cache.load(run, "test").n_images == len(frame)


def test_describe_names_the_data_set_its_size_and_that_validation_flatters(tmp_path):
    run = write_run(tmp_path / "runs")
    write_evaluation_from(run, "test", synthetic_predictions(seed=3, n_patients=5))
    val = RunData("run", run.name, "vgg16 s2", ev.load_evaluation(run, "validation"))
    test = RunData("run", run.name, "vgg16 s2", ev.load_evaluation(run, "test"))
    assert "validation set (96 images, 12 patients, 12 series)" in describe(val)
    assert "optimistic" in describe(val)
    assert describe(test) == "vgg16 s2: saved evaluation 'test' (40 images, 5 patients, 5 series)."
    assert "study level: 5 series" in describe(test, level="study")
    assert describe(RunData("B", "x", "B run", problem="no data set 'test' in this run")).endswith("this run")


def test_compare_defaults_to_the_pipelines_final_models(tmp_path):
    root = tmp_path / "runs"
    ids = [write_run(root, backbone=b, stage=s).name for b in ("vgg16", "inception_v3") for s in (1, 2)]
    summaries = list_runs(root)
    assert pipeline_pair(root) == (None, None)
    (root / "pipeline.json").write_text(json.dumps(
        {"phase1": {"stage1": ids[0], "stage2": ids[1]}, "phase2": {"stage1": ids[2], "stage2": None}}))
    assert pipeline_pair(root) == (ids[1], None)
    assert set(default_pair(summaries, pipeline_pair(root))) == {ids[1], ids[3]}  # not in the list: usual rule
    (root / "pipeline.json").write_text(json.dumps(
        {"phase1": {"stage1": ids[0], "stage2": ids[0]}, "phase2": {"stage1": ids[2], "stage2": ids[2]}}))
    assert default_pair(summaries, pipeline_pair(root)) == (ids[0], ids[2])  # stage 1 runs, as the file says
    (root / "pipeline.json").write_text("{not json")
    assert pipeline_pair(root) == (None, None)


# ---------------------------------------------------------------------------- comparisons
def test_paired_comparison_tables_agree_with_the_library_and_sklearn():
    a = synthetic_predictions(seed=0, skill=2.0)
    b = a.copy()
    b[[f"prob_{lb}" for lb in LABELS]] = synthetic_predictions(seed=9, skill=0.5)[[f"prob_{lb}" for lb in LABELS]]
    got = tables.compare_evaluations(a, b, n_resamples=200, seed=1)
    reference = paired_comparison(a, b, n_resamples=200, seed=1)
    assert got.paired and got.n_shared == len(a) and got.reason is None
    tested = 0
    for level, rows in (("slice", reference["labels"]), ("study", reference["study"]["labels"])):
        table = got.tables[level].set_index("label")
        frame_a, frame_b = (a, b) if level == "slice" else (study_frame(a), study_frame(b))
        for label in LABELS:
            row = table.loc[label]
            if rows[label]["p_value"] is None:  # too few cases of a class at study level: empty, not made up
                assert np.isnan(row["p_value"]) and np.isnan(row["p_holm"])
                continue
            tested += 1
            assert row["p_value"] == pytest.approx(rows[label]["p_value"])
            assert row["p_holm"] == pytest.approx(rows[label]["p_holm"])
            assert [row["diff_lo"], row["diff_hi"]] == pytest.approx(rows[label]["ci"])
            assert row["auc_a"] == pytest.approx(roc_auc_score(frame_a[f"true_{label}"], frame_a[f"prob_{label}"]))
            assert row["auc_b"] == pytest.approx(roc_auc_score(frame_b[f"true_{label}"], frame_b[f"prob_{label}"]))
            assert row["lo_a"] <= row["auc_a"] <= row["hi_a"]
    assert tested >= len(LABELS) + 1  # every label at slice level, some at study level
    shown = tables.comparison_display(got.tables["slice"], paired=True)
    assert list(shown.columns) == ["class", "positives", "AUC A [95% CI]", "AUC B [95% CI]", "A − B [95% CI]",
                                   "p (DeLong)", "p (Holm)"]
    assert shown["p (Holm)"].iloc[-1] == tables.p_text(reference["labels"]["any"]["p_holm"])


def test_evaluations_without_a_shared_image_fall_back_to_unpaired_and_say_why():
    a = synthetic_predictions(seed=0)
    b = synthetic_predictions(seed=1).assign(image_id=lambda f: f["image_id"] + "_b")
    got = tables.compare_evaluations(a, b, n_resamples=100, seed=0)
    assert not got.paired and got.n_shared == 0 and "share no image" in got.reason
    table = got.tables["slice"].set_index("label")
    assert table.loc["any", "auc_a"] == pytest.approx(roc_auc_score(a["true_any"], a["prob_any"]))
    assert table["p_value"].isna().all() and table["p_holm"].isna().all()
    studies = got.tables["study"].set_index("label")
    sa = study_frame(a)
    for label in LABELS:
        if 0 < sa[f"true_{label}"].sum() < len(sa):
            assert studies.loc[label, "auc_a"] == pytest.approx(roc_auc_score(sa[f"true_{label}"], sa[f"prob_{label}"]))
        else:  # every series positive (or none): no AUC
            assert np.isnan(studies.loc[label, "auc_a"])
    assert "p (DeLong)" not in tables.comparison_display(got.tables["slice"], paired=False)


def test_comparison_figure_colours_only_holm_significant_differences_and_writes_p():
    table = pd.DataFrame({
        "label": ["any", "subdural", "epidural"], "auc_a": [0.9, 0.7, 0.6], "lo_a": [0.85, 0.6, 0.5],
        "hi_a": [0.95, 0.8, 0.7], "auc_b": [0.7, 0.69, 0.8], "lo_b": [0.6, 0.6, 0.7], "hi_b": [0.8, 0.8, 0.9],
        "diff": [0.2, 0.01, -0.2], "diff_lo": [0.1, 0.001, -0.3], "diff_hi": [0.3, 0.02, -0.1],
        "p_value": [0.0004, 0.03, np.nan], "p_holm": [0.0008, 0.08, np.nan],
    })
    fig = eval_plots.comparison_figure(table, "A", "B")
    diff = fig.data[-1]
    # Significant after Holm: A's colour. Interval above 0 but Holm's p >= 0.05: grey, not a win. No
    # p-value (DeLong undefined): not testable, grey, even though its interval excludes zero.
    assert list(diff.marker.color) == [eval_plots.RUN_COLORS[0], "#777", "#999"]
    assert list(diff.text) == ["p < 0.001 (< 0.001)", "p 0.030 (0.080)", "not testable"]
    unpaired = eval_plots.comparison_figure(table.assign(p_value=np.nan, p_holm=np.nan), "A", "B")
    colours = [eval_plots.RUN_COLORS[0], eval_plots.RUN_COLORS[0], eval_plots.RUN_COLORS[1]]
    assert list(unpaired.data[-1].marker.color) == colours  # by the interval


# ---------------------------------------------------------------------------- calibration
def test_reliability_figure_draws_each_labels_bins_counts_and_ece():
    frame = synthetic_predictions(n_patients=20, seed=2, skill=1.0)
    y_true, raw = ev.arrays(frame)
    calibrated = np.clip(raw * 0.8 + 0.1, 0, 1)
    fig = eval_plots.reliability_figure(y_true, {"raw": raw, "calibrated": calibrated})
    j = LABELS.index("subdural")
    bins = reliability(y_true[:, j], raw[:, j], 15)
    points = [t for t in fig.data if t.type == "scatter" and t.name == "raw"]
    assert len(points) == len(LABELS)
    shown = bins.count > 0
    assert list(points[j].x) == pytest.approx(list(bins.mean_predicted[shown]))
    assert list(points[j].y) == pytest.approx(list(bins.fraction_positive[shown]))
    bars = [t for t in fig.data if t.type == "bar" and t.name == "calibrated count"]
    assert all(sum(b.y) == len(frame) for b in bars)
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) == len(LABELS) and titles[j].startswith("<b>subdural</b>")
    ece_raw = expected_calibration_error(y_true[:, j], raw[:, j], 15)
    ece_cal = expected_calibration_error(y_true[:, j], calibrated[:, j], 15)
    assert f"ECE {ece_raw:.3f} → {ece_cal:.3f}" in titles[j]
    assert {t.name for t in fig.data if t.showlegend} == {"perfect calibration", "raw", "calibrated"}
    assert eval_plots.reliability_figure(y_true[:0], {"raw": raw[:0]}).layout.annotations[0].text.startswith("No ")


def test_calibration_table_before_and_after_matches_sklearn():
    frame = synthetic_predictions(seed=6)
    y_true, raw = ev.arrays(frame)
    calibrated = raw ** 2
    table = tables.calibration_table(y_true, raw, calibrated, dict.fromkeys(LABELS, 1.5)).set_index("class")
    assert list(table.columns) == ["positives", "ECE (raw)", "ECE (calibrated)", "Brier (raw)",
                                   "Brier (calibrated)", "temperature"]
    for j, label in enumerate(LABELS):
        assert table.loc[label, "Brier (raw)"] == pytest.approx(brier_score_loss(y_true[:, j], raw[:, j]), abs=1e-4)
        assert table.loc[label, "Brier (calibrated)"] == pytest.approx(
            brier_score_loss(y_true[:, j], calibrated[:, j]), abs=1e-4)
        assert table.loc[label, "positives"] == y_true[:, j].sum()
    only_raw = tables.calibration_table(y_true, raw)
    assert list(only_raw.columns) == ["class", "positives", "ECE", "Brier"]


# -------------------------------------------------------------------------------- gallery
def test_gallery_outcomes_use_one_threshold_per_class():
    frame = pd.DataFrame({
        "image_id": ["ID_0", "ID_1", "ID_2"],
        **{f"true_{lb}": [0, 0, 0] for lb in LABELS},
        **{f"prob_{lb}": [0.1, 0.1, 0.1] for lb in LABELS},
    })
    frame.loc[0, ["true_subdural", "true_any"]] = 1
    frame.loc[0, ["prob_subdural", "prob_any"]] = [0.3, 0.3]
    frame.loc[1, "prob_epidural"] = 0.3
    same = dict.fromkeys(LABELS, 0.5)
    # One threshold for all: the per-class functions agree with the single-threshold ones.
    for label in (None, "any", "epidural"):
        assert list(tables.gallery_outcomes_at(frame, label, same)) == list(tables.gallery_outcomes(frame, label, 0.5))
    own = {**same, "subdural": 0.25, "any": 0.25, "epidural": 0.25}
    assert list(tables.gallery_outcomes_at(frame, None, own)) == ["correct", "false positive", "correct"]
    assert list(tables.filter_gallery_at(frame, label="subdural", outcome="correct", thresholds=own)["image_id"]) == [
        "ID_0"]
    assert list(tables.filter_gallery_at(frame, label=None, outcome="false positive", thresholds=own)["image_id"]) == [
        "ID_1"]
    with pytest.raises(ValueError):
        tables.filter_gallery_at(frame, label=None, outcome="maybe", thresholds=own)


def test_mark_threshold_draws_the_runs_operating_point():
    from hemorrhage_core import plots

    y = np.array([0, 0, 1, 1])
    fig = plots.threshold_sweep_figure(y, np.array([0.1, 0.4, 0.35, 0.8]), 0.5, label="any")
    eval_plots.mark_threshold(fig, 0.35, "run's threshold 0.350")
    assert [s.x0 for s in fig.layout.shapes] == [0.5, 0.35]
    assert any(a.text == "run&#x27;s threshold 0.350" for a in fig.layout.annotations)
