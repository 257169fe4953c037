"""Training writes complete run directories: stage 1 and 2 for each backbone, no patient data inside."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from train_fixtures import PATIENT_NAME, PATIENT_PREFIX, tiny_config, write_tiny_set

from hemorrhage_core.checkpoint import load_checkpoint
from hemorrhage_core.data import hash_id
from hemorrhage_core.labels import LABELS
from hemorrhage_core.machine import device_label
from hemorrhage_core.runs import GALLERY_COLUMNS, METRICS_COLUMNS, PREDICTION_COLUMNS, read_run
from training.trainer import fit

REPO = Path(__file__).resolve().parent.parent

# Each backbone at the smallest input it takes: seconds per run on a CPU.
BACKBONES = {
    "vgg16": 32,
    "vgg16_bn": 32,
    "resnet18": 32,
    "mobilenet_v3_small": 32,
    "inception_v3": 75,
}

RUN_JSON_KEYS = {
    "format_version", "id", "kind", "backbone", "stage", "parent_run", "status", "error", "created", "updated",
    "finished", "duration_s", "config", "data", "split", "versions", "git_commit", "device", "world_size",
    "model_file", "best", "last_epoch", "epochs_planned",
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    labels = write_tiny_set(root)
    return root, labels


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _check_complete(run_dir: Path, stage: int, labels: pd.DataFrame, parent: str | None) -> dict:
    info = json.loads((run_dir / "run.json").read_text())
    assert RUN_JSON_KEYS <= set(info)
    assert info["format_version"] == 1 and info["kind"] == "train" and info["id"] == run_dir.name
    assert info["status"] == "finished" and info["error"] is None and info["finished"]
    assert info["stage"] == stage and info["parent_run"] == parent
    assert info["device"] == device_label(torch.device("cpu")) and info["world_size"] == 1
    assert info["last_epoch"] == info["epochs_planned"] == 1
    assert info["best"]["epoch"] == 1 and info["best"]["metric"] == "auc_mean" and math.isfinite(info["best"]["value"])
    assert info["model_file"] == "checkpoints/best.pt"
    data, split = info["data"], info["split"]
    assert data["n_images"] == len(labels) and data["n_val"] + data["n_train"] <= len(labels)
    assert data["n_patients_train"] + data["n_patients_val"] == 10 and data["skipped"] == []
    assert len(split["val_patients"]) == data["n_patients_val"]
    assert info["config"]["stage"] == stage and info["config"]["backbone"] == info["backbone"]

    record = read_run(run_dir)
    assert list(record.metrics.columns) == list(METRICS_COLUMNS) and len(record.metrics) == 1
    row = record.metrics.iloc[0]
    assert np.isfinite(row[["train_loss", "val_loss", "val_accuracy", "val_weighted_log_loss", "lr", "seconds"]].astype(float)).all()

    predictions = record.predictions
    assert list(predictions.columns) == list(PREDICTION_COLUMNS) and len(predictions) == data["n_val"]
    truth = labels.loc[predictions["image_id"], list(LABELS)].to_numpy()
    np.testing.assert_array_equal(predictions[[f"true_{label}" for label in LABELS]].to_numpy(), truth)
    probs = predictions[[f"prob_{label}" for label in LABELS]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert set(predictions["patient"]) == set(split["val_patients"])
    assert all(len(p) == 16 for p in predictions["patient"])

    gallery = record.gallery
    assert list(gallery.columns[: len(GALLERY_COLUMNS)]) == list(GALLERY_COLUMNS) and len(gallery) > 0
    assert all(Path(p).is_file() for p in [*gallery["input_path"], *gallery["aligned_path"]])
    assert all(len(t.split()) == 6 for t in gallery["theta"])

    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert best.spec.stage == stage and best.train_state is None
    assert last.train_state is not None and last.train_state["epoch"] == 1
    assert (run_dir / "train.log").read_text().count("epoch 1/1") == 1
    return info


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_stage1_then_stage2_write_complete_run_directories(backbone, tiny_data, runs_dir):
    data, labels = tiny_data
    size = BACKBONES[backbone]
    stage1 = fit(tiny_config(data, runs_dir, backbone=backbone, input_size=size))
    info1 = _check_complete(stage1, 1, labels, None)
    assert info1["backbone"] == backbone

    # Stage 2 follows its stage-1 model's backbone and sizes whatever its own config says.
    stage2 = fit(tiny_config(data, runs_dir, stage=2, init_from=str(stage1), backbone="resnet18", input_size=None))
    info2 = _check_complete(stage2, 2, labels, stage1.name)
    assert info2["backbone"] == backbone and info2["config"]["input_size"] == size
    # The trunk really came from stage 1: the model is Model2 with Model1's transferred first layer shape.
    assert load_checkpoint(stage2 / "checkpoints" / "best.pt").spec.hidden[0] == load_checkpoint(
        stage1 / "checkpoints" / "best.pt"
    ).spec.hidden[0]
    # The checkpoints are checked; drop them so ten runs don't hold ~2.6 GB under /tmp (the records stay
    # for the privacy scan below, which still reads the checkpoints of its own run).
    for run in (stage1, stage2):
        shutil.rmtree(run / "checkpoints")


def test_stage1_trains_on_single_subtype_images_and_validates_on_all(tiny_data, runs_dir):
    data, labels = tiny_data
    run_dir = fit(tiny_config(data, runs_dir, gallery_size=0))
    info = json.loads((run_dir / "run.json").read_text())
    # Training leaves out images with two subtypes (stage 1 is single-class); validation keeps them.
    multi = int((labels[list(LABELS[:5])].sum(axis=1) > 1).sum())
    assert multi > 0
    assert info["data"]["n_train"] + info["data"]["n_val"] < len(labels)
    assert info["data"]["n_train"] + info["data"]["n_val"] >= len(labels) - multi
    assert not (run_dir / "gallery" / "index.csv").exists() or read_run(run_dir).gallery.empty


def test_run_records_hold_no_patient_name_or_raw_id(tiny_data, runs_dir):
    data, _ = tiny_data
    fit(tiny_config(data, runs_dir, gallery_size=4))  # at least one run even when run alone
    files = [p for p in Path(runs_dir).rglob("*") if p.is_file()]
    assert any(p.name == "predictions.csv" for p in files)
    name_parts = [part.encode() for part in PATIENT_NAME.split("^")]
    for path in files:
        content = path.read_bytes()
        for secret in (*name_parts, PATIENT_PREFIX.encode()):
            assert secret not in content, f"{secret!r} found in {path}"
    # Patients appear as hashes of their ids.
    predictions = pd.read_csv(next(p for p in files if p.name == "predictions.csv"))
    assert predictions["patient"].iloc[0] in {hash_id(f"{PATIENT_PREFIX}{p:04d}") for p in range(10)}


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tiny_data, runs_dir, monkeypatch):
    from training import engine, trainer

    data, _ = tiny_data
    current = {"epoch": 0}
    train_epoch, loss_forward = trainer.Loop.train_epoch, engine.Stage1Loss.forward

    def tracking(self, epoch):
        current["epoch"] = epoch
        return train_epoch(self, epoch)

    def nan_from_epoch_two(self, logits, target):
        loss = loss_forward(self, logits, target)
        return loss * float("nan") if current["epoch"] >= 2 else loss

    monkeypatch.setattr(trainer.Loop, "train_epoch", tracking)
    monkeypatch.setattr(engine.Stage1Loss, "forward", nan_from_epoch_two)
    run_dir = fit(tiny_config(data, runs_dir, epochs=3, gallery_size=0))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "nan" in info["error"].lower()
    assert info["last_epoch"] == 1 and info["best"]["epoch"] == 1
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # refuses NaN weights: loading is the check
    assert last.train_state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last.state_dict.values() if t.is_floating_point())


def test_stage2_without_a_parent_is_refused(tiny_data, runs_dir):
    data, _ = tiny_data
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--data", str(data), "--stage", "2", "--runs-dir", str(runs_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "init-from" in result.stderr
    assert "Traceback" not in result.stderr
