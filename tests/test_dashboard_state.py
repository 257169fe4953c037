"""Dashboard run reading and tables (no browser): live, damaged and malformed runs; comparisons; gallery."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import synthetic_predictions, write_damaged_runs, write_grid_run, write_run

from hemorrhage_core import metrics, runs
from hemorrhage_core.dashboard import state, tables
from hemorrhage_core.runs import RunNotFoundError, RunWriter


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    write_run(root, backbone="vgg16", stage=2, epochs=2, seed=1)
    write_run(root, backbone="inception_v3", stage=2, epochs=2, seed=1, skill=3.0)
    write_grid_run(root)
    write_damaged_runs(root)
    return root


def test_snapshot_lists_every_folder_and_never_breaks_on_damaged_ones(runs_dir):
    snap = state.RunIndex(runs_dir).snapshot()
    by_name = {s.path.name: s for s in snap.summaries}
    assert len(by_name) == 7
    statuses = sorted(s.status for s in snap.summaries)
    assert statuses == ["finished", "finished", "finished", "malformed", "malformed", "malformed", "running"]
    newer = by_name["20260101-000002-vgg16-s1-0002"]
    assert newer.status == "malformed" and "newer" in newer.reason
    torn = next(s for s in snap.summaries if s.backbone == "resnet18")
    assert torn.last_epoch == 2  # the half-written third row is ignored
    assert [s.kind for s in snap.select(kind="grid")] == ["grid"]
    assert {s.backbone for s in snap.select(kind="train", with_file=runs.PREDICTIONS_CSV)} == {
        "vgg16",
        "inception_v3",
    }


def test_snapshot_re_reads_only_runs_whose_files_changed(runs_dir, monkeypatch):
    index = state.RunIndex(runs_dir)
    index.snapshot()
    calls = []
    real = runs.summarise_run
    monkeypatch.setattr(runs, "summarise_run", lambda path: calls.append(path.name) or real(path))
    index.snapshot()
    assert calls == []
    live = next(s for s in index.snapshot().summaries if s.status == "running")
    writer = RunWriter(live.path, json.loads((live.path / "run.json").read_text()))
    writer.append_metrics({"epoch": 3, "train_loss": 0.3, "val_auc_mean": 0.8})
    snap = index.snapshot()
    assert calls == [live.path.name]
    assert snap.by_id(live.path.name).last_epoch == 3


def test_record_is_cached_until_a_file_changes_and_ids_are_checked(runs_dir):
    index = state.RunIndex(runs_dir)
    run_id = next(
        s.path.name for s in index.snapshot().summaries if s.backbone == "vgg16" and s.kind == "train"
    )
    first = index.record(run_id)
    assert index.record(run_id) is first
    assert len(first.predictions) == 96
    path = runs_dir / run_id / runs.METRICS_CSV
    with open(path, "a") as fh:
        fh.write("3,0.1\n")
    assert index.record(run_id) is not first
    for bad in ("../" + run_id, run_id + "/../x", "/etc", "no-such-run", ""):
        with pytest.raises(RunNotFoundError):
            index.record(bad)


def test_stamps_tolerate_a_missing_runs_folder(tmp_path):
    index = state.RunIndex(tmp_path / "absent")
    assert index.stamps() == {} and index.snapshot().summaries == ()


def test_run_labels_are_short_and_choices_keyed_by_folder(runs_dir):
    snap = state.RunIndex(runs_dir).snapshot()
    vgg = next(s for s in snap.summaries if s.backbone == "vgg16" and s.kind == "train")
    label = state.run_label(vgg)
    assert label.startswith("vgg16 s2 · ") and label.endswith(vgg.path.name[-4:])
    choices = state.run_choices(snap.summaries)
    assert set(choices) == {s.path.name for s in snap.summaries}
    torn = next(s for s in snap.summaries if s.backbone == "resnet18")
    assert choices[torn.path.name].endswith("(running)")


def test_runs_table_has_one_row_per_run_with_best_metrics(runs_dir):
    snap = state.RunIndex(runs_dir).snapshot()
    frame = tables.runs_table(snap.summaries)
    assert list(frame.columns) == list(tables.RUNS_TABLE_COLUMNS)
    assert len(frame) == len(snap.summaries)
    vgg = snap.select(kind="train", with_file=runs.PREDICTIONS_CSV)[0]
    row = frame[frame["run"] == vgg.path.name].iloc[0]
    assert row["best AUC (mean)"] == pytest.approx(round(vgg.best_auc_mean, 4))
    assert row["images (train/val)"] == "200 (104/96)"
    bad = frame[frame["status"] == "malformed"]
    assert all(bad["note"].str.len() > 0)


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (5, "5s"), (75, "1m 15s"), (3725, "1h 02m")])
def test_format_duration(seconds, text):
    assert tables.format_duration(seconds) == text


def test_paired_comparison_uses_the_shared_images_and_matches_metrics():
    a = synthetic_predictions(seed=5, skill=2.5)
    b = synthetic_predictions(seed=5, skill=0.8)
    result = tables.comparison_table(a, b, labels=["any", "subdural"], n_resamples=200, seed=1)
    assert result.paired and result.n_common == len(a)
    row = result.table.set_index("label").loc["any"]
    ref = metrics.bootstrap_auc_difference(
        a["true_any"], a["prob_any"], b["prob_any"], a["patient"], n_resamples=200, seed=1
    )
    assert row["diff"] == pytest.approx(ref.difference)
    assert (row["diff_lo"], row["diff_hi"]) == pytest.approx((ref.low, ref.high))
    assert row["auc_a"] == pytest.approx(metrics.roc_auc(a["true_any"], a["prob_any"]))


def test_unpaired_comparison_when_the_validation_sets_differ():
    a = synthetic_predictions(seed=5, skill=2.5)
    b = synthetic_predictions(seed=6, skill=0.8)
    b["image_id"] = "B" + b["image_id"]
    result = tables.comparison_table(a, b, labels=["any"], n_resamples=200)
    assert not result.paired and result.n_common == 0
    row = result.table.iloc[0]
    assert row["diff"] == pytest.approx(row["auc_a"] - row["auc_b"])
    assert row["diff_lo"] < row["diff"] < row["diff_hi"]
    assert np.isnan(row["p_value"])


def test_comparison_leaves_a_label_without_positives_empty():
    a = synthetic_predictions(seed=5).assign(true_epidural=0)
    result = tables.comparison_table(a, a, labels=["epidural"], n_resamples=50)
    assert result.table[["auc_a", "auc_b", "diff"]].isna().all(axis=None)


def gallery_frame() -> pd.DataFrame:
    rows = []
    for truth_any, prob_any in ((1, 0.9), (1, 0.2), (0, 0.7), (0, 0.1)):
        row = {
            f"true_{lb}": 0
            for lb in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
        }
        row.update(
            {
                f"prob_{lb}": 0.05
                for lb in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
            }
        )
        row.update(true_any=truth_any, prob_any=prob_any, image_id=f"ID_{len(rows)}")
        rows.append(row)
    return pd.DataFrame(rows)


def test_gallery_outcomes_and_filters():
    frame = gallery_frame()
    assert list(tables.gallery_outcomes(frame, "any")) == [
        "correct",
        "false negative",
        "false positive",
        "correct",
    ]
    assert list(tables.filter_gallery(frame, label="any", outcome="all")["image_id"]) == [
        "ID_0",
        "ID_1",
        "ID_2",
    ]
    assert list(tables.filter_gallery(frame, label="any", outcome="correct")["image_id"]) == ["ID_0"]
    assert list(tables.filter_gallery(frame, label=None, outcome="false positive")["image_id"]) == ["ID_2"]
    assert list(tables.filter_gallery(frame, label=None, outcome="all")["image_id"]) == [
        f"ID_{i}" for i in range(4)
    ]
    with pytest.raises(ValueError, match="outcome"):
        tables.filter_gallery(frame, label=None, outcome="maybe")


def test_parse_theta():
    np.testing.assert_allclose(tables.parse_theta("1 0 0.5 0 1 -0.5"), [[1, 0, 0.5], [0, 1, -0.5]])
    assert tables.parse_theta("1 2 3") is None and tables.parse_theta("a b c d e f") is None
    assert tables.parse_theta("nan 0 0 0 1 0") is None


def test_grid_table_orders_by_rank_and_names_the_best_row(tmp_path):
    record = runs.read_run(write_grid_run(tmp_path))
    frame, best = tables.grid_table(record.grid_results)
    assert best == 0 and list(frame["rank"]) == [1, 2, 3, 4]
    assert frame.loc[0, "parameters"] == "batch_size=10, lr=0.001"
    assert list(frame.columns[:4]) == ["rank", "parameters", "mean score", "std"]
    assert [c for c in frame.columns if c.startswith("fold")] == ["fold 1", "fold 2", "fold 3"]


def test_threshold_table_reads_as_percentages():
    result = metrics.threshold_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], 0.5)
    frame = tables.threshold_table(result).set_index("measure")["value"]
    assert frame["sensitivity (recall)"] == "50.0%" and frame["false positives"] == "1"
    empty = metrics.threshold_metrics([0, 0], [0.1, 0.2], 0.5)
    assert tables.threshold_table(empty).set_index("measure")["value"]["sensitivity (recall)"] == "n/a"


def test_a_run_being_created_this_instant_is_listed_not_fatal(tmp_path):
    root = tmp_path / "runs"
    (root / "20261127-000000-vgg16-s1-abcd").mkdir(parents=True)
    os.mkfifo(root / "20261127-000000-vgg16-s1-abcd" / "metrics.csv")  # an odd file type must not block
    snap = state.RunIndex(root).snapshot()
    assert [s.status for s in snap.summaries] == ["malformed"]


def test_compare_defaults_to_vgg16_and_inception_then_to_two_backbones(tmp_path):
    from hemorrhage_core.dashboard.compare_panel import default_pair

    root = tmp_path / "runs"
    for backbone, stage in (("resnet18", 2), ("vgg16", 1), ("vgg16", 2), ("resnet18", 1)):
        write_run(root, backbone=backbone, stage=stage, epochs=1, gallery=False)
    summaries = list(state.RunIndex(root).snapshot().summaries)
    by = {(s.backbone, s.stage): s.path.name for s in summaries}
    assert default_pair(summaries) == (by[("vgg16", 2)], by[("resnet18", 2)])
    write_run(root, backbone="inception_v3", stage=1, epochs=1, gallery=False)
    summaries = list(state.RunIndex(root).snapshot().summaries)
    inception = next(s.path.name for s in summaries if s.backbone == "inception_v3")
    assert default_pair(summaries) == (by[("vgg16", 2)], inception)
    assert default_pair([]) == (None, None)
