"""Writing a run directory: ``RunWriter`` creates ``RUNS_DIR/<run_id>/`` and keeps its files current."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hemorrhage_core.fileio import atomic_write_bytes, atomic_write_text, fsync_handle, remove_temp_files
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs.lock import WriterLock
from hemorrhage_core.runs.records import (
    CHECKPOINTS_DIR,
    DEFAULT_MODEL_FILE,
    FINAL_STATUSES,
    FORMAT_VERSION,
    GALLERY_COLUMNS,
    GALLERY_DIR,
    GALLERY_INDEX,
    GRID_RESULTS_CSV,
    KINDS,
    METRICS_COLUMNS,
    METRICS_CSV,
    PREDICTION_COLUMNS,
    PREDICTIONS_CSV,
    RUN_JSON,
    SAFE_NAME,
    SPLIT_CSV,
    STATUSES,
    TRAIN_LOG,
    RunFormatError,
    csv_cell,
    csv_line,
    dumps_json,
    iso_utc,
    jsonable,
    load_run_json,
    read_csv_tolerant,
    utc_now,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__package__)  # "hemorrhage_core.runs", as before the split


# ------------------------------------------------------------------------------------- file helpers
def remove_stale_temp_files(run_dir: str | PathLike) -> list[Path]:
    """Delete the temporary files that atomic writes of a killed process left in a run (its folder,
    checkpoints/ and gallery/) and return them. A checkpoint's can be as large as the checkpoint, and
    only a dead writer leaves one, so ``train --resume`` runs this once it holds the run's lock."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR, Path(run_dir) / GALLERY_DIR):
        removed += remove_temp_files(folder)
    return removed


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
            fh.write(csv_line(columns))
        elif header.decode("utf-8", "replace").rstrip("\r\n") != csv_line(columns).decode().rstrip("\n"):
            raise RunFormatError(f"{target.name} has other columns than this writer's; not appending")
        fh.seek(0, os.SEEK_END)
        fh.write(csv_line([csv_cell(row.get(c)) for c in columns]))
        fsync_handle(fh)



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
    root = Path(__file__).resolve().parents[2]
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
            "config": jsonable(config),
            "data": jsonable(_complete(data, _DATA_KEYS)),
            "split": jsonable(_complete(split, _SPLIT_KEYS)),
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
            record.update(jsonable(dict(extra)))
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
        self._record.update(jsonable(fields))
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
        if not SAFE_NAME.match(name):
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
        lines = [csv_line(METRICS_COLUMNS)] + [csv_line([csv_cell(v) for v in row]) for row in rows]
        atomic_write_bytes(self.metrics_path, b"".join(lines))

    def log(self, line: str) -> None:
        """Append one line (timestamped) to train.log; no patient data may be passed here."""
        text = f"{iso_utc()} {line.rstrip()}\n".encode()
        with open(self.path / TRAIN_LOG, "ab") as fh:
            fh.write(text)
            fsync_handle(fh)

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
        lines = [csv_line(GALLERY_COLUMNS)]
        for entry in entries:
            if not SAFE_NAME.match(str(entry.image_id)):
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
                *(csv_cell(float(v)) for v in _six(entry.prob, "prob")),
            ]
            lines.append(csv_line(row))
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
            df["params"] = [p if isinstance(p, str) else json.dumps(jsonable(p), sort_keys=True) for p in df["params"]]
        for col in df.columns:
            if col.startswith("param_"):
                df[col] = [json.dumps(jsonable(v)) if isinstance(v, (list, dict, tuple)) else v for v in df[col]]
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

