"""Run directories for the dashboard tests, written through the real RunWriter (no Shiny here).

``write_run`` makes a complete train run (run.json, metrics.csv, predictions.csv, gallery, train.log)
from generated numbers; ``write_grid_run`` a grid run; ``write_damaged_runs`` the half-written and
malformed folders the runs table must survive; ``write_many_runs`` hundreds of small complete runs
(copies of one template, for tests/test_runs_many.py and benchmarks/bench_runs_folder.py);
``tiny_model_checkpoint`` a real untrained model for a run's checkpoints/best.pt. The browser tests
train real tiny models instead (see tests/test_dashboard_browser.py); these keep the unit tests fast.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.data.ids import hash_id
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.runs import METRICS_COLUMNS, GalleryEntry, RunWriter, dumps_json


def synthetic_predictions(
    n_patients: int = 12, slices: int = 8, *, skill: float = 2.0, seed: int = 0
) -> pd.DataFrame:
    """predictions.csv rows: truth with every label present, probabilities that separate it by ``skill``."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for k in range(slices):
            subtypes = (rng.random(len(SUBTYPES)) < 0.25).astype(int)
            truth = [*subtypes, int(subtypes.any())]
            logits = rng.normal(0.0, 1.0, len(LABELS)) + skill * (np.array(truth) * 2 - 1)
            probs = 1.0 / (1.0 + np.exp(-logits))
            rows.append(
                {
                    "image_id": f"ID_{p:04d}{k:05d}",
                    "patient": hash_id(f"patient-{p}"),
                    "series": hash_id(f"series-{p}"),
                    "z": float(k * 5),
                    **{f"true_{lb}": t for lb, t in zip(LABELS, truth, strict=True)},
                    **{f"prob_{lb}": float(v) for lb, v in zip(LABELS, probs, strict=True)},
                }
            )
    return pd.DataFrame(rows)


def metrics_rows(predictions: pd.DataFrame, epochs: int, *, seed: int = 0) -> list[dict]:
    """Plausible metrics.csv rows whose validation numbers approach those of ``predictions`` by the last epoch."""
    rng = np.random.default_rng(seed)
    y = predictions[[f"true_{lb}" for lb in LABELS]].to_numpy()
    p = predictions[[f"prob_{lb}" for lb in LABELS]].to_numpy()
    rows = []
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    for epoch in range(1, epochs + 1):
        # Earlier epochs: weaker and noisier logits, so the metrics improve over epochs.
        blend = epoch / epochs
        noise = rng.normal(0.0, 2.0 * (1.0 - blend) + 0.05, size=p.shape)
        pe = 1.0 / (1.0 + np.exp(-(logit * blend + noise)))
        val = metrics.validation_metrics(y, pe, series_ids=predictions["series"], z=predictions["z"])
        rows.append(
            {
                "epoch": epoch,
                "train_loss": 0.7 / epoch + rng.uniform(0, 0.02),
                "val_loss": 0.75 / epoch + rng.uniform(0, 0.03),
                **val,
                "lr": 1e-3 * (1 - (epoch - 1) / epochs),
                "seconds": 12.5,
            }
        )
    return rows


def write_run(
    runs_dir: Path,
    *,
    backbone: str = "vgg16",
    stage: int = 2,
    epochs: int = 3,
    seed: int = 0,
    skill: float = 2.0,
    status: str = "finished",
    gallery: bool = True,
    predictions: bool = True,
    checkpoint_writer=None,
) -> Path:
    """A complete train run written through RunWriter; returns its folder.

    ``checkpoint_writer(path)`` (optional) writes checkpoints/best.pt, e.g. a real tiny model.
    """
    preds = synthetic_predictions(skill=skill, seed=seed)
    writer = RunWriter.create(
        runs_dir,
        backbone=backbone,
        stage=stage,
        config={"epochs": epochs, "lr": 1e-3, "batch_size": 10, "image_size": 64},
        data={
            "n_images": 200,
            "n_train": 104,
            "n_val": len(preds),
            "n_patients_train": 13,
            "n_patients_val": 12,
        },
        split={"seed": seed, "val_fraction": 0.5, "val_patients": sorted(set(preds["patient"]))},
        epochs_planned=epochs,
        device="cpu",
    )
    rows = metrics_rows(preds, epochs, seed=seed)
    for row in rows:
        writer.append_metrics({k: v for k, v in row.items() if k in METRICS_COLUMNS})
        writer.log(
            f"epoch {row['epoch']} train_loss {row['train_loss']:.4f} val_auc_mean {row['val_auc_mean']:.4f}"
        )
    best = max(rows, key=lambda r: r["val_auc_mean"])
    writer.set_best(best["epoch"], "val_auc_mean", best["val_auc_mean"])
    if predictions:
        writer.write_predictions(preds)
    if gallery:
        writer.write_gallery(gallery_entries(preds, seed=seed))
    if checkpoint_writer is not None:
        checkpoint_writer(writer.checkpoint_path("best"))
    if status != "running":
        writer.finish(status, error="RuntimeError: loss became NaN" if status == "failed" else None)
    return writer.path


def gallery_entries(preds: pd.DataFrame, *, n: int = 8, size: int = 64, seed: int = 0) -> list[GalleryEntry]:
    rng = np.random.default_rng(seed)
    entries = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _, row in preds.head(n).iterrows():
        head = (((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.33)) ** 2 < 1).astype(
            float
        )
        image = np.stack([head * 0.6, head * 0.4, head * 0.2]) + rng.uniform(0, 0.05, (3, size, size))
        angle = rng.uniform(-0.2, 0.2)
        theta = [np.cos(angle), -np.sin(angle), 0.05, np.sin(angle), np.cos(angle), -0.03]
        entries.append(
            GalleryEntry(
                image_id=row["image_id"],
                input_image=np.clip(image, 0, 1),
                aligned_image=np.clip(image[:, ::-1], 0, 1),
                theta=theta,
                true=[int(row[f"true_{lb}"]) for lb in LABELS],
                prob=[float(row[f"prob_{lb}"]) for lb in LABELS],
            )
        )
    return entries


def write_grid_run(runs_dir: Path) -> Path:
    """A finished grid run with sklearn-style cv_results_ (batch size x learning rate, 3 folds)."""
    writer = RunWriter.create(
        runs_dir,
        backbone="vgg16",
        stage=1,
        kind="grid",
        config={"epochs": 1},
        extra={
            "grid": {"batch_size": [10, 15], "lr": [1e-3, 1e-4]},
            "scoring": "roc_auc",
            "folds": 3,
            "best_params": {"batch_size": 10, "lr": 1e-3},
            "best_score": 0.81,
        },
    )
    params = [{"batch_size": b, "lr": lr} for b in (10, 15) for lr in (1e-3, 1e-4)]
    split = np.array([[0.80, 0.83, 0.80], [0.70, 0.72, 0.69], [0.78, 0.75, 0.77], [0.66, 0.70, 0.64]])
    mean = split.mean(axis=1)
    rank = (-mean).argsort().argsort() + 1
    writer.write_grid_results(
        {
            "params": params,
            "param_batch_size": [p["batch_size"] for p in params],
            "param_lr": [p["lr"] for p in params],
            **{f"split{i}_test_score": split[:, i] for i in range(3)},
            "mean_test_score": mean,
            "std_test_score": split.std(axis=1),
            "rank_test_score": rank,
            "mean_fit_time": [3.1, 3.0, 2.2, 2.1],
        }
    )
    writer.finish("finished")
    return writer.path


def write_damaged_runs(runs_dir: Path) -> dict[str, Path]:
    """Folders a crash or a hand edit can leave: no run.json, bad JSON, newer format, torn metrics."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    out["empty"] = runs_dir / "20260101-000000-vgg16-s1-0000"
    out["empty"].mkdir()
    out["bad_json"] = runs_dir / "20260101-000001-vgg16-s1-0001"
    out["bad_json"].mkdir()
    (out["bad_json"] / "run.json").write_text('{"format_version": 1, "id": ')
    out["newer"] = runs_dir / "20260101-000002-vgg16-s1-0002"
    out["newer"].mkdir()
    (out["newer"] / "run.json").write_text('{"format_version": 99, "id": "x", "status": "finished"}')
    torn = write_run(
        runs_dir, backbone="resnet18", stage=1, epochs=2, status="running", gallery=False, predictions=False
    )
    with open(torn / "metrics.csv", "a") as fh:
        fh.write("3,0.41,0.4")  # a half-written row, as a crash mid-append would leave
    out["torn"] = torn
    return out


def tiny_model_checkpoint(path: Path, *, stage: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A real, untrained resnet18 model of ``stage`` saved as a checkpoint at ``path`` (a second on CPU).

    Pass it as ``write_run``'s ``checkpoint_writer`` to get a run
    the Predict panel can use without a training.
    """
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep

    torch.manual_seed(seed)
    model = build_model(ModelSpec("resnet18", stage, input_size=size, hidden=(32, 16, 8))).eval()
    return save_checkpoint(path, model, prep=SlicePrep(size))


# Statuses cycled over write_many_runs' runs; "running" keeps a live writer, "interrupted" is a
# run still marked running whose writer process is gone (the reader reports it as interrupted).
MANY_RUN_STATUSES: tuple[str, ...] = ("finished", "finished", "failed", "running", "interrupted")


def write_many_runs(
    runs_dir: Path, n: int, *, epochs: int = 10, start: str = "2026-01-01T00:00:00Z"
) -> list[str]:
    """``n`` small but complete train runs, made fast by copying one template written through RunWriter.

    Each run has run.json, metrics.csv (``epochs`` rows), predictions.csv (96 rows), gallery/index.csv
    with 4 entries (8 PNGs) and train.log. Run ``i`` was created ``i`` minutes after ``start``, has the
    status ``MANY_RUN_STATUSES[i % 5]`` and its best epoch at ``1 + i % epochs``. Returns the run ids,
    oldest first.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        template = write_run(Path(scratch), epochs=epochs, gallery=False)
        preds = pd.read_csv(template / "predictions.csv", dtype={"patient": str, "series": str})
        # A 4-image gallery keeps a run small; write_gallery is the real writer.
        RunWriter(template, json.loads((template / "run.json").read_text())).write_gallery(
            gallery_entries(preds, n=4, size=32)
        )
        record = json.loads((template / "run.json").read_text())
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # its pid names a process that no longer exists
        t0 = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ids = []
        for i in range(n):
            created = t0 + timedelta(minutes=i)
            run_id = f"{created:%Y%m%d-%H%M%S}-{record['backbone']}-s{record['stage']}-{i:04x}"
            status = MANY_RUN_STATUSES[i % len(MANY_RUN_STATUSES)]
            best = 1 + i % epochs
            info = {
                **record,
                "id": run_id,
                "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "updated": (created + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "status": "running" if status == "interrupted" else status,
                "error": "RuntimeError: loss became NaN" if status == "failed" else None,
                "finished": None if status in ("running", "interrupted") else record["finished"],
                "best": {"epoch": best, "metric": "val_auc_mean", "value": record["best"]["value"]},
                "writer": {
                    "host": socket.gethostname(),
                    "pid": gone.pid if status == "interrupted" else os.getpid(),
                },
            }
            target = runs_dir / run_id
            shutil.copytree(template, target)
            (target / "run.json").write_text(dumps_json(info))
            ids.append(run_id)
    return ids


# ---------------------------------------------------------------- saved evaluations (data selector)
TINY_PIPELINE_PRESET = """
defaults: {image_size: 32, input_size: 32, epochs: 1, batch_size: 4, threads: 1, max_steps_per_epoch: 2,
           gallery_size: 4, val_fraction: 0.3, augment: false, progress: false, warmup_epochs: 0,
           calibrate: true}
phase1:
  subset: 0.6
  stage1: {backbone: resnet18}
  stage2: {lr: 5.0e-4}
phase2:
  stage1: {backbone: mobilenet_v3_small}
  stage2: {}
"""


def write_evaluation_from(run_dir: Path, name: str, frame: pd.DataFrame, *, stage: int = 2) -> Path:
    """Save ``frame`` (predictions.csv columns) as evaluation ``name`` of a run, with its metrics, as
    ``evaluate --save`` writes it (uncalibrated)."""
    from hemorrhage_core import evaluations as ev

    result = ev.evaluation_metrics(frame, ev.run_thresholds(run_dir, None), stage=stage)
    return ev.write_evaluation(run_dir, name, frame, {**result, "calibration": {"applied": False}})


def damage_evaluations(run_dir: Path) -> dict[str, Path]:
    """Evaluation folders a crash or a hand edit can leave: ``half`` (predictions written, metrics.json
    not yet) and ``garbled`` (metrics.json that is not JSON)."""
    root = run_dir / "evaluations"
    half, garbled = root / "half", root / "garbled"
    for folder in (half, garbled):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "predictions.csv", folder / "predictions.csv")
    (garbled / "metrics.json").write_text('{"n_images": 12, ')
    return {"half": half, "garbled": garbled}


def write_tiny_pipeline(root: Path) -> dict[str, Path]:
    """A real ``pipeline`` over a tiny data set (about 15 s on 2 CPU cores): four calibrated runs, each
    evaluated on the same held-out test patients (``evaluations/test``), and pipeline.json. Then, on
    the two final models, an evaluation ``external`` on images that the two do not share (so the
    comparison cannot pair) and, on the phase-2 one, the damaged folders of ``damage_evaluations``.

    Returns the runs folder and the run folders by role (``phase1_stage2`` ...).
    """
    from train_fixtures import write_tiny_set

    from training.pipeline_cmd import run_pipeline

    data, runs_dir = root / "data", root / "runs"
    write_tiny_set(data, n_patients=16)
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PIPELINE_PRESET)
    record = json.loads(run_pipeline(str(data), str(preset), runs_dir=str(runs_dir), test_fraction=0.25).read_text())
    out = {"runs": runs_dir}
    for phase in ("phase1", "phase2"):
        for stage in ("stage1", "stage2"):
            out[f"{phase}_{stage}"] = runs_dir / record[phase][stage]
    for key, seed in (("phase1_stage2", 1), ("phase2_stage2", 2)):
        frame = synthetic_predictions(n_patients=6, slices=4, seed=seed)
        frame["image_id"] = frame["image_id"] + f"_{key[5]}"  # each run its own images: nothing to pair
        write_evaluation_from(out[key], "external", frame)
    damage_evaluations(out["phase2_stage2"])
    return out


# ------------------------------------------------- the report and the predict panel's series verdict
REPORT_ROLES: tuple[tuple[str, str, str, int, float], ...] = (
    # (phase, stage, backbone, stage number, skill on the test images)
    ("phase1", "stage1", "vgg16_bn", 1, 0.8),
    ("phase1", "stage2", "vgg16_bn", 2, 1.2),
    ("phase2", "stage1", "inception_v3", 1, 1.0),
    ("phase2", "stage2", "inception_v3", 2, 2.2),
)


def write_report_runs(runs_dir: Path, *, pipeline: bool = True, checkpoint_writer=None) -> dict[str, Path]:
    """Four finished runs laid out as a pipeline, from generated numbers (no training): each has a
    saved evaluation ``test`` on the same 60 images of 10 patients (one truth, each run its own skill);
    the two stage-2 runs are calibrated (calibration.json fitted on validation, their test
    probabilities calibrated, as ``evaluate --save`` writes them). With ``pipeline``, pipeline.json
    names the four. ``checkpoint_writer`` goes to ``write_run`` (e.g. a real tiny model).

    Returns the runs folder (``runs``) and the run folders by role (``phase1_stage2`` ...).
    """
    from hemorrhage_core import evaluations as ev

    truth = synthetic_predictions(n_patients=10, slices=6, seed=100)
    true_cols = [f"true_{lb}" for lb in LABELS]
    out: dict[str, Path] = {"runs": runs_dir}
    record: dict = {"phase1": {}, "phase2": {}}
    for i, (phase, stage, backbone, stage_no, skill) in enumerate(REPORT_ROLES):
        run = write_run(runs_dir, backbone=backbone, stage=stage_no, seed=i, checkpoint_writer=checkpoint_writer)
        rng = np.random.default_rng(10 + i)
        signs = truth[true_cols].to_numpy() * 2 - 1
        raw = 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.0, signs.shape) + skill * signs)))
        calibration = ev.fit_calibration(run) if stage_no == 2 else None
        if calibration is None:
            ev.write_thresholds(run, None)
        frame = ev.with_probabilities(truth, raw if calibration is None else calibration.apply(raw))
        result = ev.evaluation_metrics(frame, ev.run_thresholds(run, calibration), stage=stage_no)
        if calibration is None:
            result["calibration"] = {"applied": False}
        else:
            y_true = truth[true_cols].to_numpy()
            report = ev.calibration_report(y_true, raw, calibration.apply(raw))
            result["calibration"] = {"applied": True, **calibration.to_dict(), **report}
        ev.write_evaluation(run, ev.TEST, frame, {"n_images": len(frame), **result})
        record[phase][stage] = run.name
        out[f"{phase}_{stage}"] = run
    record["test"] = {"source": "holdout", "n_patients": 10, "n_images": len(truth), "evaluation": ev.TEST,
                      "fraction": 0.2, "seed": 0}
    if pipeline:
        (runs_dir / "pipeline.json").write_text(dumps_json(record))
    return out


def write_dicom_series(folder: Path, n: int = 4, *, size: int = 64, seed: int = 0) -> list[Path]:
    """``n`` CT slices of one series (z = 0, 5, ...): an air-bone-brain head with a bright blob that
    moves and grows from slice to slice, so each slice gets its own probabilities."""
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    folder.mkdir(parents=True, exist_ok=True)
    study, series = new_uid(f"verdict-study-{seed}"), new_uid(f"verdict-series-{seed}")
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        hu = np.full((size, size), -1000.0)
        hu[r < size * 0.45] = 1000.0
        hu[r < size * 0.38] = 35.0 + rng.normal(0, 4, (size, size))[r < size * 0.38]
        hu[np.hypot(yy - 4 * k + 6, xx - 5) < 2 + 2 * k] = 75.0
        path = folder / f"ID_{seed:02d}verdict{k}.dcm"
        write_ct_slice(path, np.rint(hu + 1024).astype(np.int16), patient_id="VERDICT-PATIENT", study_uid=study,
                       series_uid=series, sop_uid=new_uid(f"verdict-{seed}-{k}"), z=5.0 * k, instance_number=k + 1)
        paths.append(path)
    return paths
