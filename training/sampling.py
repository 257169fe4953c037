"""Repeat-factor sampling (Gupta et al., LVIS, 2019): rare classes seen more often, at the same cost.

A category c that a fraction f_c of the training slices hold gets the factor r_c = max(1, sqrt(t / f_c))
for a threshold t; a slice takes the largest factor of its categories (none, or each subtype it shows).
Each epoch draws every slice floor(r) times and once more with probability r - floor(r), shuffles the
draws and keeps as many as the dataset has slices, so an epoch costs what it cost without it: rare
types come more often, common slices a little less. The draws depend on (seed, epoch) alone and are
cut into ranks like DistributedSampler's, so N processes see what one process sees and a resumed run
sees what an uninterrupted one saw. A boost multiplies chosen categories' factors beyond the rule, for a
type that its frequency alone does not make hard (``repeat_boost``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from hemorrhage_core.labels import LABELS, STAGE1_CLASSES, SUBTYPES

CATEGORIES: tuple[str, ...] = STAGE1_CLASSES  # no blood, then each subtype


def category_matrix(targets: np.ndarray) -> np.ndarray:
    """(N, 6) booleans over CATEGORIES: no blood, or each subtype present.

    ``targets``: stage-1 class indices (N,) (0 none, 1-5 the subtypes; -1 or NaN unknown) or six-label
    rows (N, 6) in LABELS order (NaN unknown). Unknown rows and rows marked ``any`` without a subtype
    hold no category (factor 1).
    """
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 1:
        return np.stack([y == k for k in range(len(CATEGORIES))], axis=1)
    if y.ndim != 2 or y.shape[1] != len(LABELS):
        raise ValueError(f"targets must be class indices (N,) or six labels (N, {len(LABELS)}), got shape {y.shape}")
    subtypes = y[:, [LABELS.index(s) for s in SUBTYPES]] == 1
    none = (y[:, LABELS.index("any")] == 0) & ~subtypes.any(axis=1)
    return np.concatenate([none[:, None], subtypes], axis=1)


def _factors(held: np.ndarray, threshold: float, boost: Sequence[float] | None) -> np.ndarray:
    frequency = held.mean(axis=0) if len(held) else np.zeros(len(CATEGORIES))
    safe = np.where(frequency > 0, frequency, 1.0)
    factors = np.where(frequency > 0, np.maximum(1.0, np.sqrt(threshold / safe)), 1.0)
    if boost is None:
        return factors
    boost = np.asarray(boost, dtype=np.float64)
    if boost.shape != (len(CATEGORIES),) or not np.all(np.isfinite(boost)) or np.any(boost < 1.0):
        raise ValueError(f"repeat boost must be {len(CATEGORIES)} finite numbers >= 1 ({', '.join(CATEGORIES)})")
    return np.where(frequency > 0, factors * boost, 1.0)


def category_factors(targets: np.ndarray, threshold: float, boost: Sequence[float] | None = None) -> dict[str, float]:
    """r_c = max(1, sqrt(threshold / f_c)) per category, times its ``boost`` (six multipliers in
    CATEGORIES order; a category no slice holds keeps 1)."""
    return dict(zip(CATEGORIES, _factors(category_matrix(targets), threshold, boost).tolist(), strict=True))


def repeat_factors(targets: np.ndarray, threshold: float, boost: Sequence[float] | None = None) -> np.ndarray:
    """Each slice's factor: the largest of its categories' (1 for a slice with none)."""
    held = category_matrix(targets)
    return np.where(held, _factors(held, threshold, boost)[None, :], 1.0).max(axis=1, initial=1.0)


class RepeatFactorSampler(Sampler[int]):
    """Indices of one epoch for one rank: the repeated draws, shuffled, cut to ``len(factors)`` (padded
    to a multiple of the world size like DistributedSampler), every ``num_replicas``-th from ``rank``."""

    def __init__(self, factors: np.ndarray, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        factors = np.asarray(factors, dtype=np.float64)
        if factors.ndim != 1 or len(factors) == 0 or not np.all(np.isfinite(factors)) or np.any(factors < 1.0):
            raise ValueError("repeat factors must be a non-empty 1-D array of finite numbers >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas}")
        self.factors = factors
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = math.ceil(len(factors) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch's draws, before they are cut into ranks."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        factors = torch.from_numpy(self.factors)
        whole = torch.floor(factors)
        counts = whole + (torch.rand(len(factors), generator=generator, dtype=torch.float64) < factors - whole)
        draws = torch.repeat_interleave(torch.arange(len(factors)), counts.long())
        draws = draws[torch.randperm(len(draws), generator=generator)]
        if len(draws) < self.total_size:  # only the world-size padding: every factor is at least 1
            draws = torch.cat([draws, draws[: self.total_size - len(draws)]])
        return draws[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
