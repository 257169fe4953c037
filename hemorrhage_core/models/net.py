"""Model1 (stage 1, multi-class softmax) and Model2 (stage 2, multi-label sigmoid).

Both are STN -> normalisation -> backbone trunk -> global average pool -> head, with timm's
``forward_features`` / ``forward_head`` seams so Model2 can take Model1's trunk.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hemorrhage_core.labels import LABELS, STAGE1_CLASSES
from hemorrhage_core.models.backbones import AuxHead, Trunk, build_trunk, get_backbone, widen_input
from hemorrhage_core.models.heads import Head
from hemorrhage_core.models.spec import DEFAULT_HIDDEN, ModelSpec
from hemorrhage_core.models.stn import SpatialTransformer
from hemorrhage_core.preprocess import centre_channels

IN_CHANNELS = 3  # channels of one slice: the three windows of the stack (ImageNet trunks take three)
N_OUTPUTS = len(LABELS)
assert len(STAGE1_CLASSES) == N_OUTPUTS  # both stages have six outputs; the mapping is in probabilities()


class ModelOutput(NamedTuple):
    """Everything one forward pass yields: logits (N, 6), Inception's aux logits in train mode (or
    None), theta (N, 2, 3) and the STN-aligned image (N, 3, s, s) in [0, 1] (of a 2.5D stack, its
    centre slice: what a person looks at)."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None
    theta: torch.Tensor
    aligned: torch.Tensor


class Normalise(nn.Module):
    """(x - mean) / std per channel. Non-persistent buffers: the checkpoint records them as data."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def set(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> None:
        """Replace the statistics (also materialises buffers of a model built on the meta device)."""
        device = self.std.device if self.std.device.type != "meta" else torch.device("cpu")
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean.flatten()], "std": [float(v) for v in self.std.flatten()]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HemorrhageNet(nn.Module):
    """Input (N, 3 (2k + 1), S, S) float in [0, 1] at any S >= 1, k = ``spec.context`` (2.5D: the
    slice and k neighbours on each side, lowest z first); output logits (N, 6). One STN transform
    aligns the whole stack, so the neighbours stay registered to the slice.

    Stage 1 logits are over ``STAGE1_CLASSES``, stage 2 over ``LABELS``; ``probabilities`` maps both
    to ``LABELS``. With a frozen backbone, ``train()`` keeps the trunk's batch-norm layers in eval mode
    so their ImageNet statistics are not overwritten by small CT batches.
    """

    stage: int = 0

    def __init__(self, spec: ModelSpec, trunk: Trunk, aux: nn.Module | None) -> None:
        super().__init__()
        if spec.stage != self.stage:
            raise ValueError(f"{type(self).__name__} is stage {self.stage}, the spec says stage {spec.stage}")
        info = get_backbone(spec.backbone)
        self.spec = spec
        self.in_channels = IN_CHANNELS * spec.slices
        self.stn = SpatialTransformer(spec.stn, spec.input_size or info.default_size, self.in_channels)
        self.normalise = Normalise(info.mean * spec.slices, info.std * spec.slices)
        widen_input(trunk, spec.slices)
        self.backbone = trunk
        self.head = Head(info.feature_dim, tuple(spec.hidden or ()), N_OUTPUTS, spec.dropout)
        self.aux_head = AuxHead(aux, N_OUTPUTS) if aux is not None else None
        self._backbone_frozen = False

    # -- seams -------------------------------------------------------------------------------------
    def align(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """STN: (aligned (N, C, s, s), theta (N, 2, 3))."""
        return self.stn(x)

    def forward_feature_map(self, aligned: torch.Tensor) -> torch.Tensor:
        """Aligned image in [0, 1] -> the trunk's last feature map (N, F, h, w) (Grad-CAM's layer)."""
        return self.backbone(self.normalise(aligned))

    @staticmethod
    def pool(feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """STN -> normalise -> backbone -> global average pool: (N, feature_dim)."""
        aligned, _ = self.align(x)
        return self.pool(self.forward_feature_map(aligned))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features -> logits (N, 6)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_extras(self, x: torch.Tensor) -> ModelOutput:
        """Logits plus aux logits (Inception_v3 in train mode only), theta and the aligned image."""
        aligned, theta = self.align(x)
        normalised = self.normalise(aligned)
        aux_logits = None
        if self.training and self.aux_head is not None:
            feature_map, tapped = self.backbone.forward_tapped(normalised)
            aux_logits = self.aux_head(tapped)
        else:
            feature_map = self.backbone(normalised)
        return ModelOutput(self.forward_head(self.pool(feature_map)), aux_logits, theta,
                           centre_channels(aligned, IN_CHANNELS))

    # -- training policy ---------------------------------------------------------------------------
    def _trunk_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = [self.backbone]
        if self.aux_head is not None:  # pretrained aux convolutions follow the trunk; its new fc does not
            modules += [m for name, m in self.aux_head.aux.named_children() if name != "fc"]
        return modules

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (requires_grad False, batch norm kept in eval) or unfreeze the pretrained trunk."""
        self._backbone_frozen = bool(frozen)
        for module in self._trunk_modules():
            for p in module.parameters():
                p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> HemorrhageNet:
        super().train(mode)
        if mode and self._backbone_frozen:
            for module in self._trunk_modules():
                module.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"stn", "backbone", "head"} -> parameters, for per-group learning rates.

        Every parameter is in exactly one group, frozen ones included (requires_grad False; optimizers
        skip them). Inception's aux convolutions count as backbone, its new aux output layer as head.
        """
        groups: dict[str, list[nn.Parameter]] = {"stn": [], "backbone": [], "head": []}
        for name, p in self.named_parameters():
            if name.startswith("stn."):
                groups["stn"].append(p)
            elif name.startswith("backbone.") or (name.startswith("aux_head.") and ".fc." not in name):
                groups["backbone"].append(p)
            else:
                groups["head"].append(p)
        return groups


class Model1(HemorrhageNet):
    """Stage 1: six-way softmax over ``STAGE1_CLASSES`` (none + the five subtypes)."""

    stage = 1


class Model2(HemorrhageNet):
    """Stage 2: six sigmoids over ``LABELS`` (the five subtypes and any)."""

    stage = 2


MODEL_CLASSES: dict[int, type[HemorrhageNet]] = {1: Model1, 2: Model2}


def build_model(spec: ModelSpec, *, weights: str | os.PathLike = "none", freeze: bool | None = None) -> HemorrhageNet:
    """Build Model1 or Model2 from ``spec``.

    weights: ``"imagenet"`` (torchvision's cached file, never downloaded; WeightsUnavailableError
    naming the file when absent), ``"none"`` or a PATH to a torchvision state dict of the backbone.
    freeze: None = the original report's policy. It trains its layers 1, 2 (STN: localisation and sampler),
    4 and 5 (the added layers) and keeps layer 3 (the pretrained backbone) fixed; here that is a frozen
    trunk when pretrained weights are loaded (imagenet or PATH) and a trainable one otherwise. STN and
    head always train. True/False overrides.
    """
    info = get_backbone(spec.backbone)
    trunk, aux = build_trunk(info, weights)
    model = MODEL_CLASSES[spec.stage](spec, trunk, aux)
    pretrained = os.fspath(weights) != "none"
    model.set_backbone_frozen(pretrained if freeze is None else freeze)
    return model


def build_empty(spec: ModelSpec) -> HemorrhageNet:
    """The architecture on the meta device (no memory, no initialisation): for loading a state dict
    with ``load_state_dict(assign=True)``; the caller must then call ``normalise.set``."""
    info = get_backbone(spec.backbone)
    with torch.device("meta"):
        trunk, aux = build_trunk(info, "none", init=False)
        return MODEL_CLASSES[spec.stage](spec, trunk, aux)


def probabilities(stage: int, logits: torch.Tensor) -> torch.Tensor:
    """(N, 6) probabilities in ``LABELS`` order for either stage.

    Stage 1: softmax over (none + 5); subtype p = p(class), any = 1 - p(none). Stage 2: sigmoid.
    """
    if stage == 2:
        return torch.sigmoid(logits)
    if stage != 1:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    p = torch.softmax(logits, dim=1)
    return torch.cat([p[:, 1:], (1.0 - p[:, :1]).clamp_min(0.0)], dim=1)


def label_scores(stage: int, logits: torch.Tensor) -> torch.Tensor:
    """(N, 6) scores in ``LABELS`` order, monotone in each label's probability: what Grad-CAM
    differentiates. Stage 2: the logits; stage 1: log p(label), with log p(any) = log(1 - p(none))."""
    if stage == 2:
        return logits
    log_p = torch.log_softmax(logits, dim=1)
    log_any = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - torch.logsumexp(logits, dim=1, keepdim=True)
    return torch.cat([log_p[:, 1:], log_any], dim=1)


def stage2_from_stage1(
    model1: HemorrhageNet,
    *,
    hidden: tuple[int, ...] | None = None,
    dropout: float | None = None,
    freeze: bool | None = None,
    input_size: int | None = None,
) -> Model2:
    """Model2 whose STN, backbone (and Inception's aux convolutions) and first added layer are copied
    from ``model1``, a built Model1 (from a checkpoint: ``checkpoint.model_from_checkpoint``).

    hidden: Model2's layer sizes; hidden[0] must equal Model1's (it is transferred). Default: Model1's
    hidden[0] followed by ``DEFAULT_HIDDEN[2][1:]``. freeze None keeps Model1's trunk policy. input_size None
    keeps Model1's; another size fine-tunes at it (every part is size-agnostic: the STN resamples to it and
    the backbones pool adaptively).
    """
    if not isinstance(model1, HemorrhageNet):
        raise TypeError(f"expected a built Model1, got {type(model1).__name__} (load a checkpoint first)")
    s1 = model1.spec
    if s1.stage != 1:
        raise ValueError(f"stage2_from_stage1 needs a stage-1 model, got stage {s1.stage}")
    first = tuple(s1.hidden or ())[0]
    hidden = (first,) + DEFAULT_HIDDEN[2][1:] if hidden is None else tuple(hidden)
    if hidden[0] != first:
        raise ValueError(f"hidden[0] must be Model1's first added layer size {first} (it is transferred), got {hidden[0]}")
    spec = ModelSpec(
        backbone=s1.backbone, stage=2, input_size=s1.input_size if input_size is None else input_size, stn=s1.stn, hidden=hidden, context=s1.context,
        dropout=s1.dropout if dropout is None else dropout,
    )
    info = get_backbone(spec.backbone)
    trunk, aux = build_trunk(info, "none")
    model2 = Model2(spec, trunk, aux)
    # Strict per-part loads: a partial transfer would be a silent bug.
    model2.stn.load_state_dict(model1.stn.state_dict())
    model2.backbone.load_state_dict(model1.backbone.state_dict())
    model2.head.shared.load_state_dict(model1.head.shared.state_dict())
    if model1.aux_head is not None and model2.aux_head is not None:
        for name, child in model1.aux_head.aux.named_children():
            if name != "fc":
                getattr(model2.aux_head.aux, name).load_state_dict(child.state_dict())
    model2.normalise.set(**model1.normalise.as_dict())
    model2.set_backbone_frozen(model1.backbone_frozen if freeze is None else freeze)
    model2.to(next(model1.parameters()).device)
    return model2
