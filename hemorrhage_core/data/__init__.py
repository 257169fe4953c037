"""Data: label table, header index, patient-grouped splits, Dataset, preprocessed cache, DataLoader.

Names resolve lazily (PEP 562) so that importing the index functions does not import torch.

Typical use::

    idx = build_index(DATA)                      # labels + headers, saved as DATA/index.parquet
    train, val = split_train_val(idx.table, val_fraction=0.2, seed=0)
    prep = SlicePrep(224, head_crop=True)         # context=1: 2.5D, the slice and a neighbour a side
    cache = SliceCache.build(idx.table, DATA, prep=prep)
    ds = SliceDataset(usable_index(train, cache), DATA, stage=2, prep=prep, cache=cache,
                      augment=SliceAugment())
    loader = make_loader(ds, batch_size=32, shuffle=True, workers=2, seed=0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS: dict[str, str] = {
    "hash_id": "ids",
    "LabelTable": "labels_table",
    "read_labels": "labels_table",
    "pivot_labels": "labels_table",
    "DataIndex": "header_index",
    "IndexReport": "header_index",
    "build_index": "header_index",
    "index_folder": "header_index",
    "scan_headers": "header_index",
    "stage1_classes": "header_index",
    "INDEX_COLUMNS": "header_index",
    "patient_table": "splits",
    "patient_strata": "splits",
    "assign_folds": "splits",
    "fold_split": "splits",
    "split_train_val": "splits",
    "split_test": "splits",
    "subset_patients": "splits",
    "AugmentConfig": "augment",
    "SliceAugment": "augment",
    "SliceCache": "cache",
    "usable_index": "cache",
    "SliceDataset": "dataset",
    "IGNORE_INDEX": "dataset",
    "make_loader": "loader",
    "collate_skip_failed": "loader",
}

__all__ = [
    "AugmentConfig",
    "DataIndex",
    "IGNORE_INDEX",
    "INDEX_COLUMNS",
    "IndexReport",
    "LabelTable",
    "SliceAugment",
    "SliceCache",
    "SliceDataset",
    "assign_folds",
    "build_index",
    "collate_skip_failed",
    "fold_split",
    "hash_id",
    "index_folder",
    "make_loader",
    "patient_strata",
    "patient_table",
    "pivot_labels",
    "read_labels",
    "scan_headers",
    "split_train_val",
    "split_test",
    "stage1_classes",
    "subset_patients",
    "usable_index",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static type checkers see the real names
    from hemorrhage_core.data.augment import AugmentConfig, SliceAugment
    from hemorrhage_core.data.cache import SliceCache, usable_index
    from hemorrhage_core.data.dataset import IGNORE_INDEX, SliceDataset
    from hemorrhage_core.data.header_index import (
        INDEX_COLUMNS,
        DataIndex,
        IndexReport,
        build_index,
        index_folder,
        scan_headers,
        stage1_classes,
    )
    from hemorrhage_core.data.ids import hash_id
    from hemorrhage_core.data.labels_table import LabelTable, pivot_labels, read_labels
    from hemorrhage_core.data.loader import collate_skip_failed, make_loader
    from hemorrhage_core.data.splits import (
        assign_folds,
        fold_split,
        patient_strata,
        patient_table,
        split_train_val,
        subset_patients,
    )
