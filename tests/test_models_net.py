"""Model1/Model2: probabilities, label scores, spec round trip, Model2 from Model1."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hemorrhage_core.labels import LABELS
from hemorrhage_core.models import (
    DEFAULT_HIDDEN,
    Model1,
    Model2,
    ModelSpec,
    build_model,
    label_scores,
    probabilities,
    stage2_from_stage1,
)


def test_stage1_probabilities_map_classes_to_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0, 1.0], [-3.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    p = torch.softmax(logits, dim=1)
    out = probabilities(1, logits)
    assert out.shape == (2, len(LABELS))
    torch.testing.assert_close(out[:, :5], p[:, 1:])  # subtype = its class
    torch.testing.assert_close(out[:, 5], 1.0 - p[:, 0])  # any = not none
    assert bool(((out >= 0) & (out <= 1)).all())


def test_stage2_probabilities_are_sigmoids():
    logits = torch.randn(3, 6) * 4
    torch.testing.assert_close(probabilities(2, logits), torch.sigmoid(logits))


@pytest.mark.parametrize("stage", [1, 2])
def test_label_scores_are_monotone_in_probabilities(stage):
    logits = torch.randn(5, 6) * 3
    scores, p = label_scores(stage, logits), probabilities(stage, logits)
    if stage == 1:
        torch.testing.assert_close(scores.exp(), p, atol=1e-6, rtol=1e-5)  # log p
    else:
        torch.testing.assert_close(torch.sigmoid(scores), p)


def test_spec_round_trip_is_json_safe_and_resolved():
    spec = ModelSpec("resnet18", 2, stn="affine", dropout=0.1)
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["input_size"] == 224 and data["hidden"] == list(DEFAULT_HIDDEN[2])
    assert ModelSpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="unknown model spec keys"):
        ModelSpec.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="stage"):
        ModelSpec("resnet18", 3)
    with pytest.raises(ValueError, match="STN"):
        ModelSpec("resnet18", 1, stn="elastic")


def test_model_classes_follow_the_stage():
    assert type(build_model(ModelSpec("resnet18", 1, input_size=32))) is Model1
    model2 = build_model(ModelSpec("resnet18", 2, input_size=32))
    assert type(model2) is Model2
    assert len([m for m in model2.head.layers if isinstance(m, torch.nn.Linear)]) == 3  # 3 added layers


def test_model2_from_model1_transfers_the_trunk_and_first_layer():
    torch.manual_seed(0)
    model1 = build_model(ModelSpec("resnet18", 1, input_size=48, hidden=(32,)))
    with torch.no_grad():  # make the STN non-identity so its weights matter
        model1.stn.regressor[-1].bias.add_(0.1)
    model2 = stage2_from_stage1(model1)
    assert isinstance(model2, Model2) and model2.spec.hidden == (32,) + DEFAULT_HIDDEN[2][1:]
    for part in ("stn", "backbone"):
        for (k1, v1), (k2, v2) in zip(
            getattr(model1, part).state_dict().items(), getattr(model2, part).state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2), k1
    for (k1, v1), (_, v2) in zip(model1.head.shared.state_dict().items(), model2.head.shared.state_dict().items(),
                                 strict=True):
        assert torch.equal(v1, v2), k1
    model1.eval()
    model2.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        f1, f2 = model1.forward_features(x), model2.forward_features(x)
        assert torch.equal(f1, f2)
        assert torch.equal(model1.head.shared(f1), model2.head.shared(f2))
        assert model2(x).shape == (2, 6)


def test_model2_hidden_must_keep_model1s_first_layer():
    model1 = build_model(ModelSpec("mobilenet_v3_small", 1, input_size=32, hidden=(16,)))
    with pytest.raises(ValueError, match="first added layer"):
        stage2_from_stage1(model1, hidden=(8, 8))
    model2 = build_model(ModelSpec("mobilenet_v3_small", 2, input_size=32))
    with pytest.raises(ValueError, match="stage-1"):
        stage2_from_stage1(model2)
    with pytest.raises(TypeError, match="built Model1"):
        stage2_from_stage1("runs/x/checkpoints/best.pt")  # a path: the caller loads the checkpoint


def test_models_never_import_checkpoint():
    # checkpoint imports models; the other way round would be a cycle, even as a lazy import in a function.
    models_dir = Path(__file__).resolve().parent.parent / "hemorrhage_core" / "models"
    for path in sorted(models_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("hemorrhage_core.checkpoint") for n in names), path.name
    modules = ", ".join(f"hemorrhage_core.models.{p.stem}" for p in sorted(models_dir.glob("[!_]*.py")))
    code = f"import sys, {modules}; assert 'hemorrhage_core.checkpoint' not in sys.modules, 'models imported checkpoint'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
