"""The GPU presets: ``full`` keeps the original report's batch of 10, ``full-h100`` is the same recipe at a
batch that feeds a modern GPU with the learning rate of the stated square-root rule; ``train --config``
refuses a pipeline preset by naming the command that runs it; predict and evaluate take the GPU when
there is one."""

from __future__ import annotations

import math

import pytest
import torch

from training import cli
from training.config import CONFIG_DIR, PHASES, STAGES, PipelinePreset

# full-h100 differs from full in these fields only.
BATCH_FIELDS = {"batch_size", "lr"}


def test_full_keeps_the_reports_batch_and_full_h100_scales_the_learning_rate_by_the_square_root_rule():
    full, h100 = PipelinePreset.load("full"), PipelinePreset.load("full-h100")
    for phase in PHASES:
        for stage in STAGES:
            a, b = full.config(phase, stage).to_dict(), h100.config(phase, stage).to_dict()
            assert {k for k in a if a[k] != b[k]} == BATCH_FIELDS, (phase, stage)
            assert a["batch_size"] == 10  # fidelity to the original report
            assert b["batch_size"] >= 64  # enough images per launch to keep a GPU busy
            # lr = 1e-4 x sqrt(batch / 10), to the two digits the preset writes
            assert b["lr"] == pytest.approx(a["lr"] * math.sqrt(b["batch_size"] / a["batch_size"]), rel=0.01)


def test_train_refuses_a_pipeline_preset_as_config_and_names_the_pipeline_command(tmp_path, capsys):
    code = cli.main(["train", "--data", str(tmp_path), "--config", str(CONFIG_DIR / "full.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pipeline preset" in err and "python -m training pipeline --data DIR --preset full" in err
    assert "unknown config key" not in err


@pytest.mark.parametrize("available, requested, expected", [
    (True, "auto", "cuda"), (False, "auto", "cpu"), (True, "cpu", "cpu"), (True, "cuda", "cuda"),
])
def test_predict_and_evaluate_take_the_gpu_when_there_is_one(monkeypatch, available, requested, expected):
    from training.prediction import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device(requested) == expected


def test_load_run_predictor_puts_the_model_on_the_resolved_device(monkeypatch, tmp_path):
    from hemorrhage_core import inference, runs
    from training import prediction

    class Record:
        path = tmp_path
        model_path = tmp_path / "best.pt"
        info = {}

    Record.model_path.write_bytes(b"")
    seen = {}
    monkeypatch.setattr(runs, "read_run", lambda run_dir: Record())
    monkeypatch.setattr(inference.Predictor, "from_checkpoint",
                        classmethod(lambda cls, path, **kwargs: seen.update(kwargs) or "predictor"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    prediction.load_run_predictor(str(tmp_path), calibrated=False)
    assert seen["device"] == "cuda"


def test_cuda_asked_for_without_a_gpu_is_refused(monkeypatch):
    from training.prediction import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
