"""Run reading for the dashboard: a cached, change-aware view of the runs folder (no Shiny here).

Opening the app with hundreds of runs must stay fast, and a poll every few seconds must not re-read
them all. ``RunIndex.snapshot()`` stats a handful of files per run and re-summarises (through
``hemorrhage_core.runs``) only the runs whose files changed; ``RunIndex.record()`` loads one run's
heavy files only when a panel asks for it, again cached by modification times. Run ids coming from
the browser go through ``runs.resolve_run`` before anything is read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hemorrhage_core import runs
from hemorrhage_core.runs import RunRecord, RunSummary

# The files whose (mtime, size) make a run's stamp: any write by training changes one of them.
STAMP_FILES: tuple[str, ...] = (
    runs.RUN_JSON,
    runs.METRICS_CSV,
    runs.PREDICTIONS_CSV,
    runs.GALLERY_INDEX,
    runs.GRID_RESULTS_CSV,
)

Stamp = tuple[tuple[int, int] | None, ...]


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, or None when it is absent or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def run_stamp(run_dir: Path) -> Stamp:
    return tuple(file_stamp(run_dir / name) for name in STAMP_FILES)


def _plain_dirs(runs_dir: Path) -> list[Path]:
    """Visible sub-folders of the runs folder with plain names (the same rule as runs.list_runs)."""
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                out.append(Path(entry.path))
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Snapshot:
    """The runs folder at one moment: summaries (newest first) and each run's file stamp."""

    summaries: tuple[RunSummary, ...] = ()
    stamps: dict[str, Stamp] = field(default_factory=dict)

    def by_id(self, run_id: str | None) -> RunSummary | None:
        for summary in self.summaries:
            if run_key(summary) == run_id:
                return summary
        return None

    def has_file(self, run_id: str, name: str) -> bool:
        """Whether the run had file ``name`` (one of STAMP_FILES) when the snapshot was taken."""
        stamp = self.stamps.get(run_id)
        return stamp is not None and stamp[STAMP_FILES.index(name)] is not None

    def select(
        self,
        *,
        kind: str | None = None,
        statuses: Iterable[str] | None = None,
        stage: int | None = None,
        with_model: bool = False,
        with_file: str | None = None,
    ) -> list[RunSummary]:
        """Runs filtered by kind, status, stage, (``with_model``) a best checkpoint on disk and
        (``with_file``) one of STAMP_FILES present."""
        wanted = set(statuses) if statuses is not None else None
        out = []
        for s in self.summaries:
            if kind is not None and s.kind != kind:
                continue
            if wanted is not None and s.status not in wanted:
                continue
            if stage is not None and s.stage != stage:
                continue
            if with_model and not (s.path / runs.DEFAULT_MODEL_FILE).is_file():
                continue
            if with_file is not None and not self.has_file(s.path.name, with_file):
                continue
            out.append(s)
        return out


class RunIndex:
    """A process-wide, thread-safe cache of run summaries and records for one runs folder."""

    def __init__(self, runs_dir: str | os.PathLike) -> None:
        self.runs_dir = Path(runs_dir)
        self._lock = threading.Lock()
        self._summaries: dict[str, tuple[Stamp, RunSummary]] = {}
        self._records: dict[str, tuple[Stamp, RunRecord]] = {}

    def stamps(self) -> dict[str, Stamp]:
        """Folder name -> stamp for every candidate run folder: only stat calls, safe to poll often."""
        return {path.name: run_stamp(path) for path in _plain_dirs(self.runs_dir)}

    def snapshot(self, stamps: dict[str, Stamp] | None = None) -> Snapshot:
        """Summaries of every run, re-reading only the runs whose stamp changed since last time."""
        stamps = self.stamps() if stamps is None else stamps
        with self._lock:
            for name in list(self._summaries):
                if name not in stamps:
                    del self._summaries[name]
            for name, stamp in stamps.items():
                cached = self._summaries.get(name)
                if cached is None or cached[0] != stamp:
                    self._summaries[name] = (stamp, runs.summarise_run(self.runs_dir / name))
            summaries = [entry[1] for entry in self._summaries.values()]
        summaries.sort(key=lambda s: (s.created or "", s.id), reverse=True)
        return Snapshot(summaries=tuple(summaries), stamps=dict(stamps))

    def resolve(self, run_id: str) -> Path:
        """The folder of a run id chosen in the UI, via runs.resolve_run (RunNotFoundError if absent)."""
        return runs.resolve_run(self.runs_dir, run_id)

    def record(self, run_id: str) -> RunRecord:
        """The run's record (run.json, metrics; predictions, gallery and grid results on first use).

        Cached until one of the run's files changes. RunNotFoundError / RunFormatError for ids that
        are not runs on disk or runs that cannot be read.
        """
        path = self.resolve(run_id)
        stamp = run_stamp(path)
        with self._lock:
            cached = self._records.get(path.name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        record = runs.read_run(path)
        with self._lock:
            self._records[path.name] = (stamp, record)
        return record


def run_label(summary: RunSummary) -> str:
    """A short human name for a run: backbone, stage, start time (month-day hour:minute, UTC) and the
    id's random suffix, e.g. ``inception_v3 s2 · 11-27 10:32 · 0905``."""
    backbone = summary.backbone or "?"
    stage = f"s{summary.stage}" if summary.stage is not None else "s?"
    when = (summary.created or "")[5:16].replace("T", " ")
    suffix = run_key(summary).rsplit("-", 1)[-1]
    kind = "grid " if summary.kind == "grid" else ""
    parts = [f"{kind}{backbone} {stage}", when, suffix]
    return " · ".join(p for p in parts if p)


def run_choices(summaries: Iterable[RunSummary], *, show_status: bool = True) -> dict[str, str]:
    """Select-input choices: run id -> readable label (with the status unless it is finished)."""
    out = {}
    for s in summaries:
        label = run_label(s)
        if show_status and s.status != "finished":
            label += f" ({s.status})"
        out[run_key(s)] = label
    return out


def run_key(summary: RunSummary) -> str:
    """The id the UI uses for a run: its folder name (what runs.resolve_run matches)."""
    return summary.path.name
