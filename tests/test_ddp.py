"""torchrun: 2 CPU processes (gloo) of batch 2 take the same step as 1 process of batch 4.

Exactness needs a model whose forward on a half batch equals its forward on the whole batch:
batch norm uses its running statistics (``freeze_bn``, as CPU SyncBatchNorm does not exist) and
dropout is off. The DistributedSampler deals the same permutation to both world sizes, so the two
ranks' batches together are the single process's batch, and DDP averages the two gradients.
The step is plain SGD: Adam divides each gradient by its own magnitude, which turns float rounding
in near-zero gradients (summed in another order by the all-reduce) into differences of up to lr.

The README's torchrun commands run here as written (``pipeline --preset full``) with tiny sizes through
``--set``: on one "machine" with 2 processes and as two launches of 1 process on 127.0.0.1 (c10d
rendezvous). ``tests/ddp_site/sitecustomize.py`` watches the workers' file writes and injects a
failing or hanging rank, so the commands stay the README's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from train_fixtures import write_tiny_set

from training import distributed as D
from training.config import TrainConfig
from training.trainer import build_network, seed_everything, train_loader

REPO = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "ddp_site"  # sitecustomize for the torchrun workers
README_DATA, README_RUNS, README_ENDPOINT = "/data/rsna", "/data/runs", "HOST0:29500"
# The full preset at test size: a small backbone without ImageNet weights, 32 px, 2 steps an epoch.
TINY = [
    "--set", "weights=none", "--set", "backbone=mobilenet_v3_small", "--set", "image_size=32",
    "--set", "input_size=32", "--set", "epochs=1", "--set", "batch_size=2", "--set", "max_steps_per_epoch=2",
    "--set", "num_workers=0", "--set", "threads=1", "--set", "gallery_size=2", "--set", "val_fraction=0.3",
    "--no-progress",
]
PHASE_STAGES = [(p, s) for p in ("phase1", "phase2") for s in ("stage1", "stage2")]

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


def private_tmp(tmp_path: Path) -> Path:
    """A temporary folder for a launched command: torchrun's agent makes a ``torchelastic_*`` log folder
    in it (under the system's /tmp it outlives the test; under tmp_path pytest removes it)."""
    folder = tmp_path / "tmp"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["--set", "repeat_threshold=0.5"]], ids=["shuffle", "repeat_factor"])
def test_two_processes_match_one_process_with_the_equivalent_batch(tmp_path, sampling):
    data = tmp_path / "data"
    write_tiny_set(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(private_tmp(tmp_path))}
    two = subprocess.run(
        [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "training", *COMMON, *sampling,
         "--data", str(data), "--batch-size", "2", "--runs-dir", str(tmp_path / "two")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    two_dir = _last_line(two)
    one_dir = _last_line(subprocess.run(
        [sys.executable, "-m", "training", *COMMON, *sampling, "--data", str(data), "--batch-size", "4",
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


@pytest.mark.ddp
@pytest.mark.slow
def test_a_held_trunk_under_two_processes_takes_the_single_process_steps(tmp_path):
    """Stage 2 with head_warmup_epochs: while the trunk is held it computes no gradient, which DDP must
    be told (find_unused_parameters); both epochs, held and not, match one process of the same batch."""
    data = tmp_path / "data"
    write_tiny_set(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(private_tmp(tmp_path))}
    stage1 = _last_line(subprocess.run(
        [sys.executable, "-m", "training", *COMMON, "--data", str(data), "--batch-size", "4",
         "--runs-dir", str(tmp_path / "s1")], cwd=REPO, capture_output=True, text=True, timeout=600, env=env))
    # argparse keeps an option's last value: COMMON's stage 1 and one epoch become stage 2 and two.
    stage2 = [*COMMON, "--stage", "2", "--epochs", "2", "--set", "head_warmup_epochs=1", "--set", "schedule=constant",
              "--init-from", str(stage1), "--data", str(data)]
    two = _last_line(subprocess.run(
        [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "training", *stage2, "--batch-size", "2",
         "--runs-dir", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=600, env=env))
    one = _last_line(subprocess.run(
        [sys.executable, "-m", "training", *stage2, "--batch-size", "4", "--runs-dir", str(tmp_path / "one")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env))
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    start = torch.load(stage1 / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    # The trunk trained in the second epoch, after its hold, under both world sizes (untrained it would
    # equal the stage-1 weights exactly).
    trunk = [k for k in a if k.startswith("backbone.") and a[k].is_floating_point() and k in start]
    assert max(float((b[k] - start[k]).abs().max()) for k in trunk) > 1e-5


# ------------------------------------------------------------------------------ the README's commands
def readme_commands() -> dict[str, list[str]]:
    """The torchrun commands of the README's multi-GPU section: {"one machine": argv, "two machines": argv}."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Multi-GPU and multi-node", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.strip().startswith("torchrun")]
    one = [c for c in commands if "--standalone" in c]
    two = [c for c in commands if "--nnodes" in c]
    assert len(one) == 1 and len(two) == 1, commands
    return {"one machine": one[0], "two machines": two[0]}


def as_test(argv: list[str], *, nproc: int, data: Path, runs: Path, endpoint: str | None = None) -> list[str]:
    """A README command with this machine's torchrun, ``nproc`` processes, the test's folders and
    endpoint, and the tiny sizes; every placeholder must be there to be replaced."""
    swap = {README_DATA: str(data), README_RUNS: str(runs), README_ENDPOINT: endpoint}
    assert argv[0] == "torchrun" and README_DATA in argv and README_RUNS in argv
    assert (README_ENDPOINT in argv) == (endpoint is not None)
    out = [*_torchrun()]
    for previous, arg in zip(argv, argv[1:], strict=False):
        out.append(str(nproc) if previous == "--nproc_per_node" else swap.get(arg) or arg)
    return out + TINY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(tmp_path: Path, runs: Path | None, **extra: str) -> dict[str, str]:
    """CPU only, one thread, temporary files under tmp_path; the workers import
    tests/ddp_site/sitecustomize.py, which logs their writes under ``runs`` (unless None) to
    tmp_path/writes.<rank>."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEMORRHAGE_TEST_", "HEMORRHAGE_DIST_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path, TMPDIR=str(private_tmp(tmp_path)), **extra)
    if runs is not None:
        env.update(HEMORRHAGE_TEST_WATCH=str(runs), HEMORRHAGE_TEST_WRITES_LOG=str(tmp_path / "writes"))
    return env


def launch_two_machines(command: list[str], env: dict[str, str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """The same command started twice, as on two machines; both results."""
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def pipeline_runs(runs: Path) -> dict[tuple[str, str], Path]:
    """(phase, stage) -> run directory, for the runs pipeline.json names (those that started)."""
    record = json.loads((runs / "pipeline.json").read_text())
    return {(p, s): runs / record[p][s] for p, s in PHASE_STAGES if record[p][s]}


@pytest.fixture(scope="module")
def pipeline_data(tmp_path_factory) -> Path:
    """40 patients x 2 slices: after the test hold-out, phase 1's 20% subset still has a validation split."""
    data = tmp_path_factory.mktemp("ddp-data") / "data"
    write_tiny_set(data, n_patients=40, slices_per_patient=2)
    return data


@pytest.mark.ddp
@pytest.mark.slow
def test_the_readme_pipeline_commands_on_two_machines_and_on_one(tmp_path, pipeline_data):
    commands = readme_commands()
    assert all("--preset" in c and c[c.index("--preset") + 1] == "full" for c in commands.values())
    two_runs, one_runs = tmp_path / "two-machines", tmp_path / "one-machine"
    endpoint = f"127.0.0.1:{free_port()}"
    two = launch_two_machines(
        as_test(commands["two machines"], nproc=1, data=pipeline_data, runs=two_runs, endpoint=endpoint),
        worker_env(tmp_path, two_runs),
    )
    for result in two:
        assert result.returncode == 0, result.stderr[-3000:]
    one = subprocess.run(as_test(commands["one machine"], nproc=2, data=pipeline_data, runs=one_runs),
                         cwd=REPO, env=worker_env(tmp_path, None), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    runs = pipeline_runs(two_runs)
    assert len(runs) == 4
    for run_dir in runs.values():
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "finished" and info["world_size"] == 2
        assert len(pd.read_csv(run_dir / "metrics.csv")) == 1  # one row for the one epoch, not one per rank
    # Every file of the runs folder was written by rank 0, and rank 1 wrote nothing there.
    written = {line.split("\t", 1)[1] for line in (tmp_path / "writes.0").read_text().splitlines()}
    files = {os.path.realpath(p) for p in two_runs.rglob("*") if p.is_file()}
    assert files and files <= written
    assert not (tmp_path / "writes.1").exists() or not (tmp_path / "writes.1").read_text()

    # Two machines of one process end where one machine of two processes ends, bit for bit.
    for key, run_dir in runs.items():
        a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(pipeline_runs(one_runs)[key] / "checkpoints" / "last.pt", weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), key
        # Each rank drew from its own streams (same seed, same number of draws: equal states otherwise),
        # and last.pt keeps both for --resume.
        ranks = a["train_state"]["ranks"]
        assert len(ranks) == 2
        assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
        assert not torch.equal(ranks[0]["loader_generator"], ranks[1]["loader_generator"])
        assert torch.equal(ranks[0]["rng"]["torch"], a["train_state"]["rng"]["torch"])


@pytest.mark.ddp
@pytest.mark.slow
def test_a_rank_that_fails_ends_both_machines_with_its_message(tmp_path, pipeline_data):
    runs = tmp_path / "runs"
    command = as_test(readme_commands()["two machines"], nproc=1, data=pipeline_data, runs=runs,
                      endpoint=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    results = launch_two_machines(command, worker_env(tmp_path, runs, HEMORRHAGE_TEST_FAIL="1:raise"), timeout=300)
    elapsed = time.monotonic() - started
    assert all(r.returncode != 0 for r in results)
    assert any("injected failure on rank 1" in r.stderr for r in results)
    # Rank 0 saw rank 1's connections close at its next collective, not after a timeout.
    assert elapsed < D.DEFAULT_TIMEOUT_S / 4, elapsed
    started_runs = pipeline_runs(runs)
    assert list(started_runs) == [("phase1", "stage1")]  # the pipeline stopped at the failed run
    info = json.loads((started_runs["phase1", "stage1"] / "run.json").read_text())
    assert info["status"] == "failed", info


@pytest.mark.ddp
@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_job_after_the_stated_timeout(tmp_path, pipeline_data):
    runs = tmp_path / "runs"
    command = as_test(readme_commands()["one machine"], nproc=2, data=pipeline_data, runs=runs)
    env = worker_env(tmp_path, runs, HEMORRHAGE_TEST_FAIL="1:hang", HEMORRHAGE_DIST_TIMEOUT="10")
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "error: rank 0 stopped at the end of epoch 1" in result.stderr
    assert "within 10 s (HEMORRHAGE_DIST_TIMEOUT)" in result.stderr and "Rank 1" in result.stderr
    assert elapsed < 150, elapsed  # start-up, the first epoch, 10 s at the barrier, torchrun's shutdown
    info = json.loads((pipeline_runs(runs)["phase1", "stage1"] / "run.json").read_text())
    assert info["status"] == "failed" and "HEMORRHAGE_DIST_TIMEOUT" in info["error"]


# ----------------------------------------------------------------------------------- per-rank seeds
class _OneSlice(torch.utils.data.Dataset):
    """One fixed slice, augmented per item: two batches differ only by their augmentation draws."""

    def __init__(self, n: int = 8) -> None:
        from hemorrhage_core.data import AugmentConfig, SliceAugment

        self.image = torch.linspace(0, 1, 3 * 32 * 32).reshape(3, 32, 32)
        self.augment = SliceAugment(AugmentConfig())
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.augment(self.image.clone()), torch.tensor(0), f"ID_{i}"


@pytest.mark.parametrize("workers", [0, 1])
def test_ranks_draw_their_own_augmentations_and_a_rerun_repeats_them(workers):
    config = TrainConfig(seed=3, batch_size=4, num_workers=workers)

    def first_batch(rank: int, world: int) -> torch.Tensor:
        seed_everything(D.rank_seed(config.seed, rank))  # as fit() seeds each rank
        loader = train_loader(_OneSlice(), config, D.DistEnv(rank=rank, world_size=world), torch.device("cpu"))
        loader.sampler.set_epoch(1)
        return next(iter(loader))[0]

    rank0, rank1 = first_batch(0, 2), first_batch(1, 2)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(first_batch(1, 2), rank1) and torch.equal(first_batch(0, 2), rank0)
    # Rank 0 draws what a single process draws: a world of one trains as before.
    assert torch.equal(first_batch(0, 1), rank0)
    assert D.rank_seed(7, 0) == 7 and D.rank_seed(7, 1) != D.rank_seed(8, 0)


def test_the_timeouts_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(D.PREPARE_TIMEOUT_ENV, raising=False)
    assert D.collective_timeout() == timedelta(seconds=600)
    assert D.prepare_timeout() == timedelta(hours=4)
    monkeypatch.setenv(D.TIMEOUT_ENV, "30")
    monkeypatch.setenv(D.PREPARE_TIMEOUT_ENV, "5")
    assert D.collective_timeout() == timedelta(seconds=30)
    assert D.prepare_timeout() == timedelta(seconds=30)  # never shorter than a collective's
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
            D.collective_timeout()
    assert np.isfinite(D.DEFAULT_PREPARE_TIMEOUT_S)
