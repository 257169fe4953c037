"""Repeat-factor sampling: categories and factors against hand counts, the sampler's epochs (length,
determinism, world sizes, long-run frequencies), refusals, and the trainer using it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.config import ConfigError, TrainConfig
from training.sampling import (
    CATEGORIES,
    RepeatFactorSampler,
    category_factors,
    category_matrix,
    repeat_factors,
)

NAN = float("nan")


def _six(epidural=0, iph=0, ivh=0, sah=0, sdh=0, any_=None) -> list[float]:
    subtypes = [epidural, iph, ivh, sah, sdh]
    return [*subtypes, float(any(subtypes)) if any_ is None else any_]


def test_categories_of_class_indices_and_of_six_labels():
    classes = np.array([0, 1, 5, -1, NAN, 3])
    held = category_matrix(classes)
    assert held.shape == (6, len(CATEGORIES))
    assert held.sum(axis=1).tolist() == [1, 1, 1, 0, 0, 1]
    assert [CATEGORIES[j] for j in held.argmax(axis=1)[[0, 1, 2, 5]]] == ["none", "epidural", "subdural", "intraventricular"]
    six = np.array([_six(), _six(epidural=1, sdh=1), [NAN] * 6, _six(any_=1.0), _six(ivh=1)])
    held = category_matrix(six)
    assert held[0].tolist() == [True, False, False, False, False, False]
    assert held[1].tolist() == [False, True, False, False, False, True]
    assert not held[2].any() and not held[3].any()  # unknown; any without a known subtype
    assert held[4].tolist() == [False, False, False, True, False, False]
    with pytest.raises(ValueError, match="six labels"):
        category_matrix(np.zeros((3, 4)))


def test_factors_against_hand_counts():
    # 10 slices: 6 without blood, 1 epidural, 2 subdural, 1 with both.
    targets = np.array([_six()] * 6 + [_six(epidural=1)] + [_six(sdh=1)] * 2 + [_six(epidural=1, sdh=1)])
    factors = category_factors(targets, 0.5)
    assert factors["none"] == 1.0  # 0.6 > 0.5
    assert factors["epidural"] == pytest.approx(math.sqrt(0.5 / 0.2))
    assert factors["subdural"] == pytest.approx(math.sqrt(0.5 / 0.3))
    assert factors["intraparenchymal"] == 1.0  # no slice holds it
    per_slice = repeat_factors(targets, 0.5)
    np.testing.assert_allclose(per_slice, [1.0] * 6 + [math.sqrt(2.5)] + [math.sqrt(5 / 3)] * 2 + [math.sqrt(2.5)])
    assert repeat_factors(np.array([[NAN] * 6]), 0.5).tolist() == [1.0]


def test_a_boost_multiplies_its_categories_factors():
    targets = np.array([_six()] * 6 + [_six(epidural=1)] + [_six(sdh=1)] * 2 + [_six(epidural=1, sdh=1)])
    boost = [1.0, 2.0, 3.0, 1.0, 1.0, 1.5]
    factors = category_factors(targets, 0.5, boost)
    assert factors["epidural"] == pytest.approx(2 * math.sqrt(0.5 / 0.2))
    assert factors["subdural"] == pytest.approx(1.5 * math.sqrt(0.5 / 0.3))
    assert factors["none"] == 1.0 and factors["intraparenchymal"] == 1.0  # 1 x 1; held by no slice, so 1
    edh, sdh = 2 * math.sqrt(2.5), 1.5 * math.sqrt(5 / 3)
    np.testing.assert_allclose(repeat_factors(targets, 0.5, boost), [1.0] * 6 + [edh] + [sdh] * 2 + [max(edh, sdh)])
    np.testing.assert_allclose(repeat_factors(targets, 0.5, [1.0] * 6), repeat_factors(targets, 0.5))
    for bad in ([1.0] * 5, [1.0, 0.5, 1, 1, 1, 1], [1.0, NAN, 1, 1, 1, 1]):
        with pytest.raises(ValueError, match="repeat boost"):
            repeat_factors(targets, 0.5, bad)


def test_an_epoch_keeps_its_length_and_depends_on_seed_and_epoch_only():
    factors = np.array([1.0] * 7 + [2.5, 1.3, 3.0])
    sampler = RepeatFactorSampler(factors, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(first) == len(sampler) == 10 and set(first) <= set(range(10))
    again = RepeatFactorSampler(factors, seed=3)
    again.set_epoch(1)
    assert list(again) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    # All factors 1: each epoch is a permutation, every slice exactly once.
    plain = RepeatFactorSampler(np.ones(9), seed=0)
    plain.set_epoch(4)
    assert sorted(plain) == list(range(9))


def test_two_ranks_see_what_one_process_sees():
    factors = np.array([1.0, 2.0, 1.5, 1.0, 3.0, 1.0, 1.2, 1.0])
    one = RepeatFactorSampler(factors, seed=5)
    ranks = [RepeatFactorSampler(factors, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for epoch in (0, 7):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        whole = list(one)
        assert list(ranks[0]) == whole[0::2] and list(ranks[1]) == whole[1::2]
    odd = [RepeatFactorSampler(np.ones(5), num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    assert [len(s) for s in odd] == [3, 3] and len(list(odd[0])) == 3  # padded like DistributedSampler


def test_long_run_frequencies_follow_the_factors():
    factors = np.array([1.0] * 8 + [3.0, 2.5])
    sampler = RepeatFactorSampler(factors, seed=11)
    counts = np.zeros(len(factors))
    for epoch in range(3000):
        sampler.set_epoch(epoch)
        counts += np.bincount(list(sampler), minlength=len(factors))
    per_unit = counts / factors
    # Draws are proportional to the factors: each slice's count over its factor is the same share.
    np.testing.assert_allclose(per_unit / per_unit.mean(), 1.0, atol=0.04)


def test_refusals():
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorSampler(np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorSampler(np.array([]))
    with pytest.raises(ValueError, match="outside a world"):
        RepeatFactorSampler(np.ones(4), num_replicas=2, rank=2)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="repeat_threshold"):
            TrainConfig(repeat_threshold=bad)
    for bad in ([1, 2, 1, 1, 1], [1, 0.5, 1, 1, 1, 1], "epidural", [1, float("inf"), 1, 1, 1, 1]):
        with pytest.raises(ConfigError, match="repeat_boost"):
            TrainConfig(repeat_threshold=0.4, repeat_boost=bad)
    with pytest.raises(ConfigError, match="set repeat_threshold > 0"):
        TrainConfig(repeat_boost=[1, 2, 1, 1, 1, 1])
    assert TrainConfig(repeat_threshold=0.4, repeat_boost=[1, 2, 1, 1, 1, 1]).repeat_boost == [1, 2, 1, 1, 1, 1]


def test_the_trainer_samples_by_repeat_factor_when_asked(tmp_path):
    from train_fixtures import write_tiny_set

    from training import trainer
    from training.distributed import DistEnv

    data = tmp_path / "data"
    write_tiny_set(data)
    rows = trainer.load_index(TrainConfig(data=str(data)), DistEnv()).table
    config = TrainConfig(data=str(data), image_size=32, input_size=32, cache=False, repeat_threshold=0.5, seed=2)
    dataset = trainer.make_dataset(config, rows, data, None, stage=1, train=True)
    loader = trainer.train_loader(dataset, config, DistEnv(), trainer.torch.device("cpu"))
    assert isinstance(loader.sampler, RepeatFactorSampler)
    np.testing.assert_allclose(loader.sampler.factors, repeat_factors(np.asarray(dataset.targets), 0.5))
    assert len(loader.sampler) == len(dataset)
    boosted = trainer.train_loader(dataset, TrainConfig.from_dict({"repeat_boost": [1, 3, 1, 1, 1, 1]}, base=config),
                                   DistEnv(), trainer.torch.device("cpu"))
    targets = np.asarray(dataset.targets)
    np.testing.assert_allclose(boosted.sampler.factors, repeat_factors(targets, 0.5, [1, 3, 1, 1, 1, 1]))
    assert boosted.sampler.factors.max() > loader.sampler.factors.max()  # the tiny set holds epidural slices
    off = trainer.train_loader(dataset, TrainConfig(data=str(data)), DistEnv(), trainer.torch.device("cpu"))
    assert not isinstance(off.sampler, RepeatFactorSampler)
