"""A slice's neighbours in its series, for 2.5D input (``SlicePrep.context``).

Within each series, slices are ordered by ``slice_rank`` (the rank of z the index computed; the
Predictor sorts by z the same way) and each slice gets the ``context`` slices below and above it, the
first and last slice repeated past the series' ends (``preprocess.context_positions``). Only the rows
given take part: a slice left out (failed to decode, another split) is skipped over, not filled in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hemorrhage_core.preprocess import context_positions


def context_ids(rows: pd.DataFrame, context: int) -> dict[str, tuple[str, ...]]:
    """image_id -> the ids of its ``2 context + 1`` stack, lowest z first (itself in the middle).

    A row without a series or a position (no ``series_uid`` / ``slice_rank`` column, or a missing
    value) stands alone: its stack repeats it.
    """
    ids = rows["image_id"].astype(str).to_numpy()
    out: dict[str, tuple[str, ...]] = {i: (i,) * (2 * context + 1) for i in ids}
    if context == 0 or not {"series_uid", "slice_rank"} <= set(rows.columns):
        return out
    placed = rows[rows["series_uid"].notna() & rows["slice_rank"].notna()]
    ordered = placed.sort_values(["series_uid", "slice_rank", "image_id"], kind="stable")
    series = ordered["series_uid"].astype(str).to_numpy()
    ordered_ids = ordered["image_id"].astype(str).to_numpy()
    if len(series) == 0:
        return out
    # Boundaries of each series' run in the sorted table; positions are taken within each run.
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    ends = np.r_[starts[1:], len(series)]
    for start, end in zip(starts, ends, strict=True):
        members = ordered_ids[start:end]
        for i, row in enumerate(context_positions(len(members), context)):
            out[members[i]] = tuple(members[row])
    return out
