"""Patient-grouped splits, folds and subsets (hemorrhage_core.data.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from data_fixtures import fake_index
from hypothesis import given, settings
from hypothesis import strategies as st

from hemorrhage_core.data.splits import (
    assign_folds,
    fold_split,
    patient_strata,
    patient_table,
    split_train_val,
    subset_patients,
)
from hemorrhage_core.errors import DatasetError
from hemorrhage_core.labels import LABELS, SUBTYPES


@pytest.fixture(scope="module")
def index() -> pd.DataFrame:
    return fake_index(200, seed=1)


def _patients(rows: pd.DataFrame) -> set[str]:
    return set(rows["patient_id"])


def test_rarest_label_is_the_stratum():
    index = fake_index(60, seed=3)
    table = patient_table(index)
    counts = table[list(SUBTYPES)].sum()
    for patient, row in table.iterrows():
        positives = [name for name in SUBTYPES if row[name]]
        expected = min(positives, key=lambda n: (counts[n], SUBTYPES.index(n))) if positives else "none"
        assert row["stratum"] == expected, patient
    # n_images adds up to the rows of the index
    assert table["n_images"].sum() == len(index)


def test_train_val_split_is_patient_disjoint_and_complete(index):
    train, val = split_train_val(index, val_fraction=0.2, seed=0)
    assert _patients(train).isdisjoint(_patients(val))
    assert _patients(train) | _patients(val) == _patients(index)
    assert len(train) + len(val) == len(index)
    share = len(_patients(val)) / len(_patients(index))
    assert 0.15 <= share <= 0.25


def test_split_is_seeded(index):
    a = split_train_val(index, val_fraction=0.2, seed=7)[1]
    b = split_train_val(index, val_fraction=0.2, seed=7)[1]
    c = split_train_val(index, val_fraction=0.2, seed=8)[1]
    assert _patients(a) == _patients(b)
    assert _patients(a) != _patients(c)


def test_every_label_on_both_sides_when_possible(index):
    for seed in range(3):
        train, val = split_train_val(index, val_fraction=0.2, seed=seed)
        for name in LABELS:
            assert train[name].any() and val[name].any(), (seed, name)


def test_folds_are_patient_disjoint_and_stratified(index):
    n_folds = 5
    folds = assign_folds(index, n_folds=n_folds, seed=0)
    assert sorted(folds.unique()) == list(range(n_folds))
    # every slice of a patient is in the same fold
    assert (folds.groupby(index["patient_id"]).nunique() == 1).all()
    strata = patient_strata(index)
    fold_of_patient = folds.groupby(index["patient_id"]).first()
    crosstab = pd.crosstab(strata, fold_of_patient.reindex(strata.index))
    for stratum, row in crosstab.iterrows():
        if strata.eq(stratum).sum() >= n_folds:
            assert (row > 0).all(), f"stratum {stratum} missing from a fold: {row.to_dict()}"
    for k in range(n_folds):
        train, val = fold_split(index, folds, k)
        assert _patients(train).isdisjoint(_patients(val))
        assert len(train) + len(val) == len(index)


def test_subset_keeps_whole_patients_and_the_class_mix(index):
    subset = subset_patients(index, fraction=0.3, seed=0)
    chosen = _patients(subset)
    assert len(chosen) == round(0.3 * len(_patients(index)))
    # whole patients: every slice of a chosen patient is kept
    assert len(subset) == index["patient_id"].isin(chosen).sum()
    full_mix = patient_strata(index).value_counts(normalize=True)
    sub_mix = patient_strata(subset).value_counts(normalize=True).reindex(full_mix.index, fill_value=0.0)
    assert np.abs(full_mix - sub_mix).max() <= 1.0 / len(chosen) + 0.01
    # the rare stratum survives even a small subset
    small = subset_patients(index, n_patients=12, seed=0)
    assert "epidural" in set(patient_strata(small))
    assert subset_patients(index, n_patients=12, seed=0).equals(small)



def test_a_boosted_stratum_gets_its_multiplied_share(index):
    strata = patient_strata(index)  # the strata of the set the subset is drawn from
    sizes = strata.value_counts()

    def mix(rows: pd.DataFrame) -> pd.Series:
        return strata[sorted(_patients(rows))].value_counts()

    plain = mix(subset_patients(index, n_patients=40, seed=0))
    boosted_rows = subset_patients(index, n_patients=40, seed=0, boost={"epidural": 2.0})
    boosted = mix(boosted_rows)
    assert boosted.sum() == 40 and len(boosted_rows) == index["patient_id"].isin(_patients(boosted_rows)).sum()
    # epidural's weight doubled: its share is 2 s / (total + s) of the 40, to the rounding
    s, total = sizes["epidural"], sizes.sum()
    assert abs(boosted["epidural"] - 40 * 2 * s / (total + s)) < 1.0
    assert boosted["epidural"] > plain["epidural"]
    # a boost beyond the stratum's size takes all of its patients; the others keep their proportions
    everything = mix(subset_patients(index, n_patients=40, seed=0, boost={"epidural": 100.0}))
    assert everything["epidural"] == s
    rest = sizes.drop("epidural")
    assert (abs(everything.drop("epidural").reindex(rest.index, fill_value=0) - rest / rest.sum() * (40 - s)) < 1.0).all()
    # boosts of 1 change nothing; a boost of a type no patient has is allowed and changes nothing
    assert subset_patients(index, n_patients=40, seed=0, boost=dict.fromkeys(("none", *SUBTYPES), 1.0)).equals(
        subset_patients(index, n_patients=40, seed=0))
    no_edh = index[~index["patient_id"].isin(index.loc[index["epidural"] > 0, "patient_id"])]
    assert subset_patients(no_edh, n_patients=30, seed=0, boost={"epidural": 3.0}).equals(
        subset_patients(no_edh, n_patients=30, seed=0))
    for bad, message in (({"bleed": 2.0}, "cannot boost 'bleed'"), ({"epidural": 0.5}, ">= 1"),
                         ({"epidural": float("nan")}, ">= 1")):
        with pytest.raises(DatasetError, match=message):
            subset_patients(index, n_patients=40, seed=0, boost=bad)


def test_refusals(index):
    with pytest.raises(DatasetError):
        assign_folds(index.head(10), n_folds=50, seed=0)
    with pytest.raises(DatasetError):
        split_train_val(index, val_fraction=0.8)
    three = index[index["patient_id"].isin(index["patient_id"].unique()[:3])]
    with pytest.raises(DatasetError, match="validation fraction of 0.2 needs at least 5 patients, the data has 3"):
        split_train_val(three, val_fraction=0.2)
    with pytest.raises(DatasetError):
        subset_patients(index)
    unlabeled = index.astype({name: "float32" for name in LABELS})
    unlabeled.loc[:, "any"] = np.nan
    with pytest.raises(DatasetError):
        split_train_val(unlabeled)


@settings(max_examples=25, deadline=None)
@given(
    n_patients=st.integers(min_value=6, max_value=40),
    seed=st.integers(min_value=0, max_value=2**16),
    n_folds=st.integers(min_value=2, max_value=6),
)
def test_folds_never_share_a_patient(n_patients, seed, n_folds):
    index = fake_index(n_patients, seed=seed, slices=(1, 4))
    folds = assign_folds(index, n_folds=n_folds, seed=seed)
    assert sorted(folds.unique()) == list(range(n_folds))  # every row in a fold, no fold empty
    assert (folds.groupby(index["patient_id"]).nunique() == 1).all()


def test_the_trainer_takes_the_configs_boosted_subset(index):
    from training import trainer
    from training.config import TrainConfig

    config = TrainConfig(subset=0.25, seed=3, subset_boost=[1, 3, 1, 1, 1, 1])
    assert trainer.patient_subset(config, index).equals(
        subset_patients(index, fraction=0.25, seed=3, boost=dict.fromkeys(SUBTYPES[:1], 3.0) | {"none": 1.0}))
    assert trainer.patient_subset(TrainConfig(subset=0.25, seed=3), index).equals(
        subset_patients(index, fraction=0.25, seed=3))
    assert trainer.patient_subset(TrainConfig(), index) is index

