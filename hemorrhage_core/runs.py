"""Run directories: the only contract between training and the dashboard (see docs/run-format.md).

Writing: ``RunWriter`` creates ``RUNS_DIR/<run_id>/`` and keeps ``run.json`` current with atomic
replaces; ``metrics.csv`` and ``train.log`` only grow, one flushed and fsynced line at a time; every other
file (predictions, gallery index and images, grid results) is replaced atomically. A reader beside a
running writer therefore sees either the old or the new version of a file, or a CSV whose last line
may be torn, which the readers here drop.

Reading: ``list_runs`` summarises every run in a folder and never raises (a damaged run is listed with
status ``malformed`` and a reason); ``read_run`` loads one run; ``resolve_run`` turns a run id chosen in a
UI into a path only if a run of that name is actually on disk.

pandas and PIL are imported inside the functions that need them, so ``list_runs`` stays light.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

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
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_STRING_COLUMNS = {"image_id": str, "patient": str, "series": str, "input_png": str, "aligned_png": str, "theta": str}


class RunFormatError(HemorrhageError):
    """A run directory or one of its files is missing, malformed or from a newer, unknown format."""


class RunBusyError(HemorrhageError):
    """Another live process is writing the run (it holds the run's writer lock)."""


class RunNotFoundError(HemorrhageError):
    """No run of that id is present in the runs folder (or the id is not a plain run name)."""


# ------------------------------------------------------------------------------- small file helpers
def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with a ``Z`` suffix, to the second: ``2026-11-27T10:16:00Z``."""
    moment = moment or utc_now()
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; some file systems refuse O_RDONLY dirs.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Temporary files of atomic_file: mkstemp's ".<file name>.<8 random characters>.tmp", in the same folder.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@contextmanager
def atomic_file(path: str | PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears under ``path`` only once complete: readers see the old file or the
    new one, never a part.

    What is written goes to a temporary file in the same folder, is fsynced, then renamed over ``path``.
    On any failure (disk full included) the temporary file is removed and ``path`` is untouched; only a
    killed process leaves one behind (``remove_stale_temp_files``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as fh:
        fh.write(data)


def remove_stale_temp_files(run_dir: str | PathLike) -> list[Path]:
    """Delete the temporary files that atomic writes of a killed process left in a run (its folder,
    checkpoints/ and gallery/) and return them. A checkpoint's can be as large as the checkpoint, and
    only a dead writer leaves one, so ``train --resume`` runs this once it holds the run's lock."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR, Path(run_dir) / GALLERY_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP_NAME.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_write_text(path: str | PathLike, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def _cut_torn_tail(fh) -> None:
    """Truncate an append-only file back to its last complete line (a crash can leave half a line)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    # Scan back in blocks for the last newline; a file with none is all torn.
    pos, keep = size, 0
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        fh.seek(pos)
        block = fh.read(step)
        idx = block.rfind(b"\n")
        if idx >= 0:
            keep = pos + idx + 1
            break
    fh.truncate(keep)
    log.warning("dropped a torn last line from %s", Path(fh.name).name)


def _csv_line(values: Sequence[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode("utf-8")


def _cell(value: Any) -> Any:
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


def append_csv_row(path: str | PathLike, row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Append one row to an append-only CSV, writing the header first if the file is new or empty.

    The line is written with one ``write`` then flushed and fsynced, so a crash loses at most this
    line. A torn last line left by an earlier crash is cut off first. Keys not in ``columns`` are
    refused (a typo would silently lose a metric); missing keys are left empty.
    """
    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"unknown columns for {Path(path).name}: {sorted(unknown)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as fh:
        _cut_torn_tail(fh)
        fh.seek(0)
        header = fh.readline()
        if not header:
            fh.write(_csv_line(columns))
        elif header.decode("utf-8", "replace").rstrip("\r\n") != _csv_line(columns).decode().rstrip("\n"):
            raise RunFormatError(f"{target.name} has other columns than this writer's; not appending")
        fh.seek(0, os.SEEK_END)
        fh.write(_csv_line([_cell(row.get(c)) for c in columns]))
        fh.flush()
        os.fsync(fh.fileno())


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


# ------------------------------------------------------------------------------------ JSON helpers
def _jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses and mappings to dicts, tuples/sets to lists, paths to strings,
    numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())  # numpy arrays and scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def dumps_json(value: Any) -> str:
    """Strict, stable JSON text for run records (sorted keys, no NaN)."""
    return json.dumps(_jsonable(value), indent=2, sort_keys=True, allow_nan=False) + "\n"


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


# ------------------------------------------------------------------------------------------ writer
def _safe_token(text: str) -> str:
    token = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return token or "model"


def new_run_id(backbone: str, stage: int, *, kind: str = "train", moment: datetime | None = None) -> str:
    """``<UTC yyyymmdd-HHMMSS>-<backbone>-s<stage>-<4 hex>``; grid runs put ``grid-`` before the backbone."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    stamp = (moment or utc_now()).astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    prefix = "grid-" if kind == "grid" else ""
    return f"{stamp}-{prefix}{_safe_token(backbone)}-s{int(stage)}-{secrets.token_hex(2)}"


def package_versions() -> dict[str, str | None]:
    """Versions of python, torch, torchvision and hemorrhage_core (without importing torch)."""
    from importlib import metadata

    import hemorrhage_core

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "hemorrhage_core": hemorrhage_core.__version__,
    }


def git_commit() -> str | None:
    """The source checkout's commit (suffixed ``+dirty`` if it has local changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


_DATA_KEYS = ("dir", "fingerprint", "n_images", "n_train", "n_val", "n_patients_train", "n_patients_val", "skipped")
_SPLIT_KEYS = ("seed", "val_fraction", "val_patients")


def _complete(section: Mapping[str, Any] | None, keys: Iterable[str]) -> dict[str, Any]:
    out = {k: None for k in keys}
    out.update(dict(section or {}))
    if "skipped" in out and out["skipped"] is None:
        out["skipped"] = []
    return out


@dataclass(frozen=True)
class GalleryEntry:
    """One gallery slice: windowed input and STN-aligned images (uint8/float arrays or PNG bytes)."""

    image_id: str
    input_image: Any
    aligned_image: Any
    theta: Sequence[float]  # the 2x3 affine, row-major
    true: Sequence[int]  # six labels in LABELS order
    prob: Sequence[float]  # six probabilities in LABELS order


def encode_png(image: Any) -> bytes:
    """PNG bytes of an image: bytes pass through; arrays (H,W), (H,W,C) or (C,H,W) with C in 1/3/4,
    uint8 or float in [0, 1], are encoded with Pillow."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    import numpy as np
    from PIL import Image

    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"cannot encode an image of shape {arr.shape} as PNG")
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _six(values: Any, what: str) -> list:
    if isinstance(values, Mapping):
        values = [values[label] for label in LABELS]
    items = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(items) != len(LABELS):
        raise ValueError(f"{what} needs {len(LABELS)} values in LABELS order, got {len(items)}")
    return items


_held_lock_fds: set[int] = set()  # lock descriptors this process holds, closed in forked children


def _close_held_locks_in_child() -> None:
    # A DataLoader worker (or any fork) must not keep a run's lock alive after its trainer dies.
    for fd in _held_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _unlock(fd: int) -> None:
    _held_lock_fds.discard(fd)
    os.close(fd)


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``RUN_DIR/.writer.lock``, held while a process writes a run.

    ``flock`` belongs to the open file, so reading the lock file elsewhere in the process cannot drop it
    (as it would a POSIX lock), and a second writer in the same process is refused too. Forked children
    (DataLoader workers) close their copy at once and the descriptor is close-on-exec, so the lock lives
    exactly as long as its owner: a killed trainer's run can be resumed straight away. Released by
    ``release()``, on garbage collection, or when the process ends.
    """

    def __init__(self, fd: int | None):
        self._finalizer = weakref.finalize(self, _unlock, fd) if fd is not None else None

    @classmethod
    def acquire(cls, run_dir: str | PathLike) -> WriterLock:
        """Take the run's lock, or raise RunBusyError naming the process that holds it (from run.json)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return cls(None)
        path = Path(run_dir)
        fd = os.open(path / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = ""
            try:
                writer = json.loads((path / RUN_JSON).read_text(encoding="utf-8")).get("writer") or {}
                holder = f" (process {writer.get('pid')} on {writer.get('host')}, by its run.json)"
            except (OSError, ValueError, AttributeError):
                pass
            raise RunBusyError(
                f"run {path.name} is being written by another process{holder}; "
                "wait for it to end or stop it, then resume"
            ) from None
        _held_lock_fds.add(fd)
        return cls(fd)

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes once; later calls do nothing


class RunWriter:
    """Create and update one run directory. Only one process (rank 0) may write a run.

    Use as a context manager to close the run: a normal exit leaves the status to the caller (call
    ``finish``); an exception marks it ``failed`` (``interrupted`` for KeyboardInterrupt) with the
    error's message, then re-raises.
    """

    def __init__(self, path: Path, record: dict[str, Any], lock: WriterLock | None = None):
        self.path = Path(path)
        self._record = record
        self._lock = lock
        self._opened = time.monotonic()
        self._base_duration = float(record.get("duration_s") or 0.0)

    # -- creation
    @classmethod
    def create(
        cls,
        runs_dir: str | PathLike,
        *,
        backbone: str,
        stage: int,
        config: Any,
        kind: str = "train",
        parent_run: str | None = None,
        data: Mapping[str, Any] | None = None,
        split: Mapping[str, Any] | None = None,
        epochs_planned: int | None = None,
        device: str | None = None,
        world_size: int = 1,
        model_file: str = DEFAULT_MODEL_FILE,
        extra: Mapping[str, Any] | None = None,
    ) -> RunWriter:
        """Make ``runs_dir/<new run id>/`` (never reusing a folder) and write its first run.json.

        ``config`` is the full training configuration (a dataclass or mapping); ``data`` and ``split``
        take the keys of docs/run-format.md (missing ones are null); ``extra`` adds top-level fields
        (for grid runs: grid, scoring, folds).
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        root = Path(runs_dir)
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            run_id = new_run_id(backbone, stage, kind=kind)
            path = root / run_id
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue  # same second and same 4 hex: draw again
        else:
            raise RunFormatError(f"could not find a free run id in {root}")
        now = iso_utc()
        record: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "id": run_id,
            "kind": kind,
            "backbone": backbone,
            "stage": int(stage),
            "parent_run": parent_run,
            "status": "running",
            "error": None,
            "created": now,
            "updated": now,
            "finished": None,
            "duration_s": 0.0,
            "config": _jsonable(config),
            "data": _jsonable(_complete(data, _DATA_KEYS)),
            "split": _jsonable(_complete(split, _SPLIT_KEYS)),
            "versions": package_versions(),
            "git_commit": git_commit(),
            "device": device,
            "world_size": int(world_size),
            "model_file": model_file,
            "best": None,
            "last_epoch": None,
            "epochs_planned": epochs_planned,
            # Lets a reader tell a live run from one whose process was killed (see list_runs).
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        if extra:
            clash = set(extra) & set(record)
            if clash:
                raise ValueError(f"extra fields would overwrite contract fields: {sorted(clash)}")
            record.update(_jsonable(dict(extra)))
        writer = cls(path, record, WriterLock.acquire(path))
        writer._write()
        (path / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        return writer

    @classmethod
    def reopen(cls, run_dir: str | PathLike, lock: WriterLock | None = None) -> RunWriter:
        """Continue an existing run (``train --resume``): status back to running, error cleared.

        Takes the run's writer lock (or uses ``lock``, taken earlier by the caller): a run that another
        live process is still writing is refused with RunBusyError.
        """
        path = Path(run_dir)
        lock = lock or WriterLock.acquire(path)
        record = load_run_json(path)
        writer = cls(path, record, lock)
        writer.update(
            status="running",
            error=None,
            finished=None,
            writer={"host": socket.gethostname(), "pid": os.getpid()},
        )
        return writer

    # -- record access
    @property
    def id(self) -> str:
        return str(self._record["id"])

    @property
    def record(self) -> dict[str, Any]:
        """A copy of run.json as last written."""
        return json.loads(json.dumps(self._record))

    def _write(self) -> None:
        atomic_write_text(self.path / RUN_JSON, dumps_json(self._record))

    def update(self, **fields: Any) -> None:
        """Set top-level run.json fields and rewrite it atomically (``updated`` and ``duration_s`` too)."""
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {fields['status']!r}")
        for key in ("format_version", "id"):
            if key in fields and fields[key] != self._record.get(key):
                raise ValueError(f"{key} of a run cannot change")
        self._record.update(_jsonable(fields))
        self._record["updated"] = iso_utc()
        self._record["duration_s"] = round(self._base_duration + time.monotonic() - self._opened, 3)
        self._write()

    def update_data(self, **fields: Any) -> None:
        """Set keys of run.json's ``data`` section (e.g. skipped ids found while loading)."""
        self.update(data={**self._record.get("data", {}), **fields})

    def set_best(self, epoch: int, metric: str, value: float) -> None:
        """Record the best epoch so far by the selection metric."""
        self.update(best={"epoch": int(epoch), "metric": metric, "value": float(value)})

    # -- files
    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_CSV

    def checkpoint_path(self, name: str = "best") -> Path:
        """``checkpoints/<name>.pt`` in this run (folder created)."""
        if not _SAFE_NAME.match(name):
            raise ValueError(f"not a plain checkpoint name: {name!r}")
        folder = self.path / CHECKPOINTS_DIR
        folder.mkdir(exist_ok=True)
        return folder / f"{name}.pt"

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row to metrics.csv (columns METRICS_COLUMNS) and set ``last_epoch``."""
        if "epoch" not in row:
            raise ValueError("a metrics row needs its epoch")
        append_csv_row(self.metrics_path, row, METRICS_COLUMNS)
        self.update(last_epoch=int(row["epoch"]))

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only rows with ``epoch <= last_epoch`` (on resume, drop epochs the checkpoint lacks)."""
        frame = read_csv_tolerant(self.metrics_path, METRICS_COLUMNS)
        if frame.empty:
            return
        kept = frame[frame["epoch"].astype(float) <= last_epoch]
        rows = kept[list(METRICS_COLUMNS)].itertuples(index=False, name=None)
        lines = [_csv_line(METRICS_COLUMNS)] + [_csv_line([_cell(v) for v in row]) for row in rows]
        atomic_write_bytes(self.metrics_path, b"".join(lines))

    def log(self, line: str) -> None:
        """Append one line (timestamped) to train.log; no patient data may be passed here."""
        text = f"{iso_utc()} {line.rstrip()}\n".encode()
        with open(self.path / TRAIN_LOG, "ab") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def write_predictions(self, frame: pd.DataFrame | Mapping[str, Sequence[Any]]) -> None:
        """Replace predictions.csv atomically with the columns PREDICTION_COLUMNS (patient/series hashed)."""
        import pandas as pd

        df = pd.DataFrame(frame)
        missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"predictions lack columns {missing}")
        buf = io.StringIO()
        df[list(PREDICTION_COLUMNS)].to_csv(buf, index=False, lineterminator="\n")
        atomic_write_text(self.path / PREDICTIONS_CSV, buf.getvalue())

    def write_split(self, frame: pd.DataFrame) -> None:
        """Replace split.csv atomically: ``patient`` (hashed) and ``role`` (train, val, test, unused)."""
        buf = io.StringIO()
        frame[["patient", "role"]].to_csv(buf, index=False, lineterminator="\n")
        atomic_write_text(self.path / SPLIT_CSV, buf.getvalue())

    def write_gallery(self, entries: Iterable[GalleryEntry]) -> None:
        """Write each entry's two PNGs atomically, then replace gallery/index.csv atomically."""
        folder = self.path / GALLERY_DIR
        folder.mkdir(exist_ok=True)
        lines = [_csv_line(GALLERY_COLUMNS)]
        for entry in entries:
            if not _SAFE_NAME.match(str(entry.image_id)):
                raise ValueError(f"gallery image id is not a plain file name: {entry.image_id!r}")
            theta = [float(v) for v in _flatten(entry.theta)]
            if len(theta) != 6:
                raise ValueError(f"theta needs 6 numbers (a 2x3 affine), got {len(theta)}")
            input_name = f"{entry.image_id}_input.png"
            aligned_name = f"{entry.image_id}_aligned.png"
            atomic_write_bytes(folder / input_name, encode_png(entry.input_image))
            atomic_write_bytes(folder / aligned_name, encode_png(entry.aligned_image))
            row = [
                entry.image_id,
                input_name,
                aligned_name,
                " ".join(repr(v) for v in theta),
                *(int(v) for v in _six(entry.true, "true")),
                *(_cell(float(v)) for v in _six(entry.prob, "prob")),
            ]
            lines.append(_csv_line(row))
        atomic_write_bytes(self.path / GALLERY_INDEX, b"".join(lines))

    def write_grid_results(self, cv_results: Mapping[str, Any] | pd.DataFrame) -> None:
        """Write sklearn's ``cv_results_`` as grid_results.csv (``params`` as JSON text), atomically."""
        import pandas as pd

        if isinstance(cv_results, pd.DataFrame):
            df = cv_results.copy()
        else:
            columns = {}
            for key, values in cv_results.items():
                values = values.tolist() if hasattr(values, "tolist") else list(values)
                columns[key] = values
            df = pd.DataFrame(columns)
        if "params" in df.columns:
            df["params"] = [p if isinstance(p, str) else json.dumps(_jsonable(p), sort_keys=True) for p in df["params"]]
        for col in df.columns:
            if col.startswith("param_"):
                df[col] = [json.dumps(_jsonable(v)) if isinstance(v, (list, dict, tuple)) else v for v in df[col]]
        buf = io.StringIO()
        df.to_csv(buf, index=False, lineterminator="\n")
        atomic_write_text(self.path / GRID_RESULTS_CSV, buf.getvalue())

    # -- closing
    def finish(self, status: str = "finished", error: str | None = None) -> None:
        """Set the final status (finished, failed or interrupted), the error message and end time."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"final status must be one of {FINAL_STATUSES}, got {status!r}")
        try:
            self.update(status=status, error=error, finished=iso_utc())
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and self._record.get("status") == "running":
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            message = f"{exc_type.__name__}: {exc}"[:500]
            try:
                self.finish(status, message)
            except OSError:
                log.exception("could not record the end of run %s", self.id)
        return False


def _flatten(values: Any) -> list[Any]:
    if hasattr(values, "tolist"):
        values = values.tolist()  # numpy arrays and torch tensors
    if not isinstance(values, (list, tuple)):
        return [values]
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


# ------------------------------------------------------------------------------------------ reader
@dataclass(frozen=True)
class RunSummary:
    """One line of the runs table. ``status`` is ``malformed`` (with ``reason``) for unreadable runs, and
    ``interrupted`` for a run still marked running whose writing process is gone from this machine."""

    id: str
    path: Path
    status: str
    reason: str | None = None
    kind: str | None = None
    backbone: str | None = None
    stage: int | None = None
    parent_run: str | None = None
    created: str | None = None
    updated: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    n_images: int | None = None
    n_train: int | None = None
    n_val: int | None = None
    best_epoch: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    best_auc_mean: float | None = None
    best_auc_any: float | None = None
    best_weighted_log_loss: float | None = None
    last_epoch: int | None = None
    epochs_planned: int | None = None
    format_version: Any = None
    config: dict[str, Any] | None = field(default=None, hash=False)  # run.json's config, for the runs table

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _writer_gone(info: Mapping[str, Any]) -> bool:
    """True when run.json names a writer process on this host that no longer exists."""
    writer = info.get("writer")
    if not isinstance(writer, Mapping) or writer.get("host") != socket.gethostname():
        return False
    pid = writer.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but is someone else's
    return False


def _num(value: Any, kind: type = float) -> Any:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(out):
        return None
    return int(out) if kind is int else out


def _metrics_row(path: Path, epoch: int | None) -> dict[str, str]:
    """The metrics.csv row of ``epoch`` (the last one if None), read with the csv module (cheap)."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "replace"))))
    if epoch is None:
        return rows[-1] if rows else {}
    found: dict[str, str] = {}
    for row in rows:
        if _num(row.get("epoch"), int) == epoch:
            found = row  # the last row of an epoch wins (a resumed run may repeat one)
    return found


def summarise_run(run_dir: str | PathLike) -> RunSummary:
    """A RunSummary of one folder; never raises (a damaged run gets status ``malformed``)."""
    path = Path(run_dir)
    try:
        info = load_run_json(path)
    except RunFormatError as exc:
        return RunSummary(id=path.name, path=path, status=MALFORMED, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - the runs table must never break on one bad folder
        return RunSummary(id=path.name, path=path, status=MALFORMED, reason=f"unreadable: {type(exc).__name__}")
    try:
        status = info.get("status")
        reason = info.get("error") if isinstance(info.get("error"), str) else None
        if status not in STATUSES:
            return RunSummary(id=path.name, path=path, status=MALFORMED, reason=f"unknown status {status!r}",
                              format_version=info.get("format_version"))
        if status == "running" and _writer_gone(info):
            status, reason = "interrupted", "the training process ended without closing the run"
        data = info.get("data") if isinstance(info.get("data"), Mapping) else {}
        best = info.get("best") if isinstance(info.get("best"), Mapping) else {}
        best_epoch = _num(best.get("epoch"), int)
        row = _metrics_row(path / METRICS_CSV, best_epoch)
        return RunSummary(
            id=str(info.get("id") or path.name),
            path=path,
            status=status,
            reason=reason,
            kind=info.get("kind") if isinstance(info.get("kind"), str) else None,
            backbone=info.get("backbone") if isinstance(info.get("backbone"), str) else None,
            stage=_num(info.get("stage"), int),
            parent_run=info.get("parent_run") if isinstance(info.get("parent_run"), str) else None,
            created=info.get("created") if isinstance(info.get("created"), str) else None,
            updated=info.get("updated") if isinstance(info.get("updated"), str) else None,
            finished=info.get("finished") if isinstance(info.get("finished"), str) else None,
            duration_s=_num(info.get("duration_s")),
            n_images=_num(data.get("n_images"), int),
            n_train=_num(data.get("n_train"), int),
            n_val=_num(data.get("n_val"), int),
            best_epoch=best_epoch,
            best_metric=best.get("metric") if isinstance(best.get("metric"), str) else None,
            best_value=_num(best.get("value")),
            best_auc_mean=_num(row.get("val_auc_mean")) if best_epoch is not None else None,
            best_auc_any=_num(row.get("val_auc_any")) if best_epoch is not None else None,
            best_weighted_log_loss=_num(row.get("val_weighted_log_loss")) if best_epoch is not None else None,
            last_epoch=_num(info.get("last_epoch"), int),
            epochs_planned=_num(info.get("epochs_planned"), int),
            format_version=info.get("format_version"),
            config=dict(info["config"]) if isinstance(info.get("config"), Mapping) else None,
        )
    except Exception as exc:  # noqa: BLE001
        return RunSummary(id=path.name, path=path, status=MALFORMED, reason=f"unreadable: {type(exc).__name__}")


def _candidate_dirs(runs_dir: Path) -> list[os.DirEntry]:
    try:
        entries = list(os.scandir(runs_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        if entry.name.startswith(".") or not _SAFE_NAME.match(entry.name):
            continue
        try:
            if entry.is_dir():
                out.append(entry)
        except OSError:
            continue
    return out


def list_runs(runs_dir: str | PathLike) -> list[RunSummary]:
    """Summaries of every run folder in ``runs_dir`` (newest first). Never raises.

    A run folder is any visible sub-folder with a plain name; one without a readable run.json is
    listed as ``malformed`` (it may be a run being created this instant).
    """
    summaries = [summarise_run(Path(entry.path)) for entry in _candidate_dirs(Path(runs_dir))]
    summaries.sort(key=lambda s: (s.created or "", s.id), reverse=True)
    return summaries


def resolve_run(runs_dir: str | PathLike, run_id: str) -> Path:
    """The folder of run ``run_id`` in ``runs_dir``, only if such a run (with run.json) is on disk.

    The id is matched against the folder listing, never joined into a path: ids with slashes,
    ``..``, absolute paths or other characters are refused with RunNotFoundError.
    """
    if not isinstance(run_id, str) or not _SAFE_NAME.match(run_id) or ".." in run_id:
        raise RunNotFoundError("not a run id")
    for entry in _candidate_dirs(Path(runs_dir)):
        if entry.name == run_id and (Path(entry.path) / RUN_JSON).is_file():
            return Path(entry.path)
    raise RunNotFoundError(f"no run named {run_id} in the runs folder")


@dataclass
class RunRecord:
    """One run read from disk: run.json (``info``) and metrics; the larger files load on first use."""

    path: Path
    info: dict[str, Any]
    metrics: pd.DataFrame
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return str(self.info.get("id") or self.path.name)

    @property
    def status(self) -> str:
        return str(self.info.get("status"))

    @property
    def stage(self) -> int | None:
        return _num(self.info.get("stage"), int)

    @property
    def model_path(self) -> Path:
        """The checkpoint named by ``model_file``, which must lie inside the run folder."""
        name = self.info.get("model_file")
        return self.file(DEFAULT_MODEL_FILE if name is None else name)

    def file(self, relative: str) -> Path:
        """A path inside the run folder; RunFormatError for absolute paths or ones leaving the folder."""
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
            raise RunFormatError(f"not a relative path inside the run: {relative!r}")
        root = self.path.resolve()
        target = (root / relative).resolve()
        if root != target and root not in target.parents:
            raise RunFormatError(f"path leaves the run folder: {relative!r}")
        return target

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        """predictions.csv, or None when the run has none yet."""
        path = self.path / PREDICTIONS_CSV
        return read_csv_tolerant(path, PREDICTION_COLUMNS) if path.is_file() else None

    @cached_property
    def gallery(self) -> pd.DataFrame | None:
        """gallery/index.csv with ``input_path``/``aligned_path`` columns (absolute, inside the run)."""
        path = self.path / GALLERY_INDEX
        if not path.is_file():
            return None
        frame = read_csv_tolerant(path, GALLERY_COLUMNS)
        folder = self.path / GALLERY_DIR

        def inside(name: Any) -> str | None:
            return str(folder / name) if isinstance(name, str) and _SAFE_NAME.match(name) else None

        frame["input_path"] = [inside(n) for n in frame["input_png"]]
        frame["aligned_path"] = [inside(n) for n in frame["aligned_png"]]
        return frame

    @cached_property
    def grid_results(self) -> pd.DataFrame | None:
        """grid_results.csv of a grid run, or None."""
        path = self.path / GRID_RESULTS_CSV
        return read_csv_tolerant(path) if path.is_file() else None

    def log_text(self, max_bytes: int = 1_000_000) -> str:
        """The end of train.log (at most ``max_bytes``), or '' when there is none."""
        path = self.path / TRAIN_LOG
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""


def read_metrics(path: str | PathLike) -> pd.DataFrame:
    """metrics.csv as numbers, one row per epoch (the last row wins for a repeated epoch)."""
    import pandas as pd

    frame = read_csv_tolerant(path, METRICS_COLUMNS)
    for col in frame.columns:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame = frame.dropna(subset=["epoch"])
    frame["epoch"] = frame["epoch"].astype(int)
    return frame.drop_duplicates(subset="epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def read_run(run_dir: str | PathLike) -> RunRecord:
    """Read one run folder; RunFormatError when run.json is missing, malformed or of a newer format."""
    path = Path(run_dir)
    info = load_run_json(path)
    return RunRecord(path=path, info=info, metrics=read_metrics(path / METRICS_CSV))
