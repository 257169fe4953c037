"""The preprocessed slice cache, SliceDataset and the augmentation transform."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import truncate_file, write_rsna_set

from hemorrhage_core.data import cache as cache_module
from hemorrhage_core.data.augment import AugmentConfig, SliceAugment
from hemorrhage_core.data.cache import SliceCache, usable_index
from hemorrhage_core.data.dataset import IGNORE_INDEX, SliceDataset
from hemorrhage_core.data.header_index import build_index, index_folder
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.preprocess import SlicePrep, prepare_slice, to_tensor
from hemorrhage_core.windowing import DEFAULT_STACK, PRESETS, WindowStack

SIZE = 24  # slices are written at 32 px: the cache resizes


@pytest.fixture()
def rsna(tmp_path, monkeypatch):
    monkeypatch.delenv("HEMORRHAGE_CT_CACHE", raising=False)  # caches go to DATA/.cache
    data = tmp_path / "data"
    write_rsna_set(data, n_patients=3, slices_per_patient=4, size=32, seed=2)
    return data, build_index(data, workers=1, progress=False).table


def _build(index, data, **kwargs) -> SliceCache:
    prep = SlicePrep(kwargs.pop("image_size", SIZE), kwargs.pop("windows", DEFAULT_STACK), head_crop=kwargs.pop("head_crop", False))
    return SliceCache.build(index, data, prep=prep, workers=1, progress=False, **kwargs)


def test_cached_path_returns_exactly_the_uncached_tensors(rsna):
    data, index = rsna
    cache = _build(index, data)
    cached = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), cache=cache)
    uncached = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE))
    assert len(cached) == len(uncached) == len(index)
    for i in range(len(index)):
        image_c, target_c, id_c = cached[i]
        image_u, target_u, id_u = uncached[i]
        assert id_c == id_u
        assert image_c.dtype == torch.float32 and image_c.shape == (3, SIZE, SIZE)
        assert torch.equal(image_c, image_u)
        assert torch.equal(target_c, target_u)
        # and both are the shared deterministic preprocessing, nothing else
        reference = to_tensor(prepare_slice(read_slice(data / index["path"][i]).hu, SIZE, DEFAULT_STACK))
        assert torch.equal(image_c, reference)
    assert float(image_c.min()) >= 0.0 and float(image_c.max()) <= 1.0


def test_cache_is_reused_and_a_subset_is_served_by_the_full_cache(rsna, monkeypatch):
    data, index = rsna
    full = _build(index, data)
    monkeypatch.setattr(cache_module, "_fill", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    assert _build(index, data).directory == full.directory
    subset = index.iloc[[5, 1, 7]]
    assert _build(subset, data).directory == full.directory


def test_cache_is_invalidated_when_size_or_windows_change(rsna):
    data, index = rsna
    base = _build(index, data)
    resized = _build(index, data, image_size=SIZE + 8)
    other_windows = WindowStack((PRESETS["brain"], PRESETS["subdural"], PRESETS["soft_tissue"]))
    rewindowed = _build(index, data, windows=other_windows)
    assert len({base.directory, resized.directory, rewindowed.directory}) == 3
    assert resized.array.shape == (len(index), 3, SIZE + 8, SIZE + 8)
    assert not np.array_equal(base.array[:, 2], rewindowed.array[:, 2])  # bone vs soft tissue channel
    np.testing.assert_array_equal(base.array[:, :2], rewindowed.array[:, :2])
    # a dataset refuses a cache made for another size or other windows
    with pytest.raises(DatasetError, match="cache holds"):
        SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), cache=resized)
    with pytest.raises(DatasetError, match="cache holds"):
        SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), cache=rewindowed)


def test_cache_is_rebuilt_when_the_preprocessing_version_changes(rsna, monkeypatch):
    from hemorrhage_core import preprocess

    data, index = rsna
    first = _build(index, data)
    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", 99, raising=False)
    calls = []
    real_fill = cache_module._fill
    monkeypatch.setattr(cache_module, "_fill", lambda *a, **k: calls.append(1) or real_fill(*a, **k))
    second = _build(index, data)
    assert calls == [1] and second.meta["preprocess_version"] == 99
    assert first.meta.get("preprocess_version") != 99


def test_cache_is_rebuilt_when_a_source_file_changes(rsna):
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    data, index = rsna
    before = _build(index, data)
    row = index.iloc[3]
    blank = np.full((32, 32), 1024 + 40, dtype=np.int16)  # 40 HU everywhere
    write_ct_slice(
        data / row["path"],
        blank,
        patient_id="x",
        study_uid=new_uid("s"),
        series_uid=new_uid("r"),
        sop_uid=new_uid("i"),
        z=0.0,
        instance_number=1,
    )
    st = os.stat(data / row["path"])
    os.utime(data / row["path"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = _build(index, data)
    assert after.directory == before.directory  # same key, rebuilt in place
    assert (after.get(row["image_id"])[0] == 128).all()  # brain window centre


def test_truncated_slice_is_skipped_recorded_and_excluded(rsna, caplog):
    data, index = rsna
    bad = index["image_id"][2]
    truncate_file(data / index["path"][2])
    with caplog.at_level(logging.WARNING):
        cache = _build(index, data)
    assert list(cache.failed) == [bad] and cache.failed[bad]  # the reader's reason, kept
    assert bad in caplog.text
    usable = usable_index(index, cache)
    assert bad not in set(usable["image_id"]) and len(usable) == len(index) - 1
    dataset = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), cache=cache)
    assert dataset.excluded_ids == (bad,)
    assert bad not in {dataset[i][2] for i in range(len(dataset))}
    with pytest.raises(DatasetError, match="failed to decode"):
        cache.get(bad)
    # the uncached path skips it (None, dropped by the loader's collate) or raises on request
    uncached = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE))
    assert uncached[2] is None
    with pytest.raises(DicomReadError):
        SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), on_error="raise")[2]


def test_a_crashed_build_leaves_nothing_that_is_trusted(rsna, monkeypatch):
    data, index = rsna

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(cache_module, "_fill", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _build(index, data)
    # only hidden entries (the unfinished build, kept for a rerun, and its lock): no cache to trust
    assert all(p.name.startswith(".") for p in (data / ".cache").iterdir())
    assert SliceCache._find([data / ".cache"], data, cache_module.cache_key(SlicePrep(SIZE), list(index["image_id"])),
                            SlicePrep(SIZE), list(index["image_id"]), list(index["path"]), True) is None
    monkeypatch.undo()
    monkeypatch.delenv("HEMORRHAGE_CT_CACHE", raising=False)
    # a build folder left by a dead process (kill -9) is never used and is cleaned up
    orphan = data / ".cache" / ".building-999999999-x"
    orphan.mkdir()
    (orphan / "cache.json").write_text("{}")
    cache = _build(index, data)
    assert not orphan.exists()
    assert cache.directory.parent == data / ".cache" and not cache.directory.name.startswith(".")


def test_unwritable_data_folder_puts_the_cache_in_the_user_cache(rsna, tmp_path, monkeypatch):
    data, index = rsna
    monkeypatch.setenv("HEMORRHAGE_CT_CACHE", str(tmp_path / "user-cache"))
    (data / ".cache").write_text("a file where the cache folder would go")
    cache = _build(index, data)
    assert str(cache.directory).startswith(str(tmp_path / "user-cache"))


def test_pickled_cache_does_not_carry_the_array(rsna):
    data, index = rsna
    cache = _build(index, data, image_size=64)
    _ = cache.array  # opened in this process
    payload = pickle.dumps(cache)
    assert len(payload) < cache.array.nbytes / 4
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone.read(1), cache.read(1))


def test_stage_targets(rsna):
    data, index = rsna
    stage1 = SliceDataset(index, data, stage=1, prep=SlicePrep(SIZE))
    multi = index[index["stage1_class"] == -1]
    assert len(multi) > 0 and len(stage1) == len(index) - len(multi)
    for i in range(len(stage1)):
        _, target, image_id = stage1[i]
        assert target.dtype == torch.int64 and target.shape == ()
        assert int(target) == int(index.set_index("image_id").loc[image_id, "stage1_class"])
    stage2 = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE))
    _, target, image_id = stage2[0]
    assert target.dtype == torch.float32
    expected = index.set_index("image_id").loc[image_id, list(LABELS)].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(target.numpy(), expected)
    # unlabeled rows: ignored class in stage 1, NaN in stage 2
    unlabeled = index_folder(data / "stage_2_train", workers=1, progress=False).table
    assert int(SliceDataset(unlabeled, data / "stage_2_train", stage=1, prep=SlicePrep(SIZE))[0][1]) == IGNORE_INDEX
    assert torch.isnan(SliceDataset(unlabeled, data / "stage_2_train", stage=2, prep=SlicePrep(SIZE))[0][1]).all()
    with pytest.raises(ValueError):
        SliceDataset(index, data, stage=3, prep=SlicePrep(SIZE))
    with pytest.raises(ValueError, match="stage1_multi"):
        SliceDataset(index, data, stage=1, prep=SlicePrep(SIZE), stage1_multi="keep")


def test_stage1_share_keeps_the_multi_type_slices_with_their_six_labels(rsna):
    data, index = rsna
    shared = SliceDataset(index, data, stage=1, prep=SlicePrep(SIZE), stage1_multi="share")
    assert len(shared) == len(index) and (index["stage1_class"] == -1).any()
    expected = index.set_index("image_id").loc[list(shared.image_ids), list(LABELS)].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(shared.targets, expected)
    _, target, _ = shared[0]
    assert target.dtype == torch.float32 and target.shape == (len(LABELS),)


def test_augmentation_runs_after_the_deterministic_part(rsna):
    data, index = rsna
    flip = SliceAugment(AugmentConfig(hflip_p=1.0, affine_p=0.0, brightness=0.0, contrast=0.0))
    plain = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE))
    flipped = SliceDataset(index, data, stage=2, prep=SlicePrep(SIZE), augment=flip)
    assert torch.equal(flipped[0][0], plain[0][0].flip(-1))

    jitter = SliceAugment(AugmentConfig(affine_p=1.0, noise_std=0.01))
    jitter.reseed(3)
    a = jitter(plain[1][0])
    jitter.reseed(3)
    b = jitter(plain[1][0])
    assert torch.equal(a, b) and a.shape == plain[1][0].shape
    assert not torch.equal(a, jitter(plain[1][0]))  # the next draw differs
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, plain[1][0])
