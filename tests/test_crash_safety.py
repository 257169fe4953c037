"""Crash safety: SIGKILL at seeded points then ``--resume`` ends where an uninterrupted run ends; a full
disk during a checkpoint save keeps the previous checkpoint and marks the run failed; bad checkpoints are
refused on the CLI and dashboard paths; every load passes ``weights_only=True``; TORCH_HOME files are
named in the log before they are read."""

from __future__ import annotations

import ast
import builtins
import errno
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from train_fixtures import (
    killing_command,
    killing_env,
    resume_train_args,
    tiny_config,
    write_tiny_set,
)

from hemorrhage_core.checkpoint import load_checkpoint, save_checkpoint
from hemorrhage_core.errors import CheckpointError
from hemorrhage_core.preprocess import SlicePrep

REPO = Path(__file__).resolve().parent.parent
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what the atomic writers' mkstemp names look like


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process training sets torch's thread count (config threads=1): give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """write_tiny_set with its index and 32 px slice cache built, so the runs below share them."""
    from training.distributed import detect
    from training.trainer import prepare_data

    data = tmp_path_factory.mktemp("crash") / "data"
    write_tiny_set(data)
    prepare_data(tiny_config(data, data.parent / "runs"), detect())
    return data


def _temp_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if TEMP_FILE.match(p.name))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, differing[:5]


def _only_run(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return run_dir


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# ------------------------------------------------------------------------------- SIGKILL, then resume
STEPS_PER_EPOCH = 3  # of the 6 full batches of 4 that write_tiny_set's 25 training images make
EPOCHS = 3


def _train_args(data: Path, runs: Path) -> list[str]:
    return [*resume_train_args(data, runs, epochs=EPOCHS), "--set", f"max_steps_per_epoch={STEPS_PER_EPOCH}"]


def _kill_points(seed: int = 20261127) -> list[str]:
    """Three seeded points after the first epoch's checkpoints exist (before them, resume must refuse).

    Saves: epoch 1 writes best.pt (call 1) and last.pt (call 2); calls 3 and 4 fall in epochs 2-3.
    """
    rng = random.Random(seed)
    return [
        f"step:{rng.randint(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH)}",
        f"write:{rng.choice((3, 4))}:{rng.uniform(0.05, 0.95):.3f}",
        f"rename:{rng.choice((3, 4))}",
    ]


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_data):
    points = _kill_points()
    # The uninterrupted run and the trials run side by side (the data set's index and cache exist).
    reference_proc = _start(
        [sys.executable, "-m", "training", *_train_args(tiny_data, tmp_path / "reference")]
    )
    killed = [
        _start(killing_command(_train_args(tiny_data, tmp_path / f"trial{i}")), env=killing_env(point))
        for i, point in enumerate(points)
    ]
    runs = []
    for i, (point, proc) in enumerate(zip(points, killed, strict=True)):
        code, _, err = _finish(proc)
        assert code == -signal.SIGKILL, (point, err[-2000:])
        run_dir = _only_run(tmp_path / f"trial{i}")
        assert _status(run_dir)["status"] == "running", point  # killed: nothing closed the run
        last = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # the previous one, whole
        assert 1 <= last.train_state["epoch"] < EPOCHS, point
        if not point.startswith("step"):  # killed inside a save: its temporary file is the only trace
            assert [Path(p).parent.name for p in _temp_files(run_dir)] == ["checkpoints"], point
        runs.append(run_dir)

    reference_code, out, err = _finish(reference_proc)
    assert reference_code == 0, err[-2000:]
    reference = Path(out.strip().splitlines()[-1])

    resumed = [
        _start([sys.executable, "-m", "training", "train", "--resume", str(r), "--no-progress"]) for r in runs
    ]
    columns = ["epoch", "train_loss", "val_loss", "val_auc_mean", "lr"]
    for point, run_dir, proc in zip(points, runs, resumed, strict=True):
        code, out, err = _finish(proc)
        assert code == 0, (point, err[-2000:])
        assert Path(out.strip().splitlines()[-1]) == run_dir
        info = _status(run_dir)
        assert info["status"] == "finished" and info["last_epoch"] == EPOCHS, point
        assert info["best"] == _status(reference)["best"], point
        _assert_same_weights(reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
        _assert_same_weights(reference / "checkpoints" / "best.pt", run_dir / "checkpoints" / "best.pt")
        pd.testing.assert_frame_equal(
            pd.read_csv(reference / "metrics.csv")[columns], pd.read_csv(run_dir / "metrics.csv")[columns]
        )
        pd.testing.assert_frame_equal(
            pd.read_csv(reference / "predictions.csv"), pd.read_csv(run_dir / "predictions.csv")
        )
        assert _temp_files(run_dir) == [], point  # resume cleared what the killed save left
        assert (run_dir / "train.log").read_text().count("resumed from epoch") == 1


def test_resume_cleanup_removes_only_the_atomic_writers_temporary_files(tmp_path):
    from hemorrhage_core.runs import atomic_write_text, remove_stale_temp_files

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "gallery").mkdir()
    stale = [
        tmp_path / "checkpoints" / ".last.pt.k2x_9q0a.tmp",
        tmp_path / ".run.json.abcd1234.tmp",
        tmp_path / "gallery" / ".index.csv.zz00yy11.tmp",
    ]
    kept = [
        tmp_path / "checkpoints" / "last.pt",
        tmp_path / "notes.tmp",
        tmp_path / ".hidden",
        tmp_path / "checkpoints" / ".last.pt.tmp",
        tmp_path / "gallery" / "sub" / ".a.png.abcd1234.tmp",  # only the run's own folders are swept
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    atomic_write_text(tmp_path / "run.json", "{}")  # the writers' names are of the swept form
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# ---------------------------------------------------------------------------------- disk full
def _disk_full_at(monkeypatch, which: str, epoch: int) -> list[str]:
    """Make the checkpoint save of ``which`` (best | last) at ``epoch`` fail half-way with ENOSPC."""
    real_save = torch.save
    hits: list[str] = []

    def save(obj, f, *args, **kwargs):
        is_last = isinstance(obj, dict) and obj.get("train_state") is not None
        if isinstance(obj, dict) and (is_last == (which == "last")) and obj["metrics"].get("epoch") == epoch:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it reached the disk
            hits.append(which)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return hits


def _every_epoch_best(monkeypatch) -> None:
    # Every epoch then writes best.pt, so its save can be made to fail at a chosen epoch.
    monkeypatch.setattr("training.trainer.improved", lambda value, best, maximize: True)


def _disk_config(data: Path, runs: Path):
    return tiny_config(data, runs, epochs=2, max_steps_per_epoch=2, gallery_size=2, augment=True)


@pytest.fixture(scope="module")
def uninterrupted_two_epochs(tiny_data, tmp_path_factory) -> Path:
    from training.trainer import fit

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        _every_epoch_best(mp)
        run_dir = fit(_disk_config(tiny_data, tmp_path_factory.mktemp("disk_reference")))
    torch.set_num_threads(threads)
    return run_dir


@pytest.mark.parametrize("which", ["best", "last"])
def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one_and_fails_the_run(
    which, tiny_data, tmp_path, monkeypatch, uninterrupted_two_epochs
):
    from training.trainer import fit, resume_config

    _every_epoch_best(monkeypatch)
    hits = _disk_full_at(monkeypatch, which, epoch=2)
    with pytest.raises(OSError) as failure:
        fit(_disk_config(tiny_data, tmp_path / "runs"))
    assert failure.value.errno == errno.ENOSPC and hits == [which]
    run_dir = _only_run(tmp_path / "runs")
    info = _status(run_dir)
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert _temp_files(run_dir) == []
    # The file whose save failed still holds epoch 1, whole; the other one is as the epoch left it.
    checkpoints = run_dir / "checkpoints"
    assert load_checkpoint(checkpoints / f"{which}.pt").metrics["epoch"] == 1
    assert load_checkpoint(checkpoints / "last.pt").train_state["epoch"] == 1
    best_epoch = load_checkpoint(checkpoints / "best.pt").metrics["epoch"]
    assert best_epoch == (1 if which == "best" else 2) and info["best"]["epoch"] == best_epoch

    # With room again, --resume finishes the run where an uninterrupted one ends.
    monkeypatch.undo()
    _every_epoch_best(monkeypatch)
    assert fit(resume_config(run_dir), resume=run_dir) == run_dir
    assert _status(run_dir)["status"] == "finished"
    _assert_same_weights(uninterrupted_two_epochs / "checkpoints" / "last.pt", checkpoints / "last.pt")


# ------------------------------------------------------------------- bad checkpoints: CLI, dashboard
class _CreatesFile:
    """Unpickling this calls open(path, "w"): a payload that would run code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


BAD_CHECKPOINTS = {
    "malicious": "could run code",
    "wrong_architecture": "does not fit this architecture",
    "nan": "non-finite",
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> SimpleNamespace:
    """One run per bad checkpoint (as checkpoints/best.pt), the marker the malicious one would create,
    and a good checkpoint of the same model."""
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.runs import RunWriter

    root = tmp_path_factory.mktemp("bad_checkpoints")
    torch.manual_seed(0)
    model = build_model(ModelSpec("mobilenet_v3_small", 1, input_size=32, hidden=(16,)), weights="none")
    good = save_checkpoint(root / "good.pt", model, prep=SlicePrep(48))
    marker = root / "payload-ran.txt"
    changes = {
        "malicious": lambda p: p["config"].update(hook=_CreatesFile(marker)),
        "wrong_architecture": lambda p: p["spec"].update(backbone="resnet18"),
        "nan": lambda p: p["state_dict"]["head.layers.0.weight"].view(-1)[0].fill_(float("nan")),
    }
    runs = {}
    for case, change in changes.items():
        payload = torch.load(good, weights_only=True)
        change(payload)
        writer = RunWriter.create(
            root / "runs", backbone="mobilenet_v3_small", stage=1, config={"image_size": 48}
        )
        torch.save(payload, writer.checkpoint_path("best"))
        writer.finish()
        runs[case] = writer.path
    return SimpleNamespace(runs=runs, marker=marker, good=good, data=root / "no-data")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_cli_refuses_a_bad_run_checkpoint_with_a_message(case, command, bad_runs, capsys):
    from training import cli

    run_dir = str(bad_runs.runs[case])
    where = ["--data", str(bad_runs.data)] if command == "evaluate" else [str(bad_runs.data / "x.dcm")]
    code = cli.main([command, "--run", run_dir, *where])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error:") and BAD_CHECKPOINTS[case] in err and "Traceback" not in err
    assert not bad_runs.marker.exists()


def test_a_cli_process_refuses_the_code_running_checkpoint(bad_runs):
    # One real process (the in-process tests above cover each command and case): exit code, stderr.
    result = subprocess.run(
        [sys.executable, "-m", "training", "predict", "--run", str(bad_runs.runs["malicious"]), "x.dcm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "could run code" in result.stderr and "Traceback" not in result.stderr
    assert not bad_runs.marker.exists()


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_dashboard_reports_a_refused_checkpoint_as_a_message(case, bad_runs, tmp_path):
    from hemorrhage_core.dashboard.predict_panel import PredictRequest, _run_request
    from hemorrhage_core.dashboard.predictors import PredictorCache

    run_dir = bad_runs.runs[case]
    model_path = run_dir / "checkpoints" / "best.pt"
    ctx = SimpleNamespace(predictors=PredictorCache())
    request = PredictRequest(run_dir.name, "a run", model_path, (), "any")
    batch = _run_request(ctx, request)
    assert batch.results == [] and batch.error.startswith("The model cannot be loaded: ")
    assert BAD_CHECKPOINTS[case] in batch.error
    assert str(run_dir.parent) not in batch.error  # the page names the run, not the server's folders
    assert len(ctx.predictors) == 0 and not bad_runs.marker.exists()
    # A good model put in its place is loaded on the next request: the refusal was not cached.
    good_run = tmp_path / run_dir.name / "checkpoints"
    good_run.mkdir(parents=True)
    (good_run / "best.pt").write_bytes(bad_runs.good.read_bytes())
    batch = _run_request(ctx, PredictRequest(run_dir.name, "a run", good_run / "best.pt", (), "any"))
    assert batch.error is None and len(ctx.predictors) == 1


# ------------------------------------------------------------------------------- weights_only scan
SCANNED = ("hemorrhage_core", "training", "benchmarks", "app.py")


def _sources() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def unsafe_loads(source: str) -> list[str]:
    """Calls that unpickle without torch's weights_only guard: ``torch.load`` (any alias) without a
    literal ``weights_only=True``, ``pickle.load(s)``, ``numpy.load(..., allow_pickle=True)``."""
    tree = ast.parse(source)
    torch_names, loaders, pickle_names, numpy_names = {"torch"}, set(), {"pickle"}, {"numpy", "np"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name == "torch":
                    torch_names.add(bound)
                elif alias.name in ("pickle", "cPickle", "dill"):
                    pickle_names.add(bound)
                elif alias.name == "numpy":
                    numpy_names.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            loaders |= {a.asname or a.name for a in node.names if a.name == "load"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        dotted = ast.unparse(func)
        base = dotted.split(".")[0]
        keywords = {k.arg: k.value for k in node.keywords}
        is_torch_load = (isinstance(func, ast.Name) and func.id in loaders) or (
            isinstance(func, ast.Attribute) and func.attr == "load" and base in torch_names
        )
        if is_torch_load:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(func, ast.Attribute) and func.attr in ("load", "loads") and base in pickle_names:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(func, ast.Attribute) and func.attr == "load" and base in numpy_names:
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_catches_unsafe_loads():
    bad = (
        "import torch as th\nfrom torch import load as tl\nimport pickle\nimport numpy as np\n"
        "th.load(f)\nth.load(f, weights_only=None)\ntl(f, weights_only=flag)\npickle.loads(b)\n"
        "np.load(f, allow_pickle=True)\ntorch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\n"
    )
    assert [line.split(":")[0] for line in unsafe_loads(bad)] == [f"line {n}" for n in (5, 6, 7, 8, 9)]


def test_no_source_loads_anything_without_weights_only_true():
    files = _sources()
    assert REPO / "hemorrhage_core" / "models" / "weights.py" in files and REPO / "app.py" in files
    text = {path: path.read_text(encoding="utf-8") for path in files}
    spelled = [f"{p.relative_to(REPO)}" for p, t in text.items() if re.search(r"weights_only\s*=\s*False", t)]
    assert spelled == []
    unsafe = {str(p.relative_to(REPO)): found for p, t in text.items() if (found := unsafe_loads(t))}
    assert unsafe == {}
    # The one reader that does load is seen by the scan (so the scan is not vacuous).
    weights = text[REPO / "hemorrhage_core" / "models" / "weights.py"]
    assert "torch.load(" in weights and unsafe_loads(weights) == []


# ------------------------------------------------------------------------------------ TORCH_HOME
def _place_in_torch_home(tmp_path, monkeypatch, payload) -> Path:
    from hemorrhage_core.models.backbones import get_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = get_backbone("mobilenet_v3_small").weights_file()
    assert path.is_relative_to(tmp_path / "torch_home")
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    return path


def _spy_on_torch_load(monkeypatch, caplog, path: Path) -> list[tuple[str, bool, object]]:
    """Each torch.load call as (file, whether a log record already named ``path``, weights_only)."""
    real_load = torch.load
    calls: list[tuple[str, bool, object]] = []

    def load(f, *args, **kwargs):
        named = any(str(path) in r.getMessage() and r.levelno >= logging.INFO for r in caplog.records)
        calls.append((os.fspath(f), named, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_a_torch_home_file_is_read_only_after_a_log_line_names_it(tmp_path, monkeypatch, caplog):
    import torchvision

    from hemorrhage_core.models import ModelSpec, build_model

    reference = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    path = _place_in_torch_home(tmp_path, monkeypatch, reference)
    calls = _spy_on_torch_load(monkeypatch, caplog, path)
    with caplog.at_level(logging.INFO):
        model = build_model(ModelSpec("mobilenet_v3_small", 1, input_size=32), weights="imagenet")
    assert calls == [(str(path), True, True)]
    assert torch.equal(model.backbone.body[0][0].weight, reference["features.0.0.weight"])


def test_a_code_running_file_in_torch_home_is_named_then_refused(tmp_path, monkeypatch, caplog):
    from hemorrhage_core.models import ModelSpec, build_model

    marker = tmp_path / "payload-ran.txt"
    path = _place_in_torch_home(tmp_path, monkeypatch, {"features.0.0.weight": _CreatesFile(marker)})
    calls = _spy_on_torch_load(monkeypatch, caplog, path)
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointError, match="could run code"):
        build_model(ModelSpec("mobilenet_v3_small", 1, input_size=32), weights="imagenet")
    assert calls == [(str(path), True, True)] and not marker.exists()
