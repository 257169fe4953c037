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
    from hemorrhage_core.windowing import DEFAULT_STACK

    torch.manual_seed(seed)
    model = build_model(ModelSpec("resnet18", stage, input_size=size, hidden=(32, 16, 8))).eval()
    return save_checkpoint(path, model, image_size=size, windows=DEFAULT_STACK)


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
