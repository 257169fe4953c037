"""Random training augmentation, applied after the deterministic (cacheable) preprocessing.

Left/right flips are safe: hemorrhage presence does not depend on the side. Intensity jitter is kept
small because the windows carry diagnostic meaning (50-90 HU blood against 20-45 HU brain), and the
affine part stays small because the STN is there to learn the large pose changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes; every draw is uniform in ``[-x, +x]`` unless said otherwise."""

    hflip_p: float = 0.5  # probability of a left/right flip
    affine_p: float = 0.5  # probability of applying the small affine below
    rotate_deg: float = 5.0
    translate: float = 0.03  # fraction of the image side
    scale: float = 0.05  # relative: 1 +- scale
    brightness: float = 0.03  # additive, in [0, 1] image units
    contrast: float = 0.05  # multiplicative: 1 +- contrast
    noise_std: float = 0.0  # Gaussian noise, in [0, 1] image units

    def to_dict(self) -> dict:
        return asdict(self)


class SliceAugment:
    """Callable ``(C, S, S) float tensor in [0, 1] -> same shape``.

    Draws from its own generator once ``reseed`` was called (make_loader does so from the loader's
    seed, in the main process and in each worker), else from torch's global RNG.

    ``panels``: the image is a folded polar one (``SlicePrep.polar_fold``), whose turn runs on from
    each panel into the next: a flip then also reverses the panels' order, so the flipped image is the
    mirrored head's (each panel's arc mirrors onto the other's), as a flip of an unfolded one is.
    """

    def __init__(self, config: AugmentConfig | None = None, panels: int = 1) -> None:
        self.config = config or AugmentConfig()
        self.panels = int(panels)
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int) -> None:
        """Make the following draws a function of ``seed`` alone."""
        self._generator = torch.Generator()
        self._generator.manual_seed(int(seed))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.hflip_p > 0 and self._draw() < c.hflip_p:
            image = image.flip(-1)
            if self.panels > 1:
                image = image.unflatten(-2, (self.panels, -1)).flip(-3).flatten(-3, -2)
        if c.affine_p > 0 and self._draw() < c.affine_p:
            image = self._affine(image)
        if c.contrast > 0 or c.brightness > 0:
            gain = 1.0 + c.contrast * self._signed()
            shift = c.brightness * self._signed()
            image = image * gain + shift
        if c.noise_std > 0:
            image = image + torch.randn(image.shape, generator=self._generator) * c.noise_std
        return image.clamp_(0.0, 1.0)

    def _draw(self) -> float:
        return float(torch.rand((), generator=self._generator))

    def _signed(self) -> float:
        return self._draw() * 2.0 - 1.0

    def _affine(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        c = self.config
        size = image.shape[-1]
        return TF.affine(
            image,
            angle=c.rotate_deg * self._signed(),
            translate=[round(c.translate * size * self._signed()), round(c.translate * size * self._signed())],
            scale=1.0 + c.scale * self._signed(),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0.0,  # outside the head is air, which every CT window maps to 0
        )

    def __repr__(self) -> str:
        return f"SliceAugment({self.config}, panels={self.panels})"

