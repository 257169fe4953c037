"""TrainConfig: YAML round trip, validation, presets and the command-line layering."""

from __future__ import annotations

import argparse

import pytest

from training.config import CONFIG_DIR, ConfigError, PipelinePreset, TrainConfig, preset_path
from training.train_cmd import add_arguments, config_from_args, parse_sets


def test_yaml_round_trip(tmp_path):
    config = TrainConfig(data="/d", backbone="inception_v3", lr=3e-4, class_weights=[1, 2, 2, 2, 2, 2], augment={"hflip_p": 0.0})
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert TrainConfig.from_yaml(path) == config


def test_yaml_number_text_is_accepted(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; a person writing it means a number.
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 0\n")
    config = TrainConfig.from_yaml(path)
    assert config.lr == pytest.approx(1e-4) and isinstance(config.weight_decay, float)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"stage": 3}, "stage"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"val_fraction": 0.7}, "val_fraction"),
        ({"schedule": "linear"}, "schedule"),
        ({"metric": "loss"}, "metric"),
        ({"class_weights": [1, 2]}, "class_weights"),
        ({"init_from": "runs/x"}, "init_from"),  # stage 1 has no parent
        ({"grad_clip": -1}, "grad_clip"),
        ({"lr": "fast"}, "lr"),
        ({"subset": 0.5, "subset_boost": [1, 3, 1, 1, 1]}, "subset_boost"),
        ({"subset": 0.5, "subset_boost": [1, 0.5, 1, 1, 1, 1]}, "subset_boost"),
        ({"subset_boost": [1, 3, 1, 1, 1, 1]}, "subset_boost"),  # no subset to boost
    ],
)
def test_invalid_values_are_refused_naming_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict(values)


def test_unknown_keys_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="learning_rate.*known:.*lr"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_non_mapping_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_yaml(path)


def test_replace_ignores_none_and_validates():
    config = TrainConfig()
    assert config.replace(lr=None, epochs=3).epochs == 3
    assert config.replace(lr=None).lr == config.lr
    with pytest.raises(ConfigError):
        config.replace(epochs=0)


@pytest.mark.parametrize("name", ["quick", "full"])
def test_presets_give_valid_configs_for_the_recipe(name):
    preset = PipelinePreset.load(name)
    s1 = preset.config("phase1", "stage1")
    s2 = preset.config("phase1", "stage2")
    p2 = preset.config("phase2", "stage1")
    assert s1.stage == 1 and s2.stage == 2 and p2.stage == 1
    assert s1.backbone.startswith("vgg16") and p2.backbone == "inception_v3"
    assert s1.subset < 1.0 and p2.subset == 1.0  # phase 1 on a patient subset, phase 2 on all data
    assert s1.batch_size == 10  # the seed's batch size


def test_quick_preset_needs_no_pretrained_weights():
    preset = PipelinePreset.load("quick")
    for phase in ("phase1", "phase2"):
        for stage in ("stage1", "stage2"):
            assert preset.config(phase, stage).weights == "none"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="quick"):
        preset_path("nope")
    assert preset_path("quick") == CONFIG_DIR / "quick.yaml"


def test_command_line_layers_over_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 7\nbatch_size: 12\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--config", str(path), "--epochs", "2", "--set", "stn_lr_scale=0.05"])
    config = config_from_args(args)
    assert (config.lr, config.epochs, config.batch_size, config.stn_lr_scale) == (0.01, 2, 12, 0.05)
    assert config.data == "d"


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["lr"])
    assert parse_sets(["augment={hflip_p: 0}", "freeze-bn=true"]) == {"augment": {"hflip_p": 0}, "freeze_bn": True}


def test_stn_takes_the_model_specs_kinds_and_reads_old_booleans():
    from hemorrhage_core.models.spec import STN_MODES
    from training.config import STN_MODES as CONFIG_STN_MODES

    assert CONFIG_STN_MODES == STN_MODES
    assert TrainConfig.from_dict({"stn": "affine"}).stn == "affine"
    assert TrainConfig.from_dict({"stn": False}).stn == "none"  # run.json and --set from before
    assert TrainConfig.from_dict({"stn": True}).stn == "similarity"
    with pytest.raises(ConfigError, match="stn"):
        TrainConfig.from_dict({"stn": "elastic"})


def test_the_head_crop_is_on_for_new_runs_and_part_of_the_runs_preprocessing():
    from training.trainer import slice_prep

    config = TrainConfig(image_size=96)
    assert config.head_crop is True
    prep = slice_prep(config)
    assert (prep.image_size, prep.head_crop, prep.windows.names) == (96, True, ("brain", "subdural", "bone"))
    assert slice_prep(config.replace(head_crop=False)).head_crop is False
