"""DataLoader factory: seeded order, workers, pinned memory on CUDA, DistributedSampler under torchrun."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

# Spacing of the per-rank augmentation seeds (a large prime, so nearby user seeds never collide).
_RANK_SEED_STRIDE = 1_000_003


def collate_skip_failed(batch: Sequence) -> object | None:
    """default_collate over the items that are not None (slices that failed to decode).

    Returns None when every item of the batch failed; training loops skip such a batch.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


def seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the dataset's augmentation in a worker from torch's per-worker seed.

    torch sets that seed to the loader's base seed (drawn from its generator) plus the worker id.
    """
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed_augment(info.dataset, seed)


def _reseed_augment(dataset: Dataset, seed: int) -> None:
    augment = getattr(dataset, "augment", None)
    if callable(getattr(augment, "reseed", None)):
        augment.reseed(seed)


class SeededDataLoader(DataLoader):
    """A DataLoader that also seeds the dataset's augmentation when it runs in the main process.

    Worker processes are seeded by ``seed_worker``; without workers, each new epoch's iterator
    reseeds ``dataset.augment`` from the loader's generator, so batches are bitwise reproducible.
    """

    def __iter__(self):
        if self.num_workers == 0 and self.generator is not None:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            _reseed_augment(self.dataset, seed)
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    drop_last: bool = False,
    distributed: bool | None = None,
) -> DataLoader:
    """A DataLoader whose batch order and augmentation draws are fixed by ``seed`` (bitwise).

    ``distributed=None`` means: use a DistributedSampler when torch.distributed is initialised
    (torchrun). The sampler is ``loader.sampler``; call ``loader.sampler.set_epoch(epoch)`` each
    epoch so shuffling differs between epochs and agrees between ranks. Memory is pinned when CUDA
    is available; worker processes persist across epochs when ``workers > 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        distributed = dist_ready
    elif distributed and not dist_ready:
        raise ValueError("distributed=True needs torch.distributed initialised first (e.g. under torchrun)")

    generator = torch.Generator()
    sampler = None
    if distributed:
        # The sampler's seed must agree across ranks (it partitions the data); the generator only
        # drives augmentation and worker seeds, which should differ between ranks.
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
        generator.manual_seed(int(seed) + _RANK_SEED_STRIDE * torch.distributed.get_rank())
    else:
        generator.manual_seed(int(seed))
    return SeededDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_failed,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
