"""make_loader: seeded order, skipped slices, DistributedSampler."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from data_fixtures import truncate_file, write_rsna_set
from torch.utils.data import DistributedSampler

from hemorrhage_core.data.augment import SliceAugment
from hemorrhage_core.data.cache import SliceCache
from hemorrhage_core.data.dataset import SliceDataset
from hemorrhage_core.data.header_index import build_index
from hemorrhage_core.data.loader import collate_skip_failed, make_loader
from hemorrhage_core.preprocess import SlicePrep

SIZE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("loader") / "data"
    write_rsna_set(data, n_patients=4, slices_per_patient=5, size=32, seed=5)
    index = build_index(data, workers=1, progress=False).table
    cache = SliceCache.build(index, data, prep=SlicePrep(SIZE), workers=1, progress=False)
    return SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), cache=cache, augment=SliceAugment())


def _epochs(loader, n=2):
    out = []
    for _ in range(n):
        for images, targets, ids in loader:
            out.append((images.clone(), targets.clone(), list(ids)))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[2] == y[2] and torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


def test_same_seed_same_batches_bitwise(dataset):
    first = _epochs(make_loader(dataset, batch_size=6, shuffle=True, workers=0, seed=11))
    second = _epochs(make_loader(dataset, batch_size=6, shuffle=True, workers=0, seed=11))
    other = _epochs(make_loader(dataset, batch_size=6, shuffle=True, workers=0, seed=12))
    assert _same(first, second)
    assert [b[2] for b in first] != [b[2] for b in other]
    # epochs differ from each other, and every item appears once per epoch
    per_epoch = len(first) // 2
    ids_1 = [i for b in first[:per_epoch] for i in b[2]]
    ids_2 = [i for b in first[per_epoch:] for i in b[2]]
    assert ids_1 != ids_2 and sorted(ids_1) == sorted(ids_2) == sorted(dataset.image_ids.tolist())


def test_same_seed_same_batches_with_worker_processes(dataset):
    a = make_loader(dataset, batch_size=5, shuffle=True, workers=2, seed=3)
    b = make_loader(dataset, batch_size=5, shuffle=True, workers=2, seed=3)
    assert a.persistent_workers and not a.pin_memory  # CPU only in tests
    assert _same(_epochs(a, 1), _epochs(b, 1))


def test_unshuffled_loader_keeps_index_order(dataset):
    loader = make_loader(dataset, batch_size=7, shuffle=False, workers=0, seed=0, drop_last=True)
    ids = [i for _, _, batch in loader for i in batch]
    assert ids == dataset.image_ids.tolist()[: 7 * (len(dataset) // 7)]


def test_failed_slices_are_dropped_from_batches(tmp_path):
    data = tmp_path / "data"
    write_rsna_set(data, n_patients=1, slices_per_patient=4, size=32, seed=9)
    index = build_index(data, workers=1, progress=False).table
    truncate_file(data / index["path"][1])
    dataset = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE))
    batches = list(make_loader(dataset, batch_size=4, shuffle=False, workers=0, seed=0))
    assert len(batches) == 1
    images, targets, ids = batches[0]
    assert images.shape == (3, 3, SIZE, SIZE) and list(ids) == [index["image_id"][i] for i in (0, 2, 3)]
    assert collate_skip_failed([None, None]) is None


def test_distributed_sampler_under_an_initialised_process_group(dataset, tmp_path):
    with pytest.raises(ValueError, match="initialised"):
        make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=0, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=4)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        epoch0 = [i for _, _, ids in loader for i in ids]
        loader.sampler.set_epoch(0)
        assert [i for _, _, ids in loader for i in ids] == epoch0
        loader.sampler.set_epoch(1)
        epoch1 = [i for _, _, ids in loader for i in ids]
        assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
        plain = make_loader(dataset, batch_size=4, shuffle=True, workers=0, seed=4, distributed=False)
        assert not isinstance(plain.sampler, DistributedSampler)
    finally:
        dist.destroy_process_group()
