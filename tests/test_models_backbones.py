"""Backbone registry, weights (imagenet from a temporary TORCH_HOME, PATH, offline), freezing, Inception."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from hemorrhage_core.errors import CheckpointError, WeightsUnavailableError
from hemorrhage_core.models import BACKBONES, ModelSpec, build_model, get_backbone
from hemorrhage_core.models.backbones import IMAGENET_MEAN, IMAGENET_STD

# Smallest sizes that still run each backbone: the point here is building and gradients, not speed.
TINY_SIZE = {"inception_v3": 75}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_and_stage_builds_and_trains_without_weights(name, stage):
    torch.manual_seed(0)
    size = TINY_SIZE.get(name, get_backbone(name).min_size)
    model = build_model(ModelSpec(name, stage, input_size=size))
    model.train()
    out = model.forward_extras(torch.rand(2, 3, size + 8, size + 8))
    assert out.logits.shape == (2, 6) and bool(torch.isfinite(out.logits).all())
    assert out.theta.shape == (2, 2, 3) and out.aligned.shape == (2, 3, size, size)
    loss = out.logits.logsumexp(1).mean()
    if get_backbone(name).has_aux:
        assert out.aux_logits is not None and out.aux_logits.shape == (2, 6)
        loss = loss + 0.4 * out.aux_logits.logsumexp(1).mean()
    else:
        assert out.aux_logits is None
    loss.backward()
    groups = model.parameter_groups()
    for group in ("stn", "backbone", "head"):  # no weights -> everything trains
        assert all(p.requires_grad for p in groups[group])
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in groups[group]), group
    model.eval()
    assert model.forward_extras(torch.rand(1, 3, size, size)).aux_logits is None


def test_parameter_groups_partition_all_parameters():
    model = build_model(ModelSpec("inception_v3", 1, input_size=75))
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    aux_fc = {id(p) for p in model.aux_head.aux.fc.parameters()}
    assert aux_fc <= {id(p) for p in groups["head"]}


def test_unknown_backbone_fails_fast_with_the_known_names():
    with pytest.raises(ValueError, match="vgg16.*inception_v3.*resnet18.*mobilenet_v3_small"):
        ModelSpec("alexnet", 1)


def test_spec_defaults_and_minimum_sizes():
    assert ModelSpec("vgg16", 1).input_size == 224
    assert ModelSpec("inception_v3", 2).input_size == 299
    assert get_backbone("inception_v3").min_size == 75
    with pytest.raises(ValueError, match="at least 75"):
        ModelSpec("inception_v3", 1, input_size=74)


def _fake_imagenet_file(tmp_path, monkeypatch, name="mobilenet_v3_small"):
    """A generated torchvision state dict under the weights enum's file name in a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(123)
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    path = get_backbone(name).weights_file()
    assert path == tmp_path / "torch_home" / "hub" / "checkpoints" / path.name
    assert path.name == "mobilenet_v3_small-047dcff4.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    return path, reference


def test_imagenet_weights_load_from_torch_home_and_freeze_the_trunk(tmp_path, monkeypatch, caplog):
    path, reference = _fake_imagenet_file(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO):
        model = build_model(ModelSpec("mobilenet_v3_small", 1, input_size=64), weights="imagenet")
    assert str(path) in caplog.text
    trunk = model.backbone.body.state_dict()
    for key, value in trunk.items():  # body.N.* is torchvision's features.N.*
        assert torch.equal(value, reference[f"features.{key}"]), key
    assert len(trunk) == len([k for k in reference if k.startswith("features.")])
    groups = model.parameter_groups()
    assert not any(p.requires_grad for p in groups["backbone"])
    assert all(p.requires_grad for p in groups["stn"] + groups["head"])
    # Frozen trunk: train() keeps its batch norm in eval, so ImageNet statistics survive CT batches.
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.rand(4, 3, 64, 64))
    assert not model.backbone.training and model.head.training
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    # An explicit override wins.
    unfrozen = build_model(ModelSpec("mobilenet_v3_small", 1, input_size=64), weights="imagenet", freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameter_groups()["backbone"])


def test_path_weights_load_the_same_file(tmp_path, monkeypatch):
    path, reference = _fake_imagenet_file(tmp_path, monkeypatch)
    model = build_model(ModelSpec("mobilenet_v3_small", 2, input_size=64), weights=str(path))
    assert torch.equal(model.backbone.body[0][0].weight, reference["features.0.0.weight"])
    assert model.backbone_frozen


def test_offline_imagenet_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ModelSpec("resnet18", 1, input_size=32), weights="imagenet")
    message = str(info.value)
    assert str(expected) in message and "resnet18-f37072fd.pth" in message
    assert not expected.exists()  # nothing was downloaded


def test_missing_path_and_wrong_architecture_files_are_refused(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="neither"):
        build_model(ModelSpec("resnet18", 1, input_size=32), weights=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(ModelSpec("mobilenet_v3_small", 1, input_size=32), weights=str(wrong))


def test_inception_normalises_once_like_torchvision_with_transform_input(tmp_path):
    """torchvision feeds ImageNet weights ImageNet-normalised input and sets transform_input=True; the
    model here gets [0, 1] input, so its own normalisation must reproduce exactly that, once."""
    torch.manual_seed(5)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    # Calibrate batch norm on normalised images so the output depends on its input (an untrained
    # net with unit running statistics maps every image to nearly the same logits).
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative: one pass sets the statistics
    aux, reference.AuxLogits = reference.AuxLogits, None  # its fixed pooling needs 299 px; unused in eval
    with torch.no_grad():
        reference.train()(torch.randn(2, 3, 96, 96))
    reference.AuxLogits = aux
    path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), path)
    # 96 px instead of 299 keeps this cheap; normalisation does not depend on the size.
    model = build_model(ModelSpec("inception_v3", 1, input_size=96, stn="none"), weights=str(path)).eval()
    x = torch.rand(1, 3, 96, 96)
    imagenet_input = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ours = reference.fc(model.forward_features(x))
        reference.transform_input = True
        expected = reference.eval()(imagenet_input)
        reference.transform_input = False
        twice = reference(imagenet_input)  # what a missing transform would give
    scale = float(expected.abs().max())
    # Rounding differs ((x - 0.5) / 0.5 vs torchvision's two affine steps) and grows through 94 layers.
    torch.testing.assert_close(ours, expected, atol=1e-4 * scale, rtol=1e-3)
    assert float((twice - expected).abs().max()) > 0.05 * scale  # the comparison can tell the difference
