"""A runs folder with hundreds of runs: listed completely, in order, with the right statuses.

300 generated runs (complete records: run.json, 10-epoch metrics.csv, predictions.csv, gallery) plus
damaged folders go through ``runs.list_runs`` and the dashboard's own path (``RunIndex.snapshot`` and
the runs table). How long that takes is measured by benchmarks/bench_runs_folder.py, not here.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from dashboard_fixtures import MANY_RUN_STATUSES, write_damaged_runs, write_many_runs

from hemorrhage_core import runs
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.state import RunIndex

N_RUNS = 300
EPOCHS = 10


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many") / "runs"
    ids = write_many_runs(folder, N_RUNS, epochs=EPOCHS)
    damaged = write_damaged_runs(folder)
    # One more damaged run in the middle of the list: valid JSON that is not a run record's.
    bad = folder / ids[N_RUNS // 2]
    (bad / "run.json").write_text('{"format_version": 1, "id": 7, "status": "exploded"}')
    return folder, ids, damaged, bad.name


def expected_status(i: int) -> str:
    return MANY_RUN_STATUSES[i % len(MANY_RUN_STATUSES)]


def test_list_runs_lists_every_run_newest_first_with_its_status(many):
    folder, ids, damaged, bad = many
    listed = runs.list_runs(folder)
    assert len(listed) == N_RUNS + len(damaged)
    # The torn run was written just now, so it sorts before the generated ones (created from January
    # 2026 on, one a minute); folders without a readable creation time sort last.
    by_id = {s.path.name: s for s in listed}
    names = [s.path.name for s in listed]
    assert names[0] == damaged["torn"].name
    assert names[1:N_RUNS] == [i for i in ids[::-1] if i != bad]
    assert set(names[N_RUNS:]) == {bad} | {damaged[k].name for k in ("empty", "bad_json", "newer")}
    for i, run_id in enumerate(ids):
        summary = by_id[run_id]
        if run_id == bad:
            assert summary.status == "malformed" and "exploded" in summary.reason
            continue
        assert summary.status == expected_status(i), run_id
        assert summary.best_epoch == 1 + i % EPOCHS and summary.last_epoch == EPOCHS
        assert summary.best_auc_mean is not None and 0.0 <= summary.best_auc_mean <= 1.0
        assert (summary.reason == "RuntimeError: loss became NaN") == (expected_status(i) == "failed")
    for key in ("empty", "bad_json", "newer"):
        assert by_id[damaged[key].name].status == "malformed" and by_id[damaged[key].name].reason
    assert by_id[damaged["torn"].name].status == "running"  # this process wrote it and is alive


def test_best_numbers_come_from_the_best_epochs_metrics_row(many):
    folder, ids, _, bad = many
    listed = {s.path.name: s for s in runs.list_runs(folder)}
    for run_id in (ids[0], ids[7], ids[-1]):
        if run_id == bad:
            continue
        metrics = runs.read_run(folder / run_id).metrics.set_index("epoch")
        summary = listed[run_id]
        row = metrics.loc[summary.best_epoch]
        assert summary.best_auc_mean == pytest.approx(row["val_auc_mean"])
        assert summary.best_auc_any == pytest.approx(row["val_auc_any"])
        assert summary.best_weighted_log_loss == pytest.approx(row["val_weighted_log_loss"])


def test_dashboard_snapshot_and_table_agree_with_list_runs(many):
    folder, ids, damaged, _ = many
    index = RunIndex(folder)
    snapshot = index.snapshot()
    assert [s.to_dict() for s in snapshot.summaries] == [s.to_dict() for s in runs.list_runs(folder)]
    table = tables.runs_table(snapshot.summaries)
    assert len(table) == N_RUNS + len(damaged)
    assert list(table["run"]) == [s.path.name for s in snapshot.summaries]
    # 300 runs cycle through 5 statuses, one of them damaged; the torn run still runs; 3 folders are bad.
    expected = Counter({"finished": 120, "failed": 60, "running": 61, "interrupted": 60, "malformed": 4})
    expected[expected_status(N_RUNS // 2)] -= 1
    assert Counter(table["status"]) == expected


def test_a_poll_rereads_only_the_run_that_changed(many, monkeypatch):
    folder, ids, _, bad = many
    index = RunIndex(folder)
    index.snapshot()
    read = []
    real = runs.summarise_run
    monkeypatch.setattr(runs, "summarise_run", lambda path: read.append(Path(path).name) or real(path))
    assert len(index.snapshot().summaries) > N_RUNS
    assert read == []  # nothing changed: no run re-read
    changed = ids[3] if ids[3] != bad else ids[4]
    metrics = folder / changed / "metrics.csv"
    stat = metrics.stat()
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    index.snapshot()
    assert read == [changed]
