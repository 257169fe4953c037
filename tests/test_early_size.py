"""Progressive resizing within a run: the first ``early_epochs`` train at ``early_input_size`` px."""
from __future__ import annotations

import pytest
import torch

from hemorrhage_core.checkpoint import load_checkpoint, model_from_checkpoint
from tests.train_fixtures import tiny_config, write_tiny_set
from training.config import ConfigError, TrainConfig


def test_config_refuses_early_sizes_that_cannot_work():
    with pytest.raises(ConfigError, match="early_epochs.*at least one of the run's 3 epochs"):
        TrainConfig(epochs=3, early_input_size=64, early_epochs=3)
    with pytest.raises(ConfigError, match="early_epochs.*needs early_input_size"):
        TrainConfig(epochs=3, early_epochs=1)
    with pytest.raises(ConfigError, match="early_input_size.*smaller than input_size"):
        TrainConfig(epochs=3, input_size=96, early_input_size=96, early_epochs=1)
    with pytest.raises(ConfigError, match="early_input_size.*>= 32"):
        TrainConfig(epochs=3, early_input_size=16, early_epochs=1)
    for bad in (True, -1, 1.5):
        with pytest.raises(ConfigError, match="early_epochs"):
            TrainConfig(epochs=3, early_input_size=64, early_epochs=bad)
    config = TrainConfig(epochs=3, input_size=128, early_input_size=96, early_epochs=2)
    assert (config.early_input_size, config.early_epochs) == (96, 2)
    assert TrainConfig().early_input_size is None and TrainConfig().early_epochs == 0


def test_loop_trains_early_epochs_small_and_refuses_sizes_the_backbone_cannot_take(tmp_path):
    from training.trainer import Loop, build_network, make_dataset, prepare_data, setup_runtime

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=4, slices_per_patient=2)

    def loop_of(**overrides) -> Loop:
        config = tiny_config(data, tmp_path / "runs", **{"epochs": 4, "input_size": 48, "image_size": 48, **overrides})
        runtime = setup_runtime(config)
        bundle = prepare_data(config, runtime.env)
        train_set = make_dataset(config, bundle.train, bundle.data_dir, bundle.cache, stage=1, train=True,
                                 prep=bundle.prep)
        return Loop(config, build_network(config), train_set, runtime)

    loop = loop_of(early_input_size=32, early_epochs=2)
    assert [loop.input_size_at(epoch) for epoch in (1, 2, 3, 4)] == [32, 32, 48, 48]
    assert [loop_of().input_size_at(epoch) for epoch in (1, 4)] == [48, 48]
    # Without input_size the network takes its backbone's default (resnet18: 224 px), which only the
    # Loop knows; the early size must stay below it (and above the backbone's minimum, inception_v3 75).
    with pytest.raises(ConfigError, match="early_input_size 224 px: resnet18 here needs 32 to 223 px"):
        loop_of(input_size=None, early_input_size=224, early_epochs=1)


def test_run_trains_early_epochs_at_the_small_size_and_validates_and_saves_at_the_full_size(tmp_path, monkeypatch):
    import training.trainer as trainer

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=6, slices_per_patient=4)
    seen: list[tuple[bool, int]] = []  # (training, backbone input px) of every forward
    built = trainer.build_network

    def watched(config):
        net = built(config)
        net.backbone.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-1])))
        return net

    monkeypatch.setattr(trainer, "build_network", watched)
    config = tiny_config(data, tmp_path / "runs", epochs=3, image_size=48, input_size=48, early_input_size=32,
                         early_epochs=2, gallery_size=0)
    run = trainer.fit(config)

    training = [size for is_training, size in seen if is_training]
    evaluating = {size for is_training, size in seen if not is_training}
    steps = len(training) // 3
    assert steps >= 1 and len(training) == 3 * steps
    assert training == [32] * (2 * steps) + [48] * steps  # epochs 1-2 small, epoch 3 at the full size
    assert evaluating == {48}  # every validation at the model's own size
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.spec.input_size == 48 and ckpt.config["early_input_size"] == 32
    net, _ = model_from_checkpoint(ckpt)
    assert net.stn.output_size == 48
    assert net.eval()(torch.rand(1, 3, 48, 48)).shape == (1, 6)
    log = (run / "train.log").read_text()
    assert "epochs 1-2 train at 32 px, the rest and every validation at 48 px" in log
