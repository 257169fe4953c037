"""Grad-CAM saliency for one label, with pytorch-grad-cam, safe to run on a model shared by threads.

pytorch-grad-cam hooks its target layer and calls ``backward``. Hooking a layer of the shared model
would let one thread's hooks record another thread's activations, and ``backward`` would write
``.grad`` into shared parameters. So each call builds a throw-away view of the model
(``_CamView``): the trunk runs under ``no_grad`` on the shared model, its feature map passes through a
per-call ``nn.Identity`` (the layer pytorch-grad-cam hooks) and then through a per-call copy of the
small head. Nothing on the shared model is hooked, mode-switched or given gradients.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from hemorrhage_core.labels import LABELS
from hemorrhage_core.models.net import IN_CHANNELS, HemorrhageNet, label_scores
from hemorrhage_core.models.stn import invert_theta
from hemorrhage_core.preprocess import centre_channels


class SaliencyResult(NamedTuple):
    """heatmaps (N, S, S) float32 in [0, 1] on the input image's grid; the pass's logits (N, 6),
    theta (N, 2, 3) and aligned image (N, C, s, s), all detached."""

    heatmaps: np.ndarray
    logits: torch.Tensor
    theta: torch.Tensor
    aligned: torch.Tensor


class _CamView(nn.Module):
    """Per-call view of a shared HemorrhageNet whose output is ``label_scores`` (N, 6)."""

    def __init__(self, model: HemorrhageNet) -> None:
        super().__init__()
        self.feature_map = nn.Identity()  # the target layer: exists only for this call
        self.head = copy.deepcopy(model.head)  # backward writes .grad here, not into the shared head
        self._shared = (model,)  # a tuple, not a submodule: eval()/zero_grad() must not reach it
        self.logits: torch.Tensor | None = None
        self.theta: torch.Tensor | None = None
        self.aligned: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._shared[0]
        # Grad-CAM needs d score / d feature map only: the trunk runs without a graph.
        with torch.no_grad():
            aligned, theta = model.align(x)
            fmap = model.forward_feature_map(aligned)
        fmap = self.feature_map(fmap.detach().requires_grad_(True))
        logits = self.head(model.pool(fmap))
        self.logits, self.theta = logits.detach(), theta
        self.aligned = centre_channels(aligned, IN_CHANNELS)  # of a 2.5D stack, the slice itself
        return label_scores(model.spec.stage, logits)


def label_index(label: str) -> int:
    try:
        return LABELS.index(label)
    except ValueError:
        raise ValueError(f"unknown label {label!r}; known: {', '.join(LABELS)}") from None


def grad_cam(model: HemorrhageNet, x: torch.Tensor, label: str) -> SaliencyResult:
    """Grad-CAM of ``label`` for a batch x (N, C, S, S) in [0, 1], mapped back through the STN.

    The CAM lives on the trunk's last feature map, i.e. in STN-aligned coordinates; it is scaled to
    S x S there and warped with theta's inverse onto the input's grid (0 outside the aligned field of
    view), so it overlays the windowed input image directly. The model must be in eval mode.
    """
    index = label_index(label)
    view = _CamView(model)
    cam = GradCAM(model=view, target_layers=[view.feature_map])
    try:
        # inference_mode tensors cannot enter autograd: leave it explicitly for this pass.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()  # an inference-mode tensor (if the caller made one) becomes a normal one
            aligned_maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)] * x.shape[0])
    finally:
        cam.activations_and_grads.release()  # not the context manager: its __exit__ swallows IndexError
    assert view.logits is not None and view.theta is not None and view.aligned is not None
    heat = torch.from_numpy(np.ascontiguousarray(aligned_maps, dtype=np.float32)).unsqueeze(1)
    inverse = invert_theta(view.theta.to(torch.float64)).to(torch.float32)
    grid = F.affine_grid(inverse, list(heat.shape), align_corners=False)
    on_input = F.grid_sample(heat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    heatmaps = on_input.squeeze(1).clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)
    return SaliencyResult(heatmaps, view.logits, view.theta.detach(), view.aligned.detach())
