"""hemorrhage_core.runs: writing run directories and reading them back, including damaged ones."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hemorrhage_core import runs
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS

RUN_ID = re.compile(r"^\d{8}-\d{6}-(grid-)?[a-z0-9_]+-s[12]-[0-9a-f]{4}$")
CONTRACT_KEYS = {
    "format_version", "id", "kind", "backbone", "stage", "parent_run", "status", "error", "created",
    "updated", "finished", "duration_s", "config", "data", "split", "versions", "git_commit", "device",
    "world_size", "model_file", "best", "last_epoch", "epochs_planned",
}


def _metrics_row(epoch: int, auc: float = 0.9) -> dict:
    row = {c: 0.5 for c in runs.METRICS_COLUMNS}
    row.update(epoch=epoch, val_auc_any=auc, val_auc_mean=auc - 0.1, val_weighted_log_loss=0.3 / (epoch + 1))
    return row


def _make_run(runs_dir: Path, **kwargs) -> runs.RunWriter:
    defaults = dict(
        backbone="resnet18",
        stage=1,
        config={"lr": 1e-3, "batch_size": 10, "image_size": 64, "path": Path("/x"), "nan": float("nan")},
        data={"dir": "data/synth", "n_images": 40, "n_train": 30, "n_val": 10},
        split={"seed": 0, "val_fraction": 0.25, "val_patients": ["ab12"]},
        epochs_planned=2,
        device="cpu",
    )
    defaults.update(kwargs)
    return runs.RunWriter.create(runs_dir, **defaults)


# ------------------------------------------------------------------------------------ file helpers
def test_atomic_write_replaces_whole_file_and_survives_a_failed_write(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    runs.atomic_write_text(target, "old")
    runs.atomic_write_text(target, "new contents")
    assert target.read_text() == "new contents"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        runs.atomic_write_text(target, "half")
    monkeypatch.undo()
    assert target.read_text() == "new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary left behind


def test_append_csv_row_header_once_and_torn_tail_repaired(tmp_path):
    path = tmp_path / "m.csv"
    cols = ("epoch", "loss")
    runs.append_csv_row(path, {"epoch": 1, "loss": 0.5}, cols)
    runs.append_csv_row(path, {"epoch": 2, "loss": float("nan")}, cols)
    assert path.read_text() == "epoch,loss\n1,0.5\n2,\n"
    with open(path, "ab") as fh:
        fh.write(b"3,0.2")  # a crash mid-line
    frame = runs.read_csv_tolerant(path)
    assert frame["epoch"].tolist() == [1, 2]
    runs.append_csv_row(path, {"epoch": 3, "loss": 0.25}, cols)
    assert path.read_text() == "epoch,loss\n1,0.5\n2,\n3,0.25\n"
    with pytest.raises(ValueError):
        runs.append_csv_row(path, {"epoch": 4, "lose": 1.0}, cols)
    with pytest.raises(runs.RunFormatError):
        runs.append_csv_row(path, {"epoch": 4}, ("epoch", "other"))


def test_torn_header_only_file_is_restarted(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"epo")
    assert runs.read_csv_tolerant(path, ("epoch",)).empty
    runs.append_csv_row(path, {"epoch": 1}, ("epoch",))
    assert path.read_text() == "epoch\n1\n"


def test_format_versions():
    assert runs.format_major(1) == 1 and runs.format_major("1.4") == 1
    assert runs.check_format_version({"format_version": "1.2"}) == 1
    with pytest.raises(runs.RunFormatError, match="newer"):
        runs.check_format_version({"format_version": 2})
    for bad in ({}, {"format_version": "x"}, {"format_version": True}, {"format_version": 0}):
        with pytest.raises(runs.RunFormatError):
            runs.check_format_version(bad)


# ------------------------------------------------------------------------------------------ writer
def test_create_writes_the_contract_fields(tmp_path):
    writer = _make_run(tmp_path, parent_run=None)
    assert RUN_ID.match(writer.id) and writer.path == tmp_path / writer.id
    info = json.loads((writer.path / "run.json").read_text())
    assert CONTRACT_KEYS <= set(info)
    assert info["format_version"] == runs.FORMAT_VERSION
    assert info["status"] == "running" and info["kind"] == "train" and info["stage"] == 1
    assert info["config"]["path"] == "/x" and info["config"]["nan"] is None  # strict JSON
    assert info["data"]["skipped"] == [] and info["data"]["fingerprint"] is None
    assert set(info["data"]) >= {"n_patients_train", "n_patients_val"}
    assert info["split"]["val_patients"] == ["ab12"]
    assert set(info["versions"]) == {"python", "torch", "torchvision", "hemorrhage_core"}
    assert info["model_file"] == "checkpoints/best.pt"
    assert (writer.path / "checkpoints").is_dir()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", info["created"])


def test_run_ids_are_unique_and_grid_ids_marked(tmp_path):
    ids = {_make_run(tmp_path).id for _ in range(30)}
    assert len(ids) == 30
    grid = _make_run(tmp_path, kind="grid", extra={"grid": {"lr": [1e-3, 1e-4]}, "scoring": "roc_auc", "folds": 3})
    assert "-grid-resnet18-s1-" in grid.id and RUN_ID.match(grid.id)
    assert grid.record["grid"] == {"lr": [0.001, 0.0001]}
    with pytest.raises(ValueError):
        _make_run(tmp_path, extra={"status": "finished"})
    with pytest.raises(ValueError):
        _make_run(tmp_path, stage=3)


def test_lifecycle_metrics_best_and_finish(tmp_path):
    writer = _make_run(tmp_path)
    writer.append_metrics(_metrics_row(1, 0.8))
    writer.append_metrics(_metrics_row(2, 0.9))
    writer.set_best(2, "val_auc_mean", 0.8)
    writer.log("epoch 2 train_loss 0.1")
    writer.finish()
    record = runs.read_run(writer.path)
    assert record.status == "finished" and record.info["finished"] and record.info["last_epoch"] == 2
    assert record.info["best"] == {"epoch": 2, "metric": "val_auc_mean", "value": 0.8}
    assert record.metrics["epoch"].tolist() == [1, 2]
    assert record.metrics["val_auc_any"].tolist() == [0.8, 0.9]
    assert list(record.metrics.columns) == list(runs.METRICS_COLUMNS)
    assert "epoch 2 train_loss 0.1" in record.log_text()
    assert record.model_path == (writer.path / "checkpoints" / "best.pt").resolve()
    with pytest.raises(ValueError):
        writer.update(status="done")
    with pytest.raises(ValueError):
        writer.update(id="other")


def test_context_manager_marks_failed_and_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with _make_run(tmp_path) as failing:
            raise RuntimeError("loss is NaN at epoch 3")
    assert runs.read_run(failing.path).info["error"] == "RuntimeError: loss is NaN at epoch 3"
    assert runs.read_run(failing.path).status == "failed"
    with pytest.raises(KeyboardInterrupt):
        with _make_run(tmp_path) as stopped:
            raise KeyboardInterrupt
    assert runs.read_run(stopped.path).status == "interrupted"
    with _make_run(tmp_path) as fine:
        fine.finish()
    assert runs.read_run(fine.path).status == "finished"


def test_reopen_for_resume_and_truncate_metrics(tmp_path):
    writer = _make_run(tmp_path)
    for epoch in (1, 2, 3):
        writer.append_metrics(_metrics_row(epoch))
    writer.finish("interrupted", "stopped")
    again = runs.RunWriter.reopen(writer.path)
    assert again.record["status"] == "running" and again.record["error"] is None
    again.truncate_metrics(2)  # the checkpoint had epoch 2: epoch 3 is redone
    again.append_metrics(_metrics_row(3, 0.95))
    metrics = runs.read_run(writer.path).metrics
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics["val_auc_any"].tolist() == [0.9, 0.9, 0.95]


def test_repeated_epoch_keeps_last_row(tmp_path):
    writer = _make_run(tmp_path)
    writer.append_metrics(_metrics_row(1, 0.7))
    writer.append_metrics(_metrics_row(1, 0.75))
    assert runs.read_run(writer.path).metrics["val_auc_any"].tolist() == [0.75]


def _predictions(n: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "image_id": [f"ID_{i:09x}" for i in range(n)],
            "patient": ["0001a2b3c4d5e6f7"] * n,
            "series": ["00ff"] * n,
            "z": np.arange(n) * 5.0,
        }
    )
    for label in LABELS:
        frame[f"true_{label}"] = rng.integers(0, 2, n)
        frame[f"prob_{label}"] = rng.random(n)
    return frame


def test_predictions_round_trip(tmp_path):
    writer = _make_run(tmp_path)
    frame = _predictions()
    writer.write_predictions(frame.iloc[:, ::-1])  # column order is the writer's job
    read = runs.read_run(writer.path).predictions
    assert list(read.columns) == list(runs.PREDICTION_COLUMNS)
    assert read["patient"].tolist() == ["0001a2b3c4d5e6f7"] * 5  # hashes stay strings (leading zeros)
    assert np.array_equal(read["prob_any"].to_numpy(), frame["prob_any"].to_numpy())  # full precision
    with pytest.raises(ValueError):
        writer.write_predictions(frame.drop(columns=["prob_any"]))
    assert runs.read_run(_make_run(tmp_path).path).predictions is None


def test_gallery_round_trip(tmp_path):
    writer = _make_run(tmp_path)
    chw = np.zeros((3, 16, 16), dtype=np.uint8)
    chw[0, 4:8, 4:8] = 255
    aligned = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    theta = np.array([[1.0, 0.0, 0.1], [0.0, 0.9, -0.2]])
    entry = runs.GalleryEntry("ID_00000000a", chw, aligned, theta, [0, 1, 0, 0, 0, 1], np.linspace(0.1, 0.6, 6))
    writer.write_gallery([entry])
    gallery = runs.read_run(writer.path).gallery
    assert gallery["image_id"].tolist() == ["ID_00000000a"]
    assert [float(v) for v in gallery["theta"][0].split()] == [1.0, 0.0, 0.1, 0.0, 0.9, -0.2]
    assert gallery["true_intraparenchymal"][0] == 1 and gallery["prob_any"][0] == pytest.approx(0.6)
    decoded = np.asarray(Image.open(gallery["input_path"][0]))
    assert decoded.shape == (16, 16, 3) and np.array_equal(decoded, np.moveaxis(chw, 0, -1))
    assert np.asarray(Image.open(gallery["aligned_path"][0]))[-1, -1] == 255
    with pytest.raises(ValueError):
        writer.write_gallery([runs.GalleryEntry("../evil", chw, chw, theta, [0] * 6, [0.1] * 6)])
    with pytest.raises(ValueError):
        writer.write_gallery([runs.GalleryEntry("ID_1", chw, chw, [1.0, 0.0], [0] * 6, [0.1] * 6)])


def test_grid_results_from_real_gridsearchcv(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold

    rng = np.random.default_rng(0)
    x = rng.random((40, 3))
    y = (x[:, 0] > 0.5).astype(int)
    search = GridSearchCV(LogisticRegression(), {"C": [0.1, 1.0]}, cv=GroupKFold(2), scoring="roc_auc")
    search.fit(x, y, groups=np.arange(40) // 4)
    writer = _make_run(tmp_path, kind="grid")
    writer.write_grid_results(search.cv_results_)
    writer.update(best_params=search.best_params_, best_score=search.best_score_)
    record = runs.read_run(writer.path)
    table = record.grid_results
    assert [json.loads(p) for p in table["params"]] == [{"C": 0.1}, {"C": 1.0}]
    assert table["rank_test_score"].tolist() == search.cv_results_["rank_test_score"].tolist()
    assert table["split1_test_score"].tolist() == pytest.approx(search.cv_results_["split1_test_score"])
    assert record.info["best_params"] == search.best_params_


def test_model_file_must_stay_inside_the_run(tmp_path):
    writer = _make_run(tmp_path)
    for bad in ("../../etc/passwd", "/etc/passwd", ""):
        writer.update(model_file=bad)
        with pytest.raises(runs.RunFormatError):
            _ = runs.read_run(writer.path).model_path


# ------------------------------------------------------------------------------------------ reader
def test_list_runs_never_raises_on_damaged_runs(tmp_path):
    good = _make_run(tmp_path)
    good.append_metrics(_metrics_row(1, 0.8))
    good.append_metrics(_metrics_row(2, 0.93))
    good.set_best(2, "val_auc_mean", 0.83)
    good.finish()
    cases = {
        "20260101-000000-vgg16-s1-0001": None,  # folder only: being created
        "20260101-000000-vgg16-s1-0002": "{not json",
        "20260101-000000-vgg16-s1-0003": "[1, 2]",
        "20260101-000000-vgg16-s1-0004": json.dumps({"format_version": 7, "status": "running"}),
        "20260101-000000-vgg16-s1-0005": json.dumps({"format_version": 1, "status": "exploded"}),
        "20260101-000000-vgg16-s1-0006": json.dumps({"status": "running"}),
        "20260101-000000-vgg16-s1-0007": json.dumps({"format_version": 1, "status": "running", "best": 3,
                                                     "data": "x", "stage": "two", "duration_s": "NaN"}),
    }
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "run.json").write_text(text)
    (tmp_path / "20260101-000000-vgg16-s1-0008").mkdir()
    (tmp_path / "20260101-000000-vgg16-s1-0008" / "run.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "pipeline.json").write_text("{}")
    summaries = {s.id: s for s in runs.list_runs(tmp_path)}
    assert set(summaries) == {good.id, *cases, "20260101-000000-vgg16-s1-0008"}
    ok = summaries[good.id]
    assert (ok.status, ok.best_epoch, ok.best_auc_any, ok.n_images) == ("finished", 2, 0.93, 40)
    assert ok.best_weighted_log_loss == pytest.approx(0.1) and ok.best_auc_mean == pytest.approx(0.83)
    for name in ("0001", "0002", "0003", "0004", "0005", "0006", "0008"):
        s = summaries[f"20260101-000000-vgg16-s1-{name}"]
        assert s.status == runs.MALFORMED and s.reason
    assert "newer" in summaries["20260101-000000-vgg16-s1-0004"].reason
    odd = summaries["20260101-000000-vgg16-s1-0007"]  # wrong types inside: shown, fields empty
    assert odd.status == "running" and odd.stage is None and odd.duration_s is None and odd.best_epoch is None
    assert runs.list_runs(tmp_path / "missing") == []
    json.dumps([s.to_dict() for s in summaries.values()])


def test_read_run_refuses_newer_format_with_clear_error(tmp_path):
    writer = _make_run(tmp_path)
    info = json.loads((writer.path / "run.json").read_text())
    info["format_version"] = 2
    (writer.path / "run.json").write_text(json.dumps(info))
    with pytest.raises(runs.RunFormatError, match="upgrade"):
        runs.read_run(writer.path)
    assert issubclass(runs.RunFormatError, HemorrhageError)


def test_run_whose_writer_died_reads_as_interrupted(tmp_path):
    writer = _make_run(tmp_path)
    assert runs.list_runs(tmp_path)[0].status == "running"  # this process is alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer.update(writer={**writer.record["writer"], "pid": int(dead.stdout)})
    summary = runs.list_runs(tmp_path)[0]
    assert summary.status == "interrupted" and "ended" in summary.reason
    assert runs.read_run(writer.path).status == "running"  # the file itself is not rewritten


def test_resolve_run_accepts_only_present_runs(tmp_path):
    writer = _make_run(tmp_path)
    (tmp_path / "not-a-run").mkdir()
    outside = tmp_path.parent / "outside-run"
    outside.mkdir(exist_ok=True)
    (outside / "run.json").write_text("{}")
    assert runs.resolve_run(tmp_path, writer.id) == writer.path
    for bad in ("..", "../outside-run", f"{writer.id}/..", "/etc", "", "not-a-run", "missing", None,
                f"{writer.id}/run.json", ".", "a\x00b", str(writer.path)):
        with pytest.raises(runs.RunNotFoundError):
            runs.resolve_run(tmp_path, bad)


def test_reader_beside_writer_never_sees_torn_files(tmp_path):
    writer = _make_run(tmp_path)
    stop = threading.Event()
    errors: list[str] = []

    def read_loop():
        while not stop.is_set():
            try:
                record = runs.read_run(writer.path)
                epochs = record.metrics["epoch"].tolist()
                if epochs != list(range(1, len(epochs) + 1)):
                    errors.append(f"epochs {epochs}")
                if record.metrics.isna().any().any():
                    errors.append("a metrics row was read half-written")
                if record.predictions is not None and len(record.predictions) != 50:
                    errors.append("predictions torn")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        big = _predictions(50)
        for epoch in range(1, 41):
            writer.append_metrics(_metrics_row(epoch))
            writer.write_predictions(big)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(runs.read_run(writer.path).metrics) == 40


def test_no_temporary_files_left(tmp_path):
    writer = _make_run(tmp_path)
    writer.append_metrics(_metrics_row(1))
    writer.write_predictions(_predictions())
    writer.finish()
    leftovers = [p for p in writer.path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert os.listdir(writer.path / "checkpoints") == []
