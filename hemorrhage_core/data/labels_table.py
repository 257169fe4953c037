"""Read the RSNA long-format label CSV (``ID,Label``, six rows per image) into one row per image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.errors import DatasetError
from hemorrhage_core.labels import LABELS, SUBTYPES

log = logging.getLogger(__name__)

# How many ids a warning names before it says "and N more"; the report object keeps them all.
_IDS_IN_WARNING = 10


@dataclass(frozen=True)
class LabelTable:
    """One row per image: ``frame`` is indexed by ``image_id`` (sorted) with the six labels as int8.

    The other fields report what was odd in the CSV; none of it is fatal.
    """

    frame: pd.DataFrame
    rows_read: int
    duplicates_dropped: int
    conflicting_ids: tuple[str, ...] = ()  # same image and label given as both 0 and 1: 1 kept
    incomplete_ids: tuple[str, ...] = ()  # fewer than six label rows: left out
    any_mismatch_ids: tuple[str, ...] = ()  # ``any`` is not the OR of the five subtypes: kept as given
    unknown_label_rows: int = 0  # IDs whose suffix is not one of LABELS: ignored
    notes: tuple[str, ...] = ()  # the warnings logged while reading, in words


def split_label_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``ID_<hex>_<subtype>`` -> (image id ``ID_<hex>``, subtype); the subtype is the last ``_`` part."""
    if ids.empty:
        empty = pd.Series([], dtype=object, index=ids.index)
        return empty, empty.copy()
    parts = ids.astype(str).str.rpartition("_")
    return parts[0], parts[2]


def pivot_labels(long: pd.DataFrame) -> LabelTable:
    """Pivot a long ``ID,Label`` frame to one row per image (see ``read_labels``)."""
    missing = {"ID", "Label"} - set(long.columns)
    if missing:
        raise DatasetError(f"the label table needs columns ID and Label; missing {sorted(missing)}")
    rows_read = len(long)
    long = long[["ID", "Label"]].dropna(subset=["ID"])
    if long.empty:
        raise DatasetError("the label table has no rows")
    labels = pd.to_numeric(long["Label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        examples = long.loc[bad, "ID"].head(3).tolist()
        raise DatasetError(
            f"{int(bad.sum())} label rows are not 0 or 1 (for example {examples}); "
            "is this a submission file with probabilities rather than a training label file?"
        )
    long = pd.DataFrame({"ID": long["ID"].astype(str), "Label": labels.astype(np.int8)})

    before = len(long)
    long = long.drop_duplicates()
    duplicates_dropped = before - len(long)

    image_id, subtype = split_label_ids(long["ID"])
    known = subtype.isin(LABELS)
    unknown_rows = int((~known).sum())
    long = pd.DataFrame({"image_id": image_id[known], "label": subtype[known], "value": long["Label"][known]})

    # After exact duplicates are gone, a repeated (image, label) pair means the CSV disagrees with itself.
    repeated = long.duplicated(subset=["image_id", "label"], keep=False)
    conflicting = tuple(sorted(long.loc[repeated, "image_id"].unique()))

    wide = long.groupby(["image_id", "label"], sort=False)["value"].max().unstack("label")
    wide = wide.reindex(columns=list(LABELS))
    complete = wide.notna().all(axis=1)
    incomplete = tuple(sorted(wide.index[~complete]))
    wide = wide[complete].astype(np.int8).sort_index()
    wide.index.name = "image_id"
    wide.columns.name = None

    any_or = wide[list(SUBTYPES)].max(axis=1)
    any_mismatch = tuple(wide.index[wide["any"] != any_or])

    notes = _notes(conflicting, incomplete, any_mismatch, unknown_rows)
    for note in notes:
        log.warning(note)
    return LabelTable(
        frame=wide,
        rows_read=rows_read,
        duplicates_dropped=duplicates_dropped,
        conflicting_ids=conflicting,
        incomplete_ids=incomplete,
        any_mismatch_ids=any_mismatch,
        unknown_label_rows=unknown_rows,
        notes=notes,
    )


def read_labels(csv_path: str | PathLike) -> LabelTable:
    """Read ``stage_2_train.csv``: exact duplicate rows dropped, pivoted to the six labels in LABELS order."""
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    try:
        long = pd.read_csv(path, dtype={"ID": str}, usecols=lambda c: c in ("ID", "Label"))
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the label file {path}: {exc}") from exc
    return pivot_labels(long)


def describe_ids(ids: tuple[str, ...] | list[str], limit: int = _IDS_IN_WARNING) -> str:
    """``a, b, c and 7 more``: a bounded list of ids for a log line."""
    shown = ", ".join(list(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _notes(
    conflicting: tuple[str, ...], incomplete: tuple[str, ...], any_mismatch: tuple[str, ...], unknown_rows: int
) -> tuple[str, ...]:
    checks = (
        (conflicting, "images have conflicting duplicate label rows (1 kept)"),
        (incomplete, "images lack some of the six label rows and are left out"),
        (any_mismatch, "images have 'any' different from the OR of the five subtypes (kept as given)"),
    )
    notes = [f"{len(ids)} {what}: {describe_ids(ids)}" for ids, what in checks if ids]
    if unknown_rows:
        notes.append(f"{unknown_rows} label rows name no known label and are ignored")
    return tuple(notes)
