"""The TrainConfig command-line flags and ``--set KEY=VALUE`` parsing shared by train, grid-search
and pipeline."""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> TrainConfig field, for the named options (None = not given).
_FLAG_FIELDS = {
    "data": "data",
    "backbone": "backbone",
    "stage": "stage",
    "init_from": "init_from",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "image_size": "image_size",
    "input_size": "input_size",
    "weights": "weights",
    "subset": "subset",
    "val_fraction": "val_fraction",
    "runs_dir": "runs_dir",
    "seed": "seed",
    "workers": "num_workers",
    "threads": "threads",
    "metric": "metric",
    "device": "device",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig flags shared by train and grid-search."""
    parser.add_argument("--data", metavar="DIR", help="data set folder (stage_2_train/ + stage_2_train.csv)")
    parser.add_argument("--backbone", metavar="NAME", help="vgg16, vgg16_bn, inception_v3, resnet18, mobilenet_v3_small")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="1: multi-class, 2: multi-label (needs --init-from)")
    parser.add_argument("--epochs", type=int, metavar="N")
    parser.add_argument("--batch-size", type=int, metavar="N", help="default 10, as in the original report")
    parser.add_argument("--lr", type=float, metavar="X", help="learning rate of backbone and head")
    parser.add_argument("--image-size", type=int, metavar="PX", help="preprocessed slice size (cache)")
    parser.add_argument("--input-size", type=int, metavar="PX", help="backbone input size (STN output)")
    parser.add_argument("--weights", metavar="imagenet|none|PATH", help="backbone initialisation")
    parser.add_argument("--subset", type=float, metavar="FRACTION", help="train on this share of the patients")
    parser.add_argument("--val-fraction", type=float, metavar="F", help="share of patients held out (<= 0.5)")
    parser.add_argument("--runs-dir", metavar="DIR", help="where run directories go (default runs/)")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    parser.add_argument("--metric", choices=("auc_mean", "weighted_log_loss"), help="model-selection metric")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of TrainConfig fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any TrainConfig field, value parsed as YAML (repeatable), e.g. --set stn_lr_scale=0.05",
    )


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: yaml(v)}``."""
    import yaml

    from training.config import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: {value!r} is not a YAML value") from None
    return out


def config_from_args(args: argparse.Namespace, base=None):
    """TrainConfig from ``base`` (or defaults) < --config < flags < --set."""
    from training.config import TrainConfig

    config = base or TrainConfig()
    if getattr(args, "config", None):
        config = TrainConfig.from_yaml(args.config, base=config)
    flags = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items() if getattr(args, dest, None) is not None}
    if getattr(args, "no_progress", False):
        flags["progress"] = False
    config = TrainConfig.from_dict(flags, base=config)
    return TrainConfig.from_dict(parse_sets(getattr(args, "set", []) or []), base=config)
