"""The added fully connected layers on top of the pooled backbone features."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_features: int, out_features: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features), nn.ReLU(inplace=True), nn.Dropout(dropout)]


class Head(nn.Module):
    """``shared`` (the first added layer, which Model2 inherits from Model1) then ``layers``.

    hidden = (h0, h1, ..., hk): shared = Linear(in, h0) + ReLU + Dropout; layers = a block per further
    size, then Linear(hk, out_features) giving logits.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int, dropout: float) -> None:
        super().__init__()
        self.shared = nn.Sequential(*_block(in_features, hidden[0], dropout))
        rest: list[nn.Module] = []
        for a, b in zip(hidden[:-1], hidden[1:], strict=True):
            rest += _block(a, b, dropout)
        rest.append(nn.Linear(hidden[-1], out_features))
        self.layers = nn.Sequential(*rest)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.shared(features))
