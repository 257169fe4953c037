"""Backbone registry: one front door over torchvision builders and their weights enums.

Each entry knows its default and minimum input size, the size of its pooled features, the input
normalisation its weights expect and how to strip the ImageNet classifier. Weights never download:
``imagenet`` reads torchvision's own cache file (``$TORCH_HOME/hub/checkpoints/<file>``) or fails at
once naming that file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hemorrhage_core.errors import CheckpointError, WeightsUnavailableError
from hemorrhage_core.models.weights import (
    as_state_dict,
    check_compatible,
    hub_checkpoint_path,
    safe_torch_load,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception_v3's ImageNet weights (ported from TensorFlow) expect (x - 0.5) / 0.5. torchvision gets
# there with ImageNet normalisation + transform_input=True; the trunk here calls the layers directly
# (transform_input never runs) and normalises with these values instead: the same input, once.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# InceptionAux pools 5x5/3 then convolves 5x5: it needs a Mixed_6e map of at least 17x17 (299 px in).
INCEPTION_AUX_MIN_MAP = 17

WEIGHT_CHOICES_HELP = "imagenet | none | PATH to a torchvision state dict of the same architecture"


class Trunk(nn.Module):
    """A backbone without its classifier: normalised image (N, 3, s, s) -> feature map (N, F, h, w).

    ``aux_tap`` is the index in ``body`` whose output feeds an auxiliary classifier (Inception_v3).
    """

    def __init__(self, body: nn.Sequential, aux_tap: int | None = None) -> None:
        super().__init__()
        self.body = body
        self.aux_tap = aux_tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_tapped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feature map and the aux-tap activation (None without a tap)."""
        if self.aux_tap is None:
            return self.body(x), None
        tapped = None
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i == self.aux_tap:
                tapped = x
        return x, tapped


class AuxHead(nn.Module):
    """torchvision's InceptionAux with a new output layer, usable below 299 px.

    Below 299 px the Mixed_6e map is smaller than the 17x17 InceptionAux's fixed pooling needs; it is
    resized up to 17x17 so training at the quick recipe's sizes still gets the auxiliary loss, with the
    pretrained aux convolutions unchanged.
    """

    def __init__(self, aux: nn.Module, out_features: int) -> None:
        super().__init__()
        self.aux = aux
        self.aux.fc = nn.Linear(self.aux.fc.in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < INCEPTION_AUX_MIN_MAP:
            size = (max(x.shape[-2], INCEPTION_AUX_MIN_MAP), max(x.shape[-1], INCEPTION_AUX_MIN_MAP))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.aux(x)


@dataclass(frozen=True)
class BackboneInfo:
    """What the model needs to know about one torchvision architecture."""

    name: str
    default_size: int
    min_size: int
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_aux: bool
    build_torchvision: Callable[[bool], nn.Module]  # init -> torchvision model (1000 classes)
    strip: Callable[[nn.Module], tuple[Trunk, nn.Module | None]]  # torchvision model -> trunk, aux

    @property
    def weights_enum(self):
        """torchvision's weights enum member used for ``imagenet`` (its DEFAULT)."""
        from torchvision.models import get_model_weights

        return get_model_weights(self.name).DEFAULT

    def weights_file(self) -> Path:
        """The file ``imagenet`` reads: torchvision's download cache path for the enum's URL."""
        return hub_checkpoint_path(self.weights_enum.url)


def _vgg(batch_norm: bool) -> Callable[[bool], nn.Module]:
    def build(init: bool) -> nn.Module:
        from torchvision.models.vgg import VGG, cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=batch_norm)
        # The 25088x4096 classifier is never used: building it on the meta device skips 120 M
        # parameter initialisations (2 s) while torchvision's own init still runs on the features.
        with torch.device("meta"):
            return VGG(features, init_weights=init)

    return build


def _strip_vgg(model: nn.Module) -> tuple[Trunk, None]:
    return Trunk(nn.Sequential(*model.features)), None


def _strip_resnet(model: nn.Module) -> tuple[Trunk, None]:
    layers = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]
    return Trunk(nn.Sequential(*layers)), None


def _strip_mobilenet(model: nn.Module) -> tuple[Trunk, None]:
    return Trunk(nn.Sequential(*model.features)), None


_INCEPTION_LAYERS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)  # torchvision Inception3._forward's order, up to the pooling


def _strip_inception(model: nn.Module) -> tuple[Trunk, nn.Module]:
    body = nn.Sequential(*(getattr(model, name) for name in _INCEPTION_LAYERS))
    return Trunk(body, aux_tap=_INCEPTION_LAYERS.index("Mixed_6e")), model.AuxLogits


def _builder(name: str, **kwargs) -> Callable[[bool], nn.Module]:
    def build(init: bool) -> nn.Module:
        import torchvision.models as tvm

        extra = dict(kwargs)
        if name == "inception_v3":
            extra["init_weights"] = init
        return getattr(tvm, name)(weights=None, **extra)

    return build


BACKBONES: Mapping[str, BackboneInfo] = {
    info.name: info
    for info in (
        BackboneInfo("vgg16", 224, 32, 512, IMAGENET_MEAN, IMAGENET_STD, False, _vgg(False), _strip_vgg),
        BackboneInfo("vgg16_bn", 224, 32, 512, IMAGENET_MEAN, IMAGENET_STD, False, _vgg(True), _strip_vgg),
        # 75 px is torchvision's documented minimum: Mixed_7c is 1x1 there.
        BackboneInfo(
            "inception_v3", 299, 75, 2048, INCEPTION_MEAN, INCEPTION_STD, True,
            _builder("inception_v3", aux_logits=True, transform_input=False), _strip_inception,
        ),
        BackboneInfo("resnet18", 224, 32, 512, IMAGENET_MEAN, IMAGENET_STD, False, _builder("resnet18"), _strip_resnet),
        BackboneInfo(
            "mobilenet_v3_small", 224, 32, 576, IMAGENET_MEAN, IMAGENET_STD, False,
            _builder("mobilenet_v3_small"), _strip_mobilenet,
        ),
    )
}


def get_backbone(name: str) -> BackboneInfo:
    """Registry lookup; an unknown name fails at once with the list of known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def backbone_names() -> tuple[str, ...]:
    return tuple(BACKBONES)


def resolve_weights_file(info: BackboneInfo, weights: str | os.PathLike) -> Path | None:
    """The file a ``weights`` choice reads (None for ``none``); refuses at once when it is absent."""
    choice = os.fspath(weights)
    if choice == "none":
        return None
    if choice == "imagenet":
        path = info.weights_file()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"ImageNet weights for {info.name} are not on this machine (nothing is downloaded). "
                f"Expected file: {path}. On a machine with network, download {info.weights_enum.url} "
                f"and copy it to {path} (the cache is $TORCH_HOME/hub/checkpoints, TORCH_HOME "
                f"defaults to ~/.cache/torch), or use --weights none."
            )
        return path
    path = Path(choice).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights {choice!r} is neither 'imagenet', 'none' nor an existing file; choose {WEIGHT_CHOICES_HELP}"
        )
    return path


def widen_input(trunk: Trunk, slices: int) -> None:
    """Let ``trunk`` take ``slices`` stacked 3-channel slices (2.5D input): its first convolution gets
    3 ``slices`` input channels; the centre slice keeps the original kernel and the neighbours' kernels
    start at zero.

    So the widened trunk starts as its 2D self (a pretrained one keeps exactly what it learnt) and
    learns from the data how much to read from the neighbours, instead of starting from their average,
    where a bleed on the slice next door would look like one on this slice.
    """
    if slices == 1:
        return
    name, first = next((n, m) for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d))
    wide = nn.Conv2d(
        first.in_channels * slices, first.out_channels, first.kernel_size, stride=first.stride,
        padding=first.padding, dilation=first.dilation, groups=first.groups, bias=first.bias is not None,
        device=first.weight.device, dtype=first.weight.dtype,
    )
    centre = (slices // 2) * first.in_channels
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, centre : centre + first.in_channels] = first.weight
        if first.bias is not None:
            wide.bias.copy_(first.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, wide)


def build_trunk(
    info: BackboneInfo, weights: str | os.PathLike = "none", *, init: bool = True
) -> tuple[Trunk, nn.Module | None]:
    """Trunk (and Inception's raw aux classifier) with the chosen weights.

    With weights, the whole torchvision model is built on the meta device and the file is loaded into
    it strictly (``assign=True`` materialises it), so a file for another architecture is refused and
    nothing is initialised twice. ``init=False`` leaves an untrained trunk uninitialised (checkpoint
    loading overwrites everything).
    """
    path = resolve_weights_file(info, weights)
    if path is None:
        return info.strip(info.build_torchvision(init))
    log.info("loading %s backbone weights from %s", info.name, path)
    state = as_state_dict(safe_torch_load(path, what="backbone weights"), source=str(path))
    with torch.device("meta"):
        model = info.build_torchvision(False)
    check_compatible(model.state_dict(), state, source=f"weights file {path}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape/key problems are caught above; this is a last guard
        raise CheckpointError(f"weights file {path} does not fit {info.name}: {exc}") from None
    return info.strip(model)
