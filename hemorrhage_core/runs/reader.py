"""Reading run directories: ``list_runs`` summarises every run in a folder and never raises (a damaged
run is listed with status ``malformed`` and a reason); ``read_run`` loads one run; ``resolve_run`` turns a
run id chosen in a UI into a path only if a run of that name is actually on disk."""

from __future__ import annotations

import csv
import io
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hemorrhage_core.runs.records import (
    DEFAULT_MODEL_FILE,
    GALLERY_COLUMNS,
    GALLERY_DIR,
    GALLERY_INDEX,
    GRID_RESULTS_CSV,
    MALFORMED,
    METRICS_COLUMNS,
    METRICS_CSV,
    PREDICTION_COLUMNS,
    PREDICTIONS_CSV,
    RUN_JSON,
    SAFE_NAME,
    STATUSES,
    TRAIN_LOG,
    RunFormatError,
    RunNotFoundError,
    load_run_json,
    read_csv_tolerant,
)

if TYPE_CHECKING:
    import pandas as pd


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
        if entry.name.startswith(".") or not SAFE_NAME.match(entry.name):
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
    if not isinstance(run_id, str) or not SAFE_NAME.match(run_id) or ".." in run_id:
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
            return str(folder / name) if isinstance(name, str) and SAFE_NAME.match(name) else None

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
