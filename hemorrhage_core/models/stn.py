"""Spatial Transformer Network: aligns a slice and resamples it to the backbone's input size.

The default is a *similarity* transform (rotation, isotropic scale, shift): a head that is tilted,
off-centre or a different size in the field of view needs exactly these four degrees of freedom, and
with the scale parameterised as exp(log_scale) the transform can neither shear, mirror nor fold the
image, which a free affine (6 dof) can learn to do on a small data set. ``"affine"`` is there for
comparison; ``"none"`` only resizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hemorrhage_core.models.spec import STN_MODES

# The localisation net sees a LOC_SIZE copy: cheap at 512 px, and enough to find a head's pose.
LOC_SIZE = 64
LOC_CHANNELS: tuple[int, ...] = (16, 32, 32)
LOC_HIDDEN = 64
N_PARAMS = {"similarity": 4, "affine": 6, "none": 0}


def identity_theta(batch: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 2, 3) identity affine matrices."""
    return torch.eye(2, 3, device=device, dtype=dtype).unsqueeze(0).expand(batch, 2, 3).contiguous()


def resample(x: torch.Tensor, theta: torch.Tensor | None, size: int) -> torch.Tensor:
    """Warp ``x`` (N, C, H, W) by ``theta`` (N, 2, 3) onto a ``size`` x ``size`` grid.

    ``theta`` maps output to input coordinates (``affine_grid`` convention, [-1, 1], corners not
    aligned). When shrinking, the image is first reduced with an antialiased resize so thin structures
    (subarachnoid blood) do not alias away; at identity the result then equals
    ``F.interpolate(..., antialias=True)``. Outside the image the sampler reads 0 (air in every window).
    ``theta`` None means identity and skips the sampler.
    """
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if theta is None:
        if x.shape[-2:] == (size, size):
            return x
        theta = identity_theta(x.shape[0], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of (N, 2, 3) affine matrices: maps input coordinates back to aligned coordinates.

    The pseudo-inverse equals the inverse for every transform a similarity STN can produce and keeps a
    degenerate learned affine from raising.
    """
    a = theta[:, :, :2]
    t = theta[:, :, 2:]
    a_inv = torch.linalg.pinv(a)
    return torch.cat([a_inv, -a_inv @ t], dim=2)


class SpatialTransformer(nn.Module):
    """Localisation net -> theta (N, 2, 3) -> ``affine_grid`` + ``grid_sample`` at ``output_size``.

    The last layer starts at zero weights and an identity bias, so training starts from "no change".
    ``forward`` returns ``(aligned, theta)``; aligned is (N, C, output_size, output_size).
    """

    def __init__(self, mode: str, output_size: int, in_channels: int = 3) -> None:
        super().__init__()
        if mode not in STN_MODES:
            raise ValueError(f"unknown STN mode {mode!r}; known: {', '.join(STN_MODES)}")
        self.mode = mode
        self.output_size = int(output_size)
        self.localisation: nn.Sequential | None = None
        self.regressor: nn.Sequential | None = None
        if mode == "none":
            return
        convs: list[nn.Module] = []
        channels = in_channels
        for out_channels in LOC_CHANNELS:
            convs += [nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = out_channels
        convs += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.localisation = nn.Sequential(*convs)
        last = nn.Linear(LOC_HIDDEN, N_PARAMS[mode])
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(self._identity_params(mode))
        self.regressor = nn.Sequential(nn.Linear(channels * 16, LOC_HIDDEN), nn.ReLU(inplace=True), last)

    @staticmethod
    def _identity_params(mode: str) -> torch.Tensor:
        if mode == "similarity":
            return torch.zeros(4)  # log_scale, angle, shift_x, shift_y
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2, 3) affine matrices for a batch in [0, 1]."""
        if self.localisation is None or self.regressor is None:
            return identity_theta(x.shape[0], device=x.device, dtype=x.dtype)
        small = F.interpolate(x, size=(LOC_SIZE, LOC_SIZE), mode="bilinear", align_corners=False, antialias=True)
        params = self.regressor(self.localisation(small))
        if self.mode == "affine":
            return params.view(-1, 2, 3)
        log_scale, angle, shift_x, shift_y = params.unbind(dim=1)
        scale = torch.exp(log_scale)
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        row0 = torch.stack([cos, -sin, shift_x], dim=1)
        row1 = torch.stack([sin, cos, shift_y], dim=1)
        return torch.stack([row0, row1], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.theta(x)
        # "none" skips the sampler entirely: a plain (antialiased) resize.
        aligned = resample(x, None if self.mode == "none" else theta, self.output_size)
        return aligned, theta
