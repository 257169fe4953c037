"""Progressive resizing: stage 2 fine-tunes at ``fine_size`` instead of its stage-1 model's input size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hemorrhage_core.checkpoint import load_checkpoint
from hemorrhage_core.models import ModelSpec, build_model, stage2_from_stage1
from hemorrhage_core.models.stn import identity_theta
from tests.train_fixtures import tiny_config, write_tiny_set
from training.config import ConfigError, TrainConfig


def test_config_refuses_fine_size_outside_stage2_or_too_small():
    with pytest.raises(ConfigError, match="fine_size.*stage 2 only"):
        TrainConfig(stage=1, fine_size=64)
    with pytest.raises(ConfigError, match="fine_size.*>= 32"):
        TrainConfig(stage=2, fine_size=16)
    assert TrainConfig(stage=2, fine_size=64).fine_size == 64


def test_model2_at_another_size_keeps_every_transferred_weight():
    torch.manual_seed(0)
    model1 = build_model(ModelSpec("resnet18", 1, input_size=32, hidden=(16,)))
    model2 = stage2_from_stage1(model1, input_size=48)
    assert model2.spec.input_size == 48 and model2.stn.output_size == 48
    for part in ("stn", "backbone"):
        for (k1, v1), (k2, v2) in zip(
            getattr(model1, part).state_dict().items(), getattr(model2, part).state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2), k1
    model2.eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.inference_mode():
        aligned, theta = model2.stn(x)
        assert aligned.shape == (2, 3, 48, 48)
        # The freshly built STN is the identity, so at its own size it passes the slice through.
        assert torch.allclose(theta, identity_theta(2), atol=1e-6)
        assert torch.allclose(aligned, x, atol=1e-5)
        assert model2(x).shape == (2, 6)
    # The stage-1 model at its own size still sees a shrunk copy of the same slice.
    with torch.inference_mode():
        small, _ = model1.eval().stn(x)
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(small, expected, atol=1e-5)


def test_stage2_run_fine_tunes_and_records_the_larger_size(tmp_path):
    from training.trainer import adopt_parent, fit

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=6, slices_per_patient=4)
    stage1 = fit(tiny_config(data, tmp_path / "runs", image_size=40, input_size=32))
    config = tiny_config(data, tmp_path / "runs", stage=2, init_from=str(stage1), fine_size=48)
    adopted = adopt_parent(config)
    # The cached slice grows with the input (40 * 48 / 32), so the STN keeps its margin.
    assert (adopted.input_size, adopted.image_size) == (48, 60)
    stage2 = fit(config)
    ckpt = load_checkpoint(next(stage2.glob("checkpoints/best*.pt")))
    assert ckpt.spec.input_size == 48 and ckpt.image_size == 60 and ckpt.prep.image_size == 60
    assert ckpt.config["fine_size"] == 48 and ckpt.config["input_size"] == 48
    parent = load_checkpoint(next(stage1.glob("checkpoints/best*.pt")))
    assert parent.spec.input_size == 32 and parent.image_size == 40
    # fine_size equal to the stage-1 size changes nothing.
    same = adopt_parent(tiny_config(data, tmp_path / "runs", stage=2, init_from=str(stage1), fine_size=32))
    assert (same.input_size, same.image_size) == (32, 40)
