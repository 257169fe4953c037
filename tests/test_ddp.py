"""torchrun: 2 CPU processes (gloo) of batch 2 take the same step as 1 process of batch 4.

Exactness needs a model whose forward on a half batch equals its forward on the whole batch:
batch norm uses its running statistics (``freeze_bn``, as CPU SyncBatchNorm does not exist) and
dropout is off. The DistributedSampler deals the same permutation to both world sizes, so the two
ranks' batches together are the single process's batch, and DDP averages the two gradients.
The step is plain SGD: Adam divides each gradient by its own magnitude, which turns float rounding
in near-zero gradients (summed in another order by the all-reduce) into differences of up to lr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from train_fixtures import write_tiny_set

from training.config import TrainConfig
from training.trainer import build_network, seed_everything

REPO = Path(__file__).resolve().parent.parent

COMMON = [
    "train", "--backbone", "resnet18", "--stage", "1", "--epochs", "1", "--image-size", "32", "--input-size", "32",
    "--val-fraction", "0.3", "--threads", "1", "--no-progress", "--lr", "0.05", "--set", "optimizer=sgd",
    "--set", "augment=false", "--set", "warmup_epochs=0", "--set", "freeze_bn=true", "--set", "dropout=0",
    "--set", "max_steps_per_epoch=1", "--set", "gallery_size=0",
]


def _torchrun() -> list[str]:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _last_line(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_match_one_process_with_the_equivalent_batch(tmp_path):
    data = tmp_path / "data"
    write_tiny_set(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(
        [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "training", *COMMON,
         "--data", str(data), "--batch-size", "2", "--runs-dir", str(tmp_path / "two")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    two_dir = _last_line(two)
    one_dir = _last_line(subprocess.run(
        [sys.executable, "-m", "training", *COMMON, "--data", str(data), "--batch-size", "4",
         "--runs-dir", str(tmp_path / "one")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    ))
    # Only rank 0 wrote: one run folder, recording a world of two.
    assert len(list((tmp_path / "two").iterdir())) == 1
    assert pd.read_json(two_dir / "run.json", typ="series")["world_size"] == 2

    a = torch.load(one_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(two_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    # The step really moved the weights, so agreeing this closely is not trivial.
    seed_everything(0)
    start = build_network(TrainConfig(backbone="resnet18", input_size=32, dropout=0.0)).state_dict()
    moved = max(float((a[k].double() - start[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1e-3
    ma, mb = pd.read_csv(one_dir / "metrics.csv"), pd.read_csv(two_dir / "metrics.csv")
    # The training loss is the mean over both ranks' halves = the single process's loss.
    assert mb["train_loss"].iloc[0] == pytest.approx(ma["train_loss"].iloc[0], rel=1e-5)
    # Validation was sharded over the ranks and gathered: the same metrics.
    assert mb["val_auc_mean"].iloc[0] == pytest.approx(ma["val_auc_mean"].iloc[0], rel=1e-5)
    assert mb["val_loss"].iloc[0] == pytest.approx(ma["val_loss"].iloc[0], rel=1e-5)
