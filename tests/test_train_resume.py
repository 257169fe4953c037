"""``train --resume`` after SIGKILL ends bitwise where an uninterrupted run ends (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from train_fixtures import write_tiny_set

REPO = Path(__file__).resolve().parent.parent


def _train_args(data: Path, runs: Path) -> list[str]:
    # Augmentation, dropout and repeat-factor sampling on, so the RNG states matter; one thread, so float
    # sums are repeatable.
    return [
        sys.executable, "-m", "training", "train", "--data", str(data), "--backbone", "resnet18", "--stage", "1",
        "--epochs", "3", "--batch-size", "4", "--image-size", "32", "--input-size", "32", "--val-fraction", "0.3",
        "--runs-dir", str(runs), "--threads", "1", "--no-progress",
        "--set", "augment=true", "--set", "warmup_epochs=0.5", "--set", "gallery_size=4",
        "--set", "precise_bn_images=8", "--set", "repeat_threshold=0.5",
    ]


def _run(args: list[str], timeout: float = 600) -> Path:
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_tiny_set(data)
    uninterrupted = _run(_train_args(data, tmp_path / "runs_a"))

    runs = tmp_path / "runs_b"
    proc = subprocess.Popen(_train_args(data, runs), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if list(runs.glob("*/checkpoints/last.pt")):
                break  # the first epoch's checkpoint is on disk
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    (killed,) = list(runs.iterdir())
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "running" and info["last_epoch"] < 3  # killed mid-run, never closed

    resumed = _run([sys.executable, "-m", "training", "train", "--resume", str(killed), "--no-progress"])
    assert resumed == killed
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "finished" and info["last_epoch"] == 3

    a, b = _state(uninterrupted), _state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # The records agree too: one row per epoch, same numbers (seconds aside).
    cols = ["epoch", "train_loss", "val_loss", "val_auc_mean", "lr"]
    ma = pd.read_csv(uninterrupted / "metrics.csv")[cols]
    mb = pd.read_csv(killed / "metrics.csv")[cols]
    pd.testing.assert_frame_equal(ma, mb)
    assert (killed / "train.log").read_text().count("resumed from epoch") == 1


def test_resume_refuses_a_run_without_a_checkpoint(tmp_path):
    from hemorrhage_core.runs import RunWriter

    writer = RunWriter.create(tmp_path, backbone="resnet18", stage=1, config={"data": "x"})
    writer.finish("interrupted", "killed before its first epoch ended")  # and its writer lock with it
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--resume", str(writer.path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "cannot resume" in result.stderr and "Traceback" not in result.stderr
