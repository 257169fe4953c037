"""Patient-grouped splits: train/validation, k folds and a patient subset, stratified and seeded.

Adjacent slices are near duplicates, so every split is by patient. Each patient is stratified on the
rarest label they have (rarity = fewest positive patients in the index), so rare types such as
epidural spread over both sides instead of landing by chance on one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from hemorrhage_core.errors import DatasetError
from hemorrhage_core.labels import LABELS, SUBTYPES

NO_HEMORRHAGE = "none"


def patient_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: ``n_images``, a 0/1 column per label (positive on any slice) and ``stratum``.

    ``stratum`` is the rarest subtype the patient has, or ``"none"``.
    """
    _require_labels(index)
    grouped = index.groupby("patient_id", sort=True)
    table = grouped[list(LABELS)].max().astype(np.int8)
    table.insert(0, "n_images", grouped.size().astype(np.int64))
    # Rarest first; ties keep LABELS order, so the result is deterministic.
    counts = table[list(SUBTYPES)].sum()
    by_rarity = sorted(SUBTYPES, key=lambda name: (counts[name], SUBTYPES.index(name)))
    stratum = pd.Series(NO_HEMORRHAGE, index=table.index, dtype=object)
    for name in reversed(by_rarity):  # the rarest label is written last and wins
        stratum[table[name] > 0] = name
    table["stratum"] = stratum
    return table


def patient_strata(index: pd.DataFrame) -> pd.Series:
    """``patient_id -> stratum`` (the rarest subtype the patient has, or ``"none"``)."""
    return patient_table(index)["stratum"]


def assign_folds(index: pd.DataFrame, *, n_folds: int = 5, seed: int = 0) -> pd.Series:
    """Fold number (0..n_folds-1) for every row of ``index``; all slices of a patient share one fold.

    Uses sklearn's StratifiedGroupKFold with the patient's stratum as the class and the patient as
    the group, shuffled with ``seed``.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if n_folds < 2:
        raise DatasetError(f"need at least 2 folds, got {n_folds}")
    strata = patient_strata(index)
    n_patients = len(strata)
    if n_patients < n_folds:
        raise DatasetError(f"cannot make {n_folds} patient-disjoint folds from {n_patients} patients")
    groups = index["patient_id"].to_numpy()
    y = strata.reindex(index["patient_id"]).to_numpy()
    # Finest stratification first; on tiny sets where every stratum is smaller than the number of
    # folds, sklearn refuses it, so fall back to hemorrhage/none, then to plain grouped folds.
    attempts = (
        (StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed), y),
        (StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed), y != NO_HEMORRHAGE),
        (GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed), None),
    )
    for splitter, classes in attempts:
        folds = np.full(len(index), -1, dtype=np.int64)
        try:
            with warnings.catch_warnings():
                # Rare strata with fewer patients than folds are expected (epidural on small sets).
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(index)), classes, groups)):
                    folds[held_out] = fold
        except ValueError:
            continue
        if len(np.unique(folds)) == n_folds:  # greedy stratification can leave a fold empty on tiny sets
            break
    return pd.Series(folds, index=index.index, name="fold")


def fold_split(index: pd.DataFrame, folds: pd.Series, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) rows for one fold of ``assign_folds``."""
    held_out = (folds == fold).to_numpy()
    if not held_out.any():
        raise DatasetError(f"fold {fold} is empty (folds present: {sorted(set(folds.tolist()))})")
    return index[~held_out], index[held_out]


def split_train_val(
    index: pd.DataFrame, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-disjoint (train, validation) rows, the validation share the nearest 1/k to ``val_fraction``.

    Of the k stratified folds, the validation side is the one that leaves the most labels with
    positives on both sides (ties broken by a seeded order), so every label present in at least two
    patients tends to be seen in both.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise DatasetError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n_folds = max(2, round(1.0 / val_fraction))
    n_patients = index["patient_id"].nunique()
    if n_patients < n_folds:
        # Say it in the terms the user chose (val_fraction), not the folds it is built from.
        raise DatasetError(
            f"a validation fraction of {val_fraction:g} needs at least {n_folds} patients, the data has "
            f"{n_patients}: add patients or raise val_fraction (at most 0.5, which needs 2)"
        )
    folds = assign_folds(index, n_folds=n_folds, seed=seed)
    order = np.random.default_rng(seed).permutation(n_folds)
    best, best_score = None, -1
    for fold in order:
        train, val = fold_split(index, folds, int(fold))
        score = sum(bool(train[name].any() and val[name].any()) for name in LABELS)
        if score > best_score:
            best, best_score = (train, val), score
    assert best is not None
    return best


def split_test(index: pd.DataFrame, *, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patient-disjoint (rest, test) rows: a held-out test set of ``fraction`` of the patients.

    Stratified on ``any`` at patient level (patients with and without a bleed keep their mix), drawn
    with ``seed`` from a random stream of its own, so the validation split made later from ``rest``
    does not depend on it. The same index, fraction and seed always give the same test patients.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"test fraction must be in (0, 1), got {fraction}")
    patients = patient_table(index)
    total = len(patients)
    n_test = round(fraction * total)
    if n_test < 1 or n_test >= total:
        raise DatasetError(
            f"a test fraction of {fraction:g} of {total} patients leaves "
            f"{'no test patient' if n_test < 1 else 'no patient to train on'}: add patients or change it"
        )
    strata = patients["any"].map({0: "none", 1: "any"})
    quota = _allocate(strata.value_counts().sort_index(), n_test, 1)
    # A stream of its own (the seed plus a fixed tag) keeps the test draw apart from the other splits.
    rng = np.random.default_rng([seed, 0x7E57])
    chosen: list[str] = []
    for name, k in quota.items():
        members = np.sort(strata.index[strata == name].to_numpy())
        chosen.extend(rng.choice(members, size=int(k), replace=False).tolist())
    held_out = index["patient_id"].isin(chosen).to_numpy()
    return index[~held_out], index[held_out]


def subset_patients(
    index: pd.DataFrame,
    *,
    fraction: float | None = None,
    n_patients: int | None = None,
    seed: int = 0,
    min_per_stratum: int = 1,
    boost: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Rows of a seeded random subset of patients that keeps the patient strata mix.

    Give ``fraction`` (0-1] or ``n_patients``. Each stratum gets its proportional share (largest
    remainder rounding), at least ``min_per_stratum`` patients while the total allows, so rare types
    are not lost from a small subset. ``boost`` multiplies chosen strata's shares (``{"epidural": 3}``:
    three times its proportional share, at most all of its patients; the other strata share the rest
    in proportion), so a small subset can hold more of a rare type's patients than its share.
    """
    strata = patient_strata(index)
    total = len(strata)
    if (fraction is None) == (n_patients is None):
        raise DatasetError("give exactly one of fraction or n_patients")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise DatasetError(f"fraction must be in (0, 1], got {fraction}")
        n_patients = max(1, round(fraction * total))
    assert n_patients is not None
    if not 1 <= n_patients <= total:
        raise DatasetError(f"n_patients must be between 1 and {total}, got {n_patients}")

    sizes = strata.value_counts().sort_index()
    weights = pd.Series(1.0, index=sizes.index)
    for name, factor in (boost or {}).items():
        if name not in (NO_HEMORRHAGE, *SUBTYPES):
            raise DatasetError(f"cannot boost {name!r}: the strata are {NO_HEMORRHAGE} and {', '.join(SUBTYPES)}")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise DatasetError(f"the boost of {name} must be a finite number >= 1, got {factor}")
        if name in weights.index:  # a type no patient has has no stratum to boost
            weights[name] = float(factor)
    quota = _allocate(sizes, n_patients, min_per_stratum, weights)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for name, k in quota.items():
        members = np.sort(strata.index[strata == name].to_numpy())
        chosen.extend(rng.choice(members, size=int(k), replace=False).tolist())
    return index[index["patient_id"].isin(chosen)]


def _shares(sizes: pd.Series, n: int, weights: pd.Series) -> pd.Series:
    """Real-valued shares of ``n`` proportional to ``sizes * weights``, none above its stratum's size.

    A stratum whose share would exceed its size gets all of its patients and the others share what is
    left, again in proportion (water-filling); with equal weights this is ``sizes / sizes.sum() * n``.
    """
    exact = pd.Series(0.0, index=sizes.index)
    open_, left = sizes.index, float(n)
    while len(open_):
        weighted = sizes[open_] * weights[open_]
        share = weighted / weighted.sum() * left
        full = share.index[share >= sizes[share.index]]
        if not len(full):
            exact[open_] = share
            break
        exact[full] = sizes[full]
        left -= float(sizes[full].sum())
        open_ = open_.difference(full)
    return exact


def _allocate(sizes: pd.Series, n: int, minimum: int, weights: pd.Series | None = None) -> pd.Series:
    """Split ``n`` over strata proportionally to ``sizes`` (times ``weights``; largest remainder), with a
    floor."""
    # Unboosted, the plain proportion: the arithmetic of every split and subset made before boosts existed.
    exact = sizes / sizes.sum() * n if weights is None or (weights == 1.0).all() else _shares(sizes, n, weights)
    quota = np.floor(exact).astype(int)
    floor = np.minimum(sizes, minimum)
    if floor.sum() <= n:
        quota = np.maximum(quota, floor)
    # Trim from the biggest strata if the floors pushed us over, then hand out the remainder.
    while quota.sum() > n:
        quota[(quota - floor).idxmax()] -= 1
    remainder = (exact - np.floor(exact)).sort_values(ascending=False, kind="stable")
    for name in remainder.index:
        if quota.sum() >= n:
            break
        if quota[name] < sizes[name]:
            quota[name] += 1
    for name in sizes.index:  # still short (tiny strata were full): fill from any with room
        while quota.sum() < n and quota[name] < sizes[name]:
            quota[name] += 1
    return quota


def _require_labels(index: pd.DataFrame) -> None:
    missing = [c for c in ("patient_id", *LABELS) if c not in index.columns]
    if missing:
        raise DatasetError(f"the index lacks columns {missing}")
    if index[list(LABELS)].isna().any().any():
        raise DatasetError("splits need labels; this index has images without labels")
    if index.empty:
        raise DatasetError("the index is empty")
