"""The grid-search panel's parallel-coordinates figure (plots.grid_parallel_figure), against hand-made results."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import write_grid_run

from hemorrhage_core import plots, runs


@pytest.fixture
def results() -> pd.DataFrame:
    """Five combinations as grid_results.csv holds them, one failed (no score)."""
    params = [
        {"lr": 1e-4, "batch_size": 10, "optimizer": "adamw", "dropout": None},
        {"lr": 1e-3, "batch_size": 10, "optimizer": "sgd", "dropout": 0.2},
        {"lr": 1e-2, "batch_size": 10, "optimizer": "adamw", "dropout": 0.5},
        {"lr": 1e-3, "batch_size": 10, "optimizer": "sgd", "dropout": None},
        {"lr": 1e-2, "batch_size": 10, "optimizer": "sgd", "dropout": 0.2},
    ]
    return pd.DataFrame(
        {
            "params": [json.dumps(p, sort_keys=True) for p in params],
            "param_lr": [p["lr"] for p in params],
            "param_batch_size": [p["batch_size"] for p in params],
            "param_optimizer": [p["optimizer"] for p in params],
            "param_dropout": [math.nan if p["dropout"] is None else p["dropout"] for p in params],
            "mean_test_score": [0.71, 0.80, 0.65, 0.77, math.nan],
            "std_test_score": [0.01, 0.02, 0.03, 0.01, math.nan],
            "rank_test_score": [3, 1, 4, 2, 5],
        }
    )


def dims(fig) -> dict:
    return {d.label: d for d in fig.data[0].dimensions}


def shown(dimension) -> list[str]:
    """The tick text each line passes through on a coded axis."""
    return [dimension.ticktext[list(dimension.tickvals).index(v)] for v in dimension.values]


def test_one_axis_per_parameter_then_the_score(results):
    fig = plots.grid_parallel_figure(results, scoring="roc_auc")
    assert len(fig.data) == 1 and isinstance(fig.data[0], plots.go.Parcoords)
    labels = [d.label for d in fig.data[0].dimensions]
    assert labels == ["lr (log scale)", "batch_size", "optimizer", "dropout", "mean roc_auc (CV)"]
    # The failed combination (no score) is left out and the title says so; lines are drawn worst
    # first so the best end on top: rows 2, 0, 3, 1 of the fixture.
    score = dims(fig)["mean roc_auc (CV)"]
    np.testing.assert_allclose(score.values, [0.65, 0.71, 0.77, 0.80])
    np.testing.assert_allclose(fig.data[0].line.color, [0.65, 0.71, 0.77, 0.80])
    assert fig.data[0].line.showscale is True
    assert "roc_auc" in fig.layout.title.text and "1 failed combination not shown" in fig.layout.title.text


def test_learning_rates_spanning_decades_sit_on_a_log_axis_named_by_their_values(results):
    lr = dims(plots.grid_parallel_figure(results))["lr (log scale)"]
    np.testing.assert_allclose(lr.values, [-2, -4, -3, -3])
    np.testing.assert_allclose(lr.tickvals, [-4, -3, -2])
    assert list(lr.ticktext) == ["0.0001", "0.001", "0.01"]


def test_text_and_unset_values_become_named_integer_codes(results):
    fig = plots.grid_parallel_figure(results)
    optimizer = dims(fig)["optimizer"]
    assert list(optimizer.ticktext) == ["adamw", "sgd"] and list(optimizer.tickvals) == [0, 1]
    assert shown(optimizer) == ["adamw", "adamw", "sgd", "sgd"]
    assert list(optimizer.range) == [-0.5, 1.5]
    # An empty cell (None in the grid) is its own category, first; numbers keep their numeric order.
    dropout = dims(fig)["dropout"]
    assert list(dropout.ticktext) == [plots.PARAM_UNSET, "0.2", "0.5"]
    assert shown(dropout) == ["0.5", plots.PARAM_UNSET, plots.PARAM_UNSET, "0.2"]


def test_a_constant_parameter_is_drawn_mid_axis(results):
    batch = dims(plots.grid_parallel_figure(results))["batch_size"]
    assert list(batch.values) == [10, 10, 10, 10]
    assert list(batch.ticktext) == ["10"]
    low, high = batch.range
    assert low < 10 < high and (low + high) / 2 == pytest.approx(10)


def test_parameters_come_from_the_params_json_when_columns_are_missing(results):
    fig = plots.grid_parallel_figure(results.drop(columns=[c for c in results if c.startswith("param_")]))
    labels = [d.label for d in fig.data[0].dimensions]
    # Keys in the JSON's (sorted) order; a None in the JSON is unset like an empty cell.
    assert labels == ["batch_size", "dropout", "lr (log scale)", "optimizer", "mean score (CV)"]
    assert shown(dims(fig)["dropout"]) == ["0.5", plots.PARAM_UNSET, plots.PARAM_UNSET, "0.2"]


def test_lists_and_markup_in_parameters_are_shown_as_text():
    frame = pd.DataFrame(
        {
            "param_class_weights": ["none", "[1, 1, 1, 1, 1, 2]"],
            "param_<b>x</b>": [1, 2],
            "mean_test_score": [0.5, 0.6],
        }
    )
    fig = plots.grid_parallel_figure(frame)
    weights = dims(fig)["class_weights"]
    assert shown(weights) == ["none", "[1, 1, 1, 1, 1, 2]"]
    assert "&lt;b&gt;x&lt;/b&gt;" in dims(fig)  # names from files are escaped before plotly renders them


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (pd.DataFrame(), "no results"),
        (pd.DataFrame({"param_lr": [0.1], "std_test_score": [0.0]}), "no results"),
        (pd.DataFrame({"param_lr": [0.1, 0.2], "mean_test_score": [math.nan, math.nan]}), "has a score"),
        (pd.DataFrame({"mean_test_score": [0.5]}), "do not name their parameters"),
    ],
)
def test_nothing_to_draw_says_why(frame, words):
    fig = plots.grid_parallel_figure(frame)
    assert not fig.data and words in fig.layout.annotations[0].text


def test_a_written_grid_run_reads_back_into_the_figure(tmp_path):
    run = write_grid_run(tmp_path / "runs")
    results = runs.read_run(run).grid_results
    fig = plots.grid_parallel_figure(results, scoring="roc_auc")
    labels = [d.label for d in fig.data[0].dimensions]
    assert labels == ["batch_size", "lr", "mean roc_auc (CV)"]
    batch, lr, score = fig.data[0].dimensions
    by_score = results.sort_values("mean_test_score")
    assert list(batch.values) == by_score["param_batch_size"].tolist() == [15, 10, 15, 10]
    assert list(lr.ticktext) == ["0.0001", "0.001"]
    np.testing.assert_allclose(lr.values, by_score["param_lr"])
    np.testing.assert_allclose(score.values, by_score["mean_test_score"])
