"""The RSNA 2019 (Kaggle) submission file, written as predictions arrive.

Format: a header ``ID,Label``, then six rows per image in ``LABELS`` order, ``ID_<hex>_<label>,<p>``
(the image id is the file's stem, as RSNA names files ``ID_<hex>.dcm``; the first file of a given stem
wins). Every image gets its rows: one that could not be predicted gets the fallback probabilities
(``fallback_probabilities``) and a line in the side file ``<name>.failed.csv`` (``image_id,file,reason``;
paths and reader messages, no header text).

Both files appear only once complete (``hemorrhage_core.fileio.atomic_file``): a crash or Ctrl-C
leaves the previous files, or none, never half a submission. Rows stream to the temporary file as they
come; with ``smooth`` only the id, probabilities, series and z of each image are kept (about 150 bytes
an image, never pixels) and written, smoothed along z by ``metrics.zsmooth`` (the weights evaluate uses),
when the writer closes. The ids written are remembered either way (repeats are dropped: Kaggle refuses a
file with a repeated ID).
"""

from __future__ import annotations

import csv
import io
import math
from array import array
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hemorrhage_core.labels import LABELS

HEADER = "ID,Label\n"
FAILED_COLUMNS = ("image_id", "file", "reason")
FAILED_SUFFIX = ".failed.csv"
# RSNA 2019 stage-2 training labels (752,803 slices): the share of positive slices per label. The base
# rate is the constant that minimises the expected log loss of a guess that knows nothing of the slice.
RSNA_PREVALENCE: dict[str, float] = {
    "epidural": 3_145 / 752_803,
    "intraparenchymal": 36_118 / 752_803,
    "intraventricular": 26_205 / 752_803,
    "subarachnoid": 35_675 / 752_803,
    "subdural": 47_166 / 752_803,
    "any": 107_933 / 752_803,
}
# A label absent from a small validation set must not get 0: one positive would cost the log loss ~35.
_FALLBACK_CLIP = (1e-3, 1.0 - 1e-3)


def failed_path(submission: str | PathLike) -> Path:
    """The side file listing what could not be predicted: ``sub.csv`` -> ``sub.failed.csv``."""
    path = Path(submission)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + FAILED_SUFFIX)


def fallback_probabilities(validation: Any = None) -> tuple[dict[str, float], str]:
    """(label -> probability for an image that could not be predicted, where the values come from).

    ``validation``: the run's validation predictions (a frame with ``true_<label>`` columns, as
    ``RunRecord.predictions``): their label prevalence, the model's own population, clipped to
    [0.001, 0.999]. Without any: the RSNA 2019 training prevalence.
    """
    columns = [f"true_{label}" for label in LABELS]
    if validation is not None and len(validation) and all(c in validation for c in columns):
        rates = validation[columns].astype(float).mean(axis=0).to_numpy()
        if np.isfinite(rates).all():
            lo, hi = _FALLBACK_CLIP
            values = {label: float(np.clip(r, lo, hi)) for label, r in zip(LABELS, rates, strict=True)}
            return values, f"label prevalence of the run's {len(validation)} validation images"
    return dict(RSNA_PREVALENCE), "RSNA 2019 stage-2 training prevalence"


def _csv_line(values: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode()


def _line(image_id: str, probabilities: Sequence[float]) -> bytes:
    # repr: the shortest text that reads back as the same float
    return "".join(f"{image_id}_{label},{float(p)!r}\n" for label, p in zip(LABELS, probabilities, strict=True)).encode()


class SubmissionWriter:
    """Write a submission image by image; use as a context manager (files appear on a clean exit only).

    ``fallback``: label -> probability for images that could not be predicted. ``smooth``: smooth each
    series along z before writing (images without a series or z, and fallback rows, stay as given).
    """

    def __init__(self, path: str | PathLike, fallback: Mapping[str, float], *, smooth: bool = False) -> None:
        self.path = Path(path)
        self.failed_path = failed_path(self.path)
        self.fallback = [float(fallback[label]) for label in LABELS]
        self.smooth = smooth
        self.n_images = 0
        self.n_failed = 0
        self.n_duplicates = 0
        self._seen: set[str] = set()
        self._stack: ExitStack | None = None
        self._out: BinaryIO | None = None
        self._failed: BinaryIO | None = None
        # smoothing buffer: one entry per image, in order; series as small ints, -1 for none
        self._ids: list[str] = []
        self._probs = array("d")
        self._series = array("q")
        self._z = array("d")
        self._series_codes: dict[str, int] = {}

    def __enter__(self) -> SubmissionWriter:
        from hemorrhage_core.fileio import atomic_file

        with ExitStack() as stack:
            self._out = stack.enter_context(atomic_file(self.path))
            self._failed = stack.enter_context(atomic_file(self.failed_path))
            self._stack = stack.pop_all()
        self._out.write(HEADER.encode())
        self._failed.write(_csv_line(FAILED_COLUMNS))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is not None:  # both temporary files go; the previous files (if any) stay
            return bool(stack.__exit__(exc_type, exc, tb))
        with stack:  # both files appear, or, if the smoothing fails, neither
            if self.smooth:
                self._write_smoothed()
        return False

    def add(self, image_id: str, probabilities: Sequence[float], *, series: str | None = None,
            z: float | None = None) -> bool:
        """One image's six probabilities (LABELS order); False (and nothing written) for a repeated id."""
        if not self._first(image_id):
            return False
        self.n_images += 1
        if not self.smooth:
            self._out.write(_line(image_id, probabilities))
            return True
        code = -1
        if series is not None and z is not None and math.isfinite(z):
            code = self._series_codes.setdefault(series, len(self._series_codes))
        self._ids.append(image_id)
        self._probs.extend(float(p) for p in probabilities)
        self._series.append(code)
        self._z.append(float(z) if code >= 0 else math.nan)
        return True

    def add_failed(self, file: str, reason: str, image_id: str | None) -> bool:
        """An input that could not be predicted: a side-file line, and fallback rows when it names an
        image (``image_id`` None: e.g. an empty folder). False when the image id was already written."""
        self.n_failed += 1
        self._failed.write(_csv_line((image_id or "", file, reason)))
        if image_id is None:
            return False
        return self.add(image_id, self.fallback)

    def _first(self, image_id: str) -> bool:
        if image_id in self._seen:
            self.n_duplicates += 1
            return False
        self._seen.add(image_id)
        return True

    def _write_smoothed(self) -> None:
        from hemorrhage_core.metrics import zsmooth

        n = len(self._ids)
        probs = np.frombuffer(self._probs, dtype=np.float64).reshape(n, len(LABELS)).copy()
        series = np.frombuffer(self._series, dtype=np.int64)
        placed = series >= 0
        if placed.any():
            probs[placed] = zsmooth(probs[placed], series[placed], np.frombuffer(self._z, dtype=np.float64)[placed])
        for image_id, row in zip(self._ids, probs, strict=True):
            self._out.write(_line(image_id, row))
