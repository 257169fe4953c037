"""The runs table's parameter columns: the config values that differ between the listed runs (no browser)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from dashboard_fixtures import write_damaged_runs, write_run

from hemorrhage_core import runs
from hemorrhage_core.dashboard import state, tables
from hemorrhage_core.dashboard.runs_panel import runs_data_grid
from hemorrhage_core.runs import RunSummary, RunWriter


def summary(name: str, config: dict | None, status: str = "finished") -> RunSummary:
    return RunSummary(id=name, path=Path("/runs") / name, status=status, config=config)


BASE = {
    "data": "/data/a",
    "runs_dir": "runs",
    "device": "auto",
    "backbone": "vgg16",
    "stage": 1,
    "epochs": 10,
    "lr": 1e-4,
    "batch_size": 10,
    "windows": ["brain", "subdural", "bone"],
    "dropout": None,
    "augment": True,
}


def test_only_differing_model_keys_are_parameters():
    configs = [
        BASE,
        {**BASE, "lr": 1e-3, "data": "/data/b", "device": "cuda", "backbone": "resnet18"},
        {**BASE, "windows": ["brain"], "dropout": 0.2},
        None,  # an unreadable run says nothing about which keys differ
    ]
    # Keys in config order; data, device and backbone differ too but are bookkeeping or a fixed column.
    assert tables.differing_params(configs) == ["lr", "windows", "dropout"]
    assert tables.differing_params([BASE, dict(BASE)]) == []
    assert tables.differing_params([BASE]) == []
    # 10 and 10.0 are one value; a key only some runs have differs; nested keys are flattened.
    assert tables.differing_params([{"epochs": 10}, {"epochs": 10.0}]) == []
    assert tables.differing_params([{"a": 1}, {"a": 1, "amp": False}]) == ["amp"]
    assert tables.differing_params([{"opt": {"lr": 1, "m": 0}}, {"opt": {"lr": 2, "m": 0}}]) == ["opt.lr"]
    assert tables.differing_params([{"lr": 1}, {"lr": 2}], exclude=frozenset({"lr"})) == []


def test_runs_table_appends_one_column_per_differing_parameter():
    summaries = [
        summary("r1", BASE),
        summary("r2", {**BASE, "lr": 1e-3, "batch_size": 32, "windows": ["brain"], "augment": False}),
        summary("r3", {**BASE, "batch_size": 16, "dropout": 0.5}),
        summary("bad", None, status="malformed"),
    ]
    frame = tables.runs_table(summaries, params=True)
    params = ["config.lr", "config.batch_size", "config.windows", "config.dropout", "config.augment"]
    assert list(frame.columns) == [*tables.RUNS_TABLE_COLUMNS, *params]
    assert list(frame["run"]) == ["r1", "r2", "r3", "bad"]
    # Numbers stay numbers so the grid sorts and range-filters them; a run without the value is blank.
    assert pd.api.types.is_float_dtype(frame["config.lr"])
    assert frame["config.lr"].tolist()[:3] == [1e-4, 1e-3, 1e-4] and math.isnan(frame["config.lr"][3])
    assert frame["config.batch_size"].tolist()[:3] == [10, 32, 16]
    assert frame["config.dropout"].tolist()[2] == 0.5 and frame["config.dropout"][:2].isna().all()
    # Lists and booleans are compact text.
    assert frame["config.windows"].tolist() == [
        "[brain, subdural, bone]",
        "[brain]",
        "[brain, subdural, bone]",
        "",
    ]
    assert frame["config.augment"].tolist() == ["True", "False", "True", ""]
    # Without params the table keeps its fixed columns only.
    assert list(tables.runs_table(summaries).columns) == list(tables.RUNS_TABLE_COLUMNS)


def test_int_parameter_without_gaps_stays_integer_and_mixed_values_become_text():
    frame = tables.runs_table(
        [
            summary("a", {"epochs": 3, "class_weights": "none"}),
            summary("b", {"epochs": 5, "class_weights": [1, 1, 1, 1, 1, 2]}),
        ],
        params=True,
    )
    assert frame["config.epochs"].dtype == "int64" and frame["config.epochs"].tolist() == [3, 5]
    assert frame["config.class_weights"].tolist() == ["none", "[1, 1, 1, 1, 1, 2]"]


def test_grid_is_sortable_filterable_and_types_parameter_columns():
    frame = tables.runs_table(
        [summary("a", {"lr": 0.1, "optimizer": "sgd"}), summary("b", {"lr": 0.01, "optimizer": "adamw"})],
        params=True,
    )
    grid = runs_data_grid(frame)
    assert grid.filters is True
    payload = grid.to_payload()
    assert payload["options"]["filters"] is True
    hints = dict(zip(payload["columns"], payload["typeHints"], strict=True))
    # Numeric columns get a range filter in the browser, text columns a substring filter.
    assert hints["config.lr"]["type"] == "numeric"
    assert hints["config.optimizer"]["type"] == "string"
    assert [row[payload["columns"].index("config.lr")] for row in payload["data"]] == [0.1, 0.01]


def test_summaries_of_real_runs_carry_their_config(tmp_path):
    root = tmp_path / "runs"
    first = write_run(root, epochs=2, seed=1, gallery=False)
    second = write_run(root, epochs=3, seed=2, gallery=False)
    write_damaged_runs(root)
    assert runs.summarise_run(first).config == {"epochs": 2, "lr": 1e-3, "batch_size": 10, "image_size": 64}
    snapshot = state.RunIndex(root).snapshot()
    frame = tables.runs_table(snapshot.summaries, params=True)
    # The fixture's runs differ only in epochs; damaged runs have no config and leave blanks.
    assert [c for c in frame.columns if c.startswith(tables.PARAM_PREFIX)] == ["config.epochs"]
    epochs = dict(zip(frame["run"], frame["config.epochs"], strict=True))
    assert epochs[first.name] == 2 and epochs[second.name] == 3
    assert frame.loc[frame["status"] == "malformed", "config.epochs"].isna().all()


def test_a_new_run_with_a_new_value_adds_its_column(tmp_path):
    root = tmp_path / "runs"
    for lr in (1e-3, 1e-3):
        RunWriter.create(root, backbone="vgg16", stage=1, config={"lr": lr, "progress": True}).finish()
    index = state.RunIndex(root)
    assert not any(
        c.startswith("config.") for c in tables.runs_table(index.snapshot().summaries, params=True)
    )
    RunWriter.create(root, backbone="vgg16", stage=1, config={"lr": 1e-2, "progress": False}).finish()
    frame = tables.runs_table(index.snapshot().summaries, params=True)
    assert [c for c in frame.columns if c.startswith("config.")] == ["config.lr"]
    assert sorted(frame["config.lr"]) == pytest.approx([1e-3, 1e-3, 1e-2])
