"""Checkpoints: round trip, safe types, atomic writes, and refusals (code-running pickle, wrong
architecture, NaN weights, foreign files)."""

from __future__ import annotations

import argparse
import builtins
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hemorrhage_core.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    to_safe,
)
from hemorrhage_core.errors import CheckpointError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.models import ModelSpec, build_model, stage2_from_stage1
from hemorrhage_core.models.weights import safe_torch_load
from hemorrhage_core.preprocess import SlicePrep
from hemorrhage_core.windowing import DEFAULT_STACK

SPEC = ModelSpec("resnet18", 1, input_size=40, hidden=(16,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model whose weights differ from any fresh initialisation, saved once."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(torch.rand(4, 3, 48, 48)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    rng = torch.get_rng_state()
    train_state = {
        "optimizer": optimizer.state_dict(),
        "epoch": np.int64(3),
        "torch_rng": rng,
        "numpy_rng": np.random.default_rng(0).bit_generator.state,
        "python_rng": random.getstate(),
    }
    config = argparse.Namespace(lr=np.float32(1e-3), data=Path("/data/x"), windows=("brain", "bone"), _run=print)
    save_checkpoint(path, model, prep=SlicePrep(48), config=config,
                    metrics={"auc_any": np.float64(0.75)}, train_state=train_state)
    return model.eval(), path, optimizer, rng


def test_round_trip_gives_identical_outputs_and_fields(trained):
    model, path, optimizer, rng = trained
    restored, ckpt = model_from_checkpoint(path)
    x = torch.rand(2, 3, 48, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), restored(x))
    assert ckpt.format_version == FORMAT_VERSION and ckpt.spec == SPEC and ckpt.image_size == 48
    assert ckpt.windows == DEFAULT_STACK and ckpt.labels == list(LABELS)
    assert ckpt.normalisation == model.normalise.as_dict()
    assert ckpt.config == {"lr": pytest.approx(1e-3), "data": "/data/x", "windows": ("brain", "bone")}
    assert type(ckpt.config["lr"]) is float and ckpt.metrics == {"auc_any": 0.75}
    assert not restored.training and not restored.backbone_frozen
    # The train state is enough to resume the optimizer.
    state = ckpt.train_state
    assert state["epoch"] == 3 and type(state["epoch"]) is int
    resumed = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    resumed.load_state_dict(state["optimizer"])
    first = next(iter(optimizer.state.values()))["exp_avg"]
    assert torch.equal(next(iter(resumed.state.values()))["exp_avg"], first)
    assert torch.equal(state["torch_rng"], rng)
    assert isinstance(state["numpy_rng"]["state"]["state"], int)


def test_freezing_policy_survives_the_round_trip(tmp_path):
    model = build_model(SPEC, freeze=True)
    path = save_checkpoint(tmp_path / "frozen.pt", model, prep=SlicePrep(40))
    restored, _ = model_from_checkpoint(path)
    assert restored.backbone_frozen and not any(p.requires_grad for p in restored.backbone.parameters())


def test_writes_are_atomic_and_replace(tmp_path, trained):
    model = trained[0]
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, model, prep=SlicePrep(48), metrics={"epoch": 1})
    save_checkpoint(path, model, prep=SlicePrep(48), metrics={"epoch": 2})
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp files left
    assert load_checkpoint(path).metrics == {"epoch": 2}


def test_unsafe_values_are_refused_at_save_time(tmp_path, trained):
    model = trained[0]
    with pytest.raises(CheckpointError, match=r"config\['callback'\]"):
        save_checkpoint(tmp_path / "x.pt", model, prep=SlicePrep(48), config={"callback": object()})
    assert not (tmp_path / "x.pt").exists()
    converted = to_safe({"a": np.arange(3), "b": {2, 1}, "c": (np.float64(0.5),)})
    assert torch.equal(converted["a"], torch.arange(3)) and converted["b"] == [1, 2]
    assert converted["c"] == (0.5,) and type(converted["c"][0]) is float


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a payload that would run code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_code_running_pickle_is_refused_and_never_executed(tmp_path, trained):
    model, path = trained[:2]
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned.txt"
    payload["config"] = {"hook": _CreatesFile(marker)}
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        model_from_checkpoint(evil)
    assert not marker.exists()
    # The payload is live: plain unpickling (never done by the project) creates the file.
    live_marker = tmp_path / "live.txt"
    pickle.loads(pickle.dumps({"hook": _CreatesFile(live_marker)}))
    assert live_marker.exists()


def _tampered(path: Path, out: Path, change) -> Path:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, out)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["state_dict"].pop("head.layers.0.weight"), "missing 1"),
        (lambda p: p["state_dict"].update({"extra.weight": torch.zeros(2)}), "unexpected 1"),
        (lambda p: p["spec"].update({"hidden": [32]}), "mis-shaped"),
        (lambda p: p["spec"].update({"backbone": "mobilenet_v3_small"}), "does not fit"),
        (lambda p: p["state_dict"]["head.layers.0.weight"].view(-1)[3].fill_(float("nan")), "head.layers.0.weight"),
        (lambda p: p["state_dict"]["stn.regressor.0.bias"].fill_(float("inf")), "non-finite"),
        (lambda p: p.update({"format_version": 99}), "format_version 99"),
        (lambda p: p.update({"labels": list(reversed(LABELS))}), "labels"),
        (lambda p: p.pop("windows"), "lacks windows"),
    ],
)
def test_wrong_architecture_nan_and_foreign_checkpoints_are_refused(tmp_path, trained, change, message):
    path = trained[1]
    bad = _tampered(path, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(bad)


def test_files_that_are_not_checkpoints_are_refused(tmp_path, trained):
    model = trained[0]
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a hemorrhage_core checkpoint"):
        load_checkpoint(bare)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # A legacy-format pickle of another protocol: refused in words, without torch's developer warning.
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"\x80\x04not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="cannot read"):
            load_checkpoint(foreign)


def test_model2_from_a_stage1_checkpoint(trained):
    model, path = trained[:2]
    model1, _ = model_from_checkpoint(path)
    model2 = stage2_from_stage1(model1)
    x = torch.rand(1, 3, 48, 48)
    with torch.inference_mode():
        assert torch.equal(model.forward_features(x), model2.eval().forward_features(x))


def _rezip_deflated(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))


def test_crafted_sparse_tensors_are_refused(tmp_path):
    """Out-of-range sparse indices would let later arithmetic read out of bounds; torch >= 2.10 checks
    them under weights_only (test_dependencies pins that), and the refusal reaches the user in words."""
    crafted = torch.sparse_coo_tensor(torch.tensor([[0, 10**6]]), torch.ones(2), (2,), check_invariants=False)
    assert crafted.shape == (2,) and int(crafted._indices().max()) == 10**6  # built unchecked
    stored, deflated, legacy = tmp_path / "sparse.pt", tmp_path / "deflated.pt", tmp_path / "legacy.pt"
    torch.save({"state_dict": {"weight": crafted}}, stored)
    _rezip_deflated(stored, deflated)
    torch.save({"state_dict": {"weight": crafted}}, legacy, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that it validates sparse tensors: that is the point
        for path in (stored, deflated, legacy):
            with pytest.raises(CheckpointError, match="size is inconsistent with indices"):
                load_checkpoint(path)
            with pytest.raises(CheckpointError, match="size is inconsistent with indices"):
                safe_torch_load(path, what="weights file")
    # The same layouts with dense tensors load.
    dense = {"weight": torch.arange(6.0)}
    torch.save(dense, stored)
    _rezip_deflated(stored, deflated)
    torch.save(dense, legacy, _use_new_zipfile_serialization=False)
    for path in (stored, deflated, legacy):
        assert torch.equal(safe_torch_load(path)["weight"], dense["weight"])
