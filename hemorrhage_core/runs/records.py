"""What a run directory holds, shared by the writer, the lock and the reader: file names, columns,
the format version, the errors, and how run.json and the CSV files are encoded and read back."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__package__)  # "hemorrhage_core.runs", as before the split

FORMAT_VERSION = 1

RUN_JSON = "run.json"
METRICS_CSV = "metrics.csv"
PREDICTIONS_CSV = "predictions.csv"
SPLIT_CSV = "split.csv"
GALLERY_DIR = "gallery"
GALLERY_INDEX = "gallery/index.csv"
GRID_RESULTS_CSV = "grid_results.csv"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train.log"
WRITER_LOCK = ".writer.lock"
DEFAULT_MODEL_FILE = "checkpoints/best.pt"

KINDS = ("train", "grid")
STATUSES = ("running", "finished", "failed", "interrupted")
FINAL_STATUSES = ("finished", "failed", "interrupted")
MALFORMED = "malformed"  # reader-only status: the run's files cannot be understood

METRICS_COLUMNS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_weighted_log_loss",
    "val_auc_mean",
    *(f"val_auc_{label}" for label in LABELS),
    "val_zs_weighted_log_loss",
    "val_zs_auc_any",
    "lr",
    "seconds",
)
TRUE_COLUMNS: tuple[str, ...] = tuple(f"true_{label}" for label in LABELS)
PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{label}" for label in LABELS)
PREDICTION_COLUMNS: tuple[str, ...] = ("image_id", "patient", "series", "z", *TRUE_COLUMNS, *PROB_COLUMNS)
GALLERY_COLUMNS: tuple[str, ...] = ("image_id", "input_png", "aligned_png", "theta", *TRUE_COLUMNS, *PROB_COLUMNS)

# Run ids and gallery image ids become file names: letters, digits, '.', '_', '-' only, no leading dot.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_STRING_COLUMNS = {"image_id": str, "patient": str, "series": str, "input_png": str, "aligned_png": str, "theta": str}


class RunFormatError(HemorrhageError):
    """A run directory or one of its files is missing, malformed or from a newer, unknown format."""


class RunBusyError(HemorrhageError):
    """Another live process is writing the run (it holds the run's writer lock)."""


class RunNotFoundError(HemorrhageError):
    """No run of that id is present in the runs folder (or the id is not a plain run name)."""


# ------------------------------------------------------------------------------------------ time
def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with a ``Z`` suffix, to the second: ``2026-11-27T10:16:00Z``."""
    moment = moment or utc_now()
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------- CSV
def csv_line(values: Sequence[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode("utf-8")


def csv_cell(value: Any) -> Any:
    """A CSV cell: None and non-finite floats are empty; floats keep full precision (repr)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return value


def read_csv_tolerant(path: str | PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a run CSV, dropping a torn last line (and, with a warning, any malformed line).

    A missing or empty file gives an empty frame with ``columns``. Id-like columns stay strings.
    """
    import pandas as pd

    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        data = b""
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # rfind == -1 keeps nothing: the header itself was torn
    if not data.strip():
        return pd.DataFrame(columns=list(columns or ()))
    dtype = dict(_STRING_COLUMNS)
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=dtype, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError):
        log.warning("%s has malformed lines; skipping them", target.name)
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=dtype, on_bad_lines="skip", encoding_errors="replace")
        except (pd.errors.ParserError, ValueError) as exc:
            raise RunFormatError(f"{target.name} cannot be read as CSV: {exc}") from exc
    if columns is not None:
        for c in columns:
            if c not in frame.columns:
                frame[c] = float("nan")
    return frame


# ------------------------------------------------------------------------------------------ JSON
def jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses and mappings to dicts, tuples/sets to lists, paths to strings,
    numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())  # numpy arrays and scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def dumps_json(value: Any) -> str:
    """Strict, stable JSON text for run records (sorted keys, no NaN)."""
    return json.dumps(jsonable(value), indent=2, sort_keys=True, allow_nan=False) + "\n"


def format_major(value: Any) -> int:
    """Major version of a ``format_version`` value (``1``, ``"1"``, ``"1.2"``); RunFormatError if unreadable."""
    if isinstance(value, bool):
        raise RunFormatError(f"format_version is not a version number: {value!r}")
    try:
        major = int(str(value).split(".", 1)[0]) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise RunFormatError(f"format_version is not a version number: {value!r}") from exc
    if isinstance(value, float) and not math.isfinite(value):
        raise RunFormatError(f"format_version is not a version number: {value!r}")
    return major


def check_format_version(info: Mapping[str, Any]) -> int:
    """Return the run's major format version; RunFormatError if missing, invalid or newer than this code."""
    if "format_version" not in info:
        raise RunFormatError("run.json has no format_version")
    major = format_major(info["format_version"])
    if major > FORMAT_VERSION:
        raise RunFormatError(
            f"this run was written in run format {info['format_version']}, newer than the format "
            f"{FORMAT_VERSION} this version of hemorrhage_core reads; upgrade the package to open it"
        )
    if major < 1:
        raise RunFormatError(f"format_version {info['format_version']!r} is not a known run format")
    return major


def load_run_json(run_dir: str | PathLike) -> dict[str, Any]:
    """Read and check ``run.json`` (a JSON object with a readable format_version); RunFormatError if not."""
    path = Path(run_dir) / RUN_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RunFormatError("no run.json (the run is being created, or is not a run)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFormatError(f"run.json cannot be read: {type(exc).__name__}") from exc
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFormatError(f"run.json is not valid JSON (line {exc.lineno})") from exc
    if not isinstance(info, dict):
        raise RunFormatError("run.json does not hold a JSON object")
    check_format_version(info)
    return info

