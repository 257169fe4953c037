"""Figure builders (hemorrhage_core.plots), checked without Shiny or a browser: values against references."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from dashboard_fixtures import metrics_rows, synthetic_predictions
from PIL import Image
from sklearn import metrics as skm

from hemorrhage_core import metrics, plots
from hemorrhage_core.labels import LABELS
from hemorrhage_core.windowing import PRESETS


@pytest.fixture(scope="module")
def predictions() -> pd.DataFrame:
    return synthetic_predictions(seed=3)


@pytest.fixture(scope="module")
def history(predictions) -> pd.DataFrame:
    return pd.DataFrame(metrics_rows(predictions, 4, seed=3))


def traces_named(fig: go.Figure, fragment: str) -> list:
    return [t for t in fig.data if fragment in (t.name or "")]


def test_training_curves_overlay_runs_and_star_the_best_epoch(history):
    other = history.assign(train_loss=history["train_loss"] * 2)
    fig = plots.training_curves({"run A": history, "run B": other}, {"run A": 3, "run B": None})
    loss_a = next(t for t in fig.data if t.name == "run A · train")
    np.testing.assert_allclose(loss_a.y, history["train_loss"])
    assert list(loss_a.x) == [1, 2, 3, 4]
    stars = [t for t in fig.data if t.name == "run A · best epoch"]
    # One star on each validation panel (val loss, accuracy, weighted log loss, mean AUC), at epoch 3.
    assert len(stars) == 4 and all(list(t.x) == [3] for t in stars)
    auc_star = next(t for t in stars if t.hovertemplate.startswith("best epoch %{x}<br>val_auc_mean"))
    assert auc_star.y[0] == pytest.approx(history.loc[history.epoch == 3, "val_auc_mean"].item())
    assert not [t for t in fig.data if t.name == "run B · best epoch"]
    assert len(traces_named(fig, "run B")) == len(traces_named(fig, "run A")) - 4


def test_training_curves_skip_missing_columns_and_explain_an_empty_selection(history):
    fig = plots.training_curves({"r": history.drop(columns=["val_zs_weighted_log_loss"])})
    assert not traces_named(fig, "z-smoothed")
    empty = plots.training_curves({})
    assert not empty.data and "Select one or more runs" in empty.layout.annotations[0].text


def test_per_class_auc_curves_have_one_trace_per_label(history):
    fig = plots.per_class_auc_curves({"r": history}, {"r": 2})
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == len(LABELS)
    for trace, label in zip(lines, LABELS, strict=True):
        np.testing.assert_allclose(trace.y, history[f"val_auc_{label}"])
    assert len([t for t in fig.data if t.mode == "markers"]) == len(LABELS)


def test_roc_legend_gives_the_auc_of_each_label(predictions):
    fig = plots.roc_figure({"only": predictions})
    for label in LABELS:
        expected = skm.roc_auc_score(predictions[f"true_{label}"], predictions[f"prob_{label}"])
        (trace,) = [t for t in fig.data if t.name.startswith(f"{label} (AUC")]
        assert trace.name == f"{label} (AUC {expected:.3f})"
        fpr, tpr, _ = skm.roc_curve(predictions[f"true_{label}"], predictions[f"prob_{label}"])
        np.testing.assert_allclose(trace.x, fpr)
        np.testing.assert_allclose(trace.y, tpr)


def test_roc_overlay_distinguishes_two_runs_by_group_and_dash(predictions):
    other = synthetic_predictions(seed=4, skill=0.5)
    fig = plots.roc_figure({"first": predictions, "second": other}, labels=["any", "epidural"])
    curves = [t for t in fig.data if t.name != "chance"]
    assert {t.legendgroup for t in curves} == {"run0", "run1"}
    assert {t.legendgrouptitle.text for t in curves} == {"first (solid lines)", "second (dash lines)"}
    assert {t.line.dash for t in curves if t.legendgroup == "run1"} == {"dash"}
    assert len(curves) == 4


def test_pr_legend_gives_average_precision(predictions):
    fig = plots.roc_figure({"r": predictions}, labels=["any"], kind="pr")
    expected = skm.average_precision_score(predictions["true_any"], predictions["prob_any"])
    assert fig.data[0].name == f"any (AP {expected:.3f})"
    with pytest.raises(ValueError, match="kind"):
        plots.roc_figure({"r": predictions}, kind="det")
    assert plots.roc_figure({"r": predictions}, legend="below").layout.legend.orientation == "h"
    with pytest.raises(ValueError, match="legend"):
        plots.roc_figure({"r": predictions}, legend="left")


def test_roc_marks_a_label_without_positives_as_not_available(predictions):
    frame = predictions.assign(true_epidural=0)
    fig = plots.roc_figure({"r": frame}, labels=["epidural"])
    assert [t.name for t in fig.data if t.name != "chance"] == ["epidural (n/a)"]


def test_names_from_files_are_escaped_before_plotly_renders_them(predictions):
    fig = plots.roc_figure({"<img src=x onerror=alert(1)>": predictions, "b": predictions}, labels=["any"])
    titles = {t.legendgrouptitle.text for t in fig.data if t.name != "chance"}
    assert "&lt;img src=x onerror=alert(1)&gt; (solid lines)" in titles
    assert all("<img" not in (t.hovertemplate or "") for t in fig.data)


def test_threshold_sweep_agrees_with_threshold_metrics(predictions):
    y, p = predictions["true_any"].to_numpy(), predictions["prob_any"].to_numpy()
    grid = np.array([0.0, 0.1, 0.37, 0.5, float(p[0]), 0.9, 1.0])
    sweep = plots.threshold_sweep(y, p, grid)
    for i, t in enumerate(grid):
        ref = metrics.threshold_metrics(y, p, float(t))
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            expected = getattr(ref, key)
            if expected is None:
                assert np.isnan(sweep[key][i])
            else:
                assert sweep[key][i] == pytest.approx(expected), (key, t)


def test_threshold_figure_marks_the_chosen_threshold(predictions):
    fig = plots.threshold_sweep_figure(predictions["true_any"], predictions["prob_any"], 0.3, label="any")
    assert [t.name for t in fig.data] == ["sensitivity", "specificity", "PPV", "NPV"]
    assert fig.layout.shapes[0].x0 == 0.3


def test_confusion_figure_lays_out_counts_truth_by_prediction():
    fig = plots.confusion_figure(tn=5, fp=2, fn=1, tp=7, label="any")
    assert [list(r) for r in fig.data[0].z] == [[5, 2], [1, 7]]
    assert list(fig.data[0].y) == ["truly negative", "truly positive"]
    assert fig.data[0].text[1][1] == "TP<br>7"


def comparison_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": ["epidural", "subdural", "any"],
            "auc_a": [0.90, 0.80, np.nan],
            "lo_a": [0.85, 0.70, np.nan],
            "hi_a": [0.95, 0.88, np.nan],
            "auc_b": [0.80, 0.82, 0.9],
            "lo_b": [0.75, 0.74, 0.85],
            "hi_b": [0.84, 0.90, 0.95],
            "diff": [0.10, -0.02, np.nan],
            "diff_lo": [0.04, -0.09, np.nan],
            "diff_hi": [0.16, 0.05, np.nan],
        }
    )


def test_comparison_summary_says_which_run_is_better_only_where_the_interval_excludes_zero():
    sentences = plots.comparison_summary(comparison_frame(), "VGG16", "Inception")
    assert sentences[0] == "VGG16 is clearly better on epidural."
    assert sentences[1].startswith("epidural: VGG16 is better (AUC 0.900 vs 0.800, difference +0.100")
    assert sentences[2].startswith("subdural: no clear difference")
    assert sentences[3].startswith("any: cannot compare")
    tie = comparison_frame().assign(diff_lo=-0.01)
    assert plots.comparison_summary(tie, "A", "B")[0].startswith("Neither run is clearly better")


def test_grid_scores_figure_highlights_rank_one():
    results = pd.DataFrame(
        {
            "params": ['{"lr": 0.1}', '{"lr": 0.01}'],
            "mean_test_score": [0.6, 0.7],
            "std_test_score": [0.01, 0.02],
            "rank_test_score": [2, 1],
        }
    )
    fig = plots.grid_scores_figure(results, scoring="roc_auc")
    assert list(fig.data[0].x) == ["lr=0.1", "lr=0.01"]
    assert list(fig.data[0].marker.color) == [plots.RUN_COLORS[0], plots.RUN_COLORS[1]]
    assert plots.params_label({"b": 2, "a": 1}) == "a=1, b=2"


def test_probability_bars_follow_label_order():
    probs = {label: i / 10 for i, label in enumerate(reversed(LABELS))}
    fig = plots.probability_bars(probs)
    assert list(fig.data[0].y) == list(LABELS)
    assert list(fig.data[0].x) == [probs[label] for label in LABELS]


def test_z_profile_has_one_line_per_label_and_marks_the_slice():
    probs = [{label: 0.1 * k for label in LABELS} for k in range(3)]
    fig = plots.z_profile_figure([0.0, 5.0, 10.0], probs, selected=1)
    assert len(fig.data) == len(LABELS) and list(fig.data[0].y) == [0.0, 0.1, 0.2]
    assert fig.layout.shapes[0].x0 == 5.0


def test_window_hu_matches_the_window_preset():
    hu = np.linspace(-200, 200, 64, dtype=np.float32).reshape(8, 8)
    brain = PRESETS["brain"]
    expected = np.rint(brain.apply(hu) * 255).astype(np.uint8)
    np.testing.assert_array_equal(plots.window_hu(hu, brain.center, brain.width), expected)
    assert plots.window_hu(np.array([[0.0, 79.9]]), 40, 80)[0, 0] == 0


def test_chw_to_rgb_and_its_refusals():
    image = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    rgb = plots.chw_to_rgb(image)
    assert rgb.shape == (2, 2, 3) and rgb[1, 0, 2] == image[2, 1, 0]
    assert plots.chw_to_rgb(image[:1]).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="channels"):
        plots.chw_to_rgb(np.zeros((2, 4, 4), np.uint8))


def test_heatmap_overlay_leaves_cold_pixels_and_colours_hot_ones():
    base = np.full((16, 16), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4, :4] = 1.0
    out = plots.heatmap_overlay(base, heat)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[12:, 12:] == 100).all()  # zero heat: anatomy unchanged
    assert not (out[0, 0] == 100).all()


def test_png_round_trip_and_data_uri():
    image = (np.arange(30 * 20, dtype=np.uint32).reshape(30, 20) % 256).astype(np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(plots.png_bytes(image))))
    np.testing.assert_array_equal(decoded, image)
    assert plots.png_data_uri(image).startswith("data:image/png;base64,iVBOR")
    with pytest.raises(ValueError):
        plots.png_bytes(np.zeros((4, 4), np.float32))


def test_empty_figure_says_why():
    fig = plots.empty_figure("nothing <here>")
    assert fig.layout.annotations[0].text == "nothing &lt;here&gt;"
