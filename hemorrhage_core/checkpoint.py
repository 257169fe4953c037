"""Self-describing checkpoints: saved with torch.save, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a plain dict (format ``FORMAT_VERSION``)::

    format_version  int
    spec            ModelSpec.to_dict()
    image_size      int, the loader / STN input size S
    windows         WindowStack.to_list()
    prep            SlicePrep.to_dict(): size, windows and head crop (absent before the crop: no crop)
    normalisation   {"mean": [3 floats], "std": [3 floats]}, applied inside the model
    labels          list(LABELS); stage1_classes: list(STAGE1_CLASSES)
    backbone_frozen bool, the trunk's freezing policy (restored on load, e.g. for resuming)
    config, metrics dicts of plain values
    state_dict      model weights (name -> tensor)
    train_state     None or a dict of plain values and tensors (optimizer, scheduler, epoch, RNG states)

Everything is converted to weights_only-safe types on save (numpy -> Python/tensors, Path -> str,
Namespace/dataclass -> dict), and the file is written atomically (temp file in the same folder,
fsync, os.replace), so a crash never leaves half a checkpoint under the final name.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from hemorrhage_core.errors import CheckpointError
from hemorrhage_core.fileio import atomic_file
from hemorrhage_core.labels import LABELS, STAGE1_CLASSES
from hemorrhage_core.models.net import IN_CHANNELS, HemorrhageNet, build_empty
from hemorrhage_core.models.spec import ModelSpec
from hemorrhage_core.models.weights import as_state_dict, check_compatible, safe_torch_load
from hemorrhage_core.preprocess import SlicePrep
from hemorrhage_core.windowing import WindowStack

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version", "spec", "image_size", "windows", "normalisation", "labels", "stage1_classes",
    "config", "metrics", "state_dict",
)


@dataclass
class Checkpoint:
    """A loaded checkpoint with its fields parsed (spec -> ModelSpec, windows -> WindowStack, prep ->
    SlicePrep, the preprocessing its model was trained with)."""

    format_version: int
    spec: ModelSpec
    image_size: int
    windows: WindowStack
    normalisation: dict[str, list[float]]
    labels: list[str]
    stage1_classes: list[str]
    config: dict[str, Any]
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    train_state: dict[str, Any] | None = field(default=None, repr=False)
    backbone_frozen: bool = False
    path: str | None = None
    prep: SlicePrep | None = None

    def __post_init__(self) -> None:
        if self.prep is None:
            self.prep = SlicePrep(self.image_size, self.windows)

    def meta(self) -> dict[str, Any]:
        """The descriptive part (no weights, no train state) as plain data: for run records and the UI."""
        return {
            "format_version": self.format_version,
            "spec": self.spec.to_dict(),
            "image_size": self.image_size,
            "windows": self.windows.to_list(),
            "prep": self.prep.to_dict(),
            "normalisation": self.normalisation,
            "labels": list(self.labels),
            "stage1_classes": list(self.stage1_classes),
            "backbone_frozen": self.backbone_frozen,
            "config": self.config,
            "metrics": self.metrics,
        }


def to_safe(value: Any, where: str = "value") -> Any:
    """Convert ``value`` to types ``torch.load(weights_only=True)`` accepts, or refuse naming the key.

    numpy scalars -> Python numbers, numpy arrays -> tensors, Path -> str, Namespace / dataclass /
    mapping -> dict, set -> sorted list, Enum -> its value; tensors are detached and moved to CPU.
    """
    # Exact types: subclasses (np.float64 is a float, a StrEnum a str) pickle as their own class.
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return to_safe(value.value, where)
    for base in (bool, int, float, str, bytes):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, torch.dtype | torch.Size):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, argparse.Namespace):
        # argparse results carry the command's function (``_run``): behaviour, not data.
        value = {k: v for k, v in vars(value).items() if not k.startswith("_") and not callable(v)}
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = k if isinstance(k, str | int) else str(to_safe(k, where))
            out[key] = to_safe(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [to_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, set | frozenset):
        return sorted(to_safe(v, where) for v in value)
    raise CheckpointError(
        f"cannot store {where} of type {type(value).__name__} in a checkpoint: only plain values, "
        f"tensors and containers of them load with weights_only=True; convert it first"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: HemorrhageNet,
    *,
    prep: SlicePrep,
    config: Mapping[str, Any] | Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``, the preprocessing ``prep`` it takes and its description to ``path`` atomically."""
    if prep.channels != IN_CHANNELS:
        raise CheckpointError(f"the model takes {IN_CHANNELS} channels, the window stack has {prep.channels}")
    if prep.context != model.spec.context:
        raise CheckpointError(f"the model stacks {model.spec.context} neighbours a side, the preprocessing {prep.context}")
    payload = {
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "image_size": prep.image_size,  # image_size and windows: also inside prep, kept for older readers
        "windows": prep.windows.to_list(),
        "prep": prep.to_dict(),
        "normalisation": model.normalise.as_dict(),
        "labels": list(LABELS),
        "stage1_classes": list(STAGE1_CLASSES),
        "backbone_frozen": bool(model.backbone_frozen),
        "config": to_safe(config or {}, "config"),
        "metrics": to_safe(metrics or {}, "metrics"),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "train_state": None if train_state is None else to_safe(train_state, "train_state"),
    }
    return _atomic_save(payload, Path(path))


def _atomic_save(payload: dict, path: Path) -> Path:
    with atomic_file(path) as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint; refuse with CheckpointError (unsafe pickle, unknown format,
    missing fields, other labels, wrong architecture, NaN/Inf weights)."""
    source = f"checkpoint {os.fspath(path)!r}"
    if not Path(path).is_file():
        raise CheckpointError(f"{source} does not exist")
    raw = safe_torch_load(path, what="checkpoint")
    if not isinstance(raw, Mapping) or "format_version" not in raw:
        raise CheckpointError(f"{source} is not a hemorrhage_core checkpoint (no format_version); a bare state dict?")
    version = raw["format_version"]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {version!r}; this version reads 1..{FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}")
    try:
        spec = ModelSpec.from_dict(raw["spec"])
        windows = WindowStack.from_list(raw["windows"])
        normalisation = {k: [float(v) for v in raw["normalisation"][k]] for k in ("mean", "std")}
        image_size = int(raw["image_size"])
        prep = SlicePrep.from_dict(raw["prep"]) if raw.get("prep") is not None else SlicePrep(image_size, windows)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source} has a malformed description: {exc}") from None
    if list(raw["labels"]) != list(LABELS) or list(raw["stage1_classes"]) != list(STAGE1_CLASSES):
        raise CheckpointError(
            f"{source} was trained for labels {list(raw['labels'])}, this code uses {list(LABELS)}"
        )
    channels = IN_CHANNELS * spec.slices
    if windows.channels != IN_CHANNELS or any(len(normalisation[k]) != channels for k in normalisation):
        raise CheckpointError(f"{source}: the model takes {channels} channels ({spec.slices} slices of {IN_CHANNELS})")
    if prep.context != spec.context:
        raise CheckpointError(f"{source}: its model stacks {spec.context} neighbours a side, its preprocessing {prep.context}")
    if image_size < 1:
        raise CheckpointError(f"{source}: image_size must be positive, got {image_size}")
    if prep.image_size != image_size or prep.windows.key() != windows.key():
        raise CheckpointError(f"{source}: its preprocessing ({prep.key()}) contradicts image_size and windows")
    state = as_state_dict(raw["state_dict"], source=source)
    train_state = raw.get("train_state")
    for key in ("config", "metrics", "train_state"):
        if raw.get(key) is not None and not isinstance(raw[key], Mapping):
            raise CheckpointError(f"{source}: {key} must be a dict, got {type(raw[key]).__name__}")
    ckpt = Checkpoint(
        format_version=version, spec=spec, image_size=image_size, windows=windows,
        normalisation=normalisation, labels=list(raw["labels"]), stage1_classes=list(raw["stage1_classes"]),
        config=dict(raw["config"] or {}), metrics=dict(raw["metrics"] or {}), state_dict=state,
        train_state=None if train_state is None else dict(train_state),
        backbone_frozen=bool(raw.get("backbone_frozen", False)), path=os.fspath(path), prep=prep,
    )
    # Check the architecture now, so a bad file fails here and not later in model_from_checkpoint.
    check_compatible(build_empty(spec).state_dict(), state, source=source)
    return ckpt


def model_from_checkpoint(source: str | os.PathLike | Checkpoint) -> tuple[HemorrhageNet, Checkpoint]:
    """(model in eval mode on CPU with the checkpoint's weights, normalisation and freezing, Checkpoint)."""
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    model = build_empty(ckpt.spec)
    where = f"checkpoint {ckpt.path!r}" if ckpt.path else "checkpoint"
    check_compatible(model.state_dict(), ckpt.state_dict, source=where)
    # Clones: the model must not share storage with the Checkpoint object (its state_dict stays data).
    model.load_state_dict({k: v.clone() for k, v in ckpt.state_dict.items()}, strict=True, assign=True)
    model.normalise.set(ckpt.normalisation["mean"], ckpt.normalisation["std"])
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # a buffer the state dict does not carry: a bug here, not the user's file
        raise CheckpointError(f"{where}: tensors not restored: {leftovers[:4]}")
    model.set_backbone_frozen(ckpt.backbone_frozen)
    model.eval()
    return model, ckpt
