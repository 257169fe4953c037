"""The data selector every metric panel shares: which data set of the chosen run(s) the numbers are on.

A run offers its saved evaluations (``RUN/evaluations/NAME``, ``test`` first) and its validation
predictions (last: they chose the best epoch, so their numbers are optimistic). Damaged or
half-written evaluations stay in the list with the reason they cannot be used, and choosing one shows
that reason, never an error. Saved evaluations can appear at any time (``evaluate --save``), so the
chosen runs' evaluation folders are watched by modification times, a few stat calls per poll.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from htmltools import Tag, TagChild
from shiny import reactive, ui

from hemorrhage_core import evaluations as ev
from hemorrhage_core.dashboard.common import AppContext, distinct
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import file_stamp, run_label
from hemorrhage_core.runs import PREDICTIONS_CSV

PIPELINE_JSON = "pipeline.json"  # written by `training pipeline` beside its runs (names its four runs)
LEVEL_CHOICES = {"slice": "slice (every image)", "study": "study (one row per series, max over its slices)"}

# (role, statuses): a run's part in a panel ("A", "overlay", ...) and what it holds.
RunStatuses = tuple[str, Sequence[ev.EvaluationStatus]]


# --------------------------------------------------------------------------------- pure parts
def evaluation_stamp(run_dir: Path) -> tuple:
    """Stat-only fingerprint of every data set of a run: changes when an evaluation is added, finished,
    damaged or removed, or when the validation predictions, calibration or thresholds change."""
    root = run_dir / ev.EVALUATIONS_DIR
    try:
        names = sorted(entry.name for entry in os.scandir(root) if not entry.name.startswith("."))
    except OSError:
        names = []
    saved = tuple(
        (name, file_stamp(root / name / ev.EVALUATION_METRICS), file_stamp(root / name / PREDICTIONS_CSV))
        for name in names
    )
    own = tuple(file_stamp(run_dir / name) for name in (PREDICTIONS_CSV, ev.CALIBRATION_JSON, ev.THRESHOLDS_JSON))
    return saved, own


def _order(name: str) -> tuple:
    return (name != ev.TEST, name == ev.VALIDATION, name)


def data_choices(per_run: Sequence[RunStatuses]) -> dict[str, str]:
    """Select choices (name -> label) over the data sets of one or more runs: test first, validation last.

    One run: the status's own label ("test (16 images)", "test (unusable: incomplete ...)"). Several
    runs: a name any of them holds, labelled with each run's size or why that run cannot use it.
    """
    names = sorted({s.name for _, statuses in per_run for s in statuses}, key=_order)
    if len(per_run) == 1:
        return {s.name: s.label for s in sorted(per_run[0][1], key=lambda s: _order(s.name))}
    out = {}
    for name in names:
        found = [(role, next((s for s in statuses if s.name == name), None)) for role, statuses in per_run]
        usable = [s for _, s in found if s is not None and s.ok]
        if len(usable) == len(found) and len({s.n_images for s in usable}) == 1:
            out[name] = usable[0].label
            continue
        parts = []
        for role, status in found:
            if status is None:
                parts.append(f"{role}: none")
            elif not status.ok:
                parts.append(f"{role}: unusable, {status.problem}")
            else:
                parts.append(f"{role}: {status.n_images} images")
        note = "; chose the epoch, optimistic" if name == ev.VALIDATION else ""
        out[name] = f"{name} ({'; '.join(parts)}{note})"
    return out


def default_data(per_run: Sequence[RunStatuses]) -> str | None:
    """The data set to show first: the first (test before others, validation last) every run can use,
    else the first any run can use, else the first listed, else None."""
    names = sorted({s.name for _, statuses in per_run for s in statuses}, key=_order)

    def usable_by(name: str) -> list[bool]:
        return [any(s.name == name and s.ok for s in statuses) for _, statuses in per_run]

    for test in (all, any):
        for name in names:
            if test(usable_by(name)):
                return name
    return names[0] if names else None


class EvaluationCache:
    """Loaded evaluations shared by every session, re-read only when their files change (LRU-bounded)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[tuple, ev.EvaluationData]] = OrderedDict()

    @staticmethod
    def _stamp(run_dir: Path, name: str) -> tuple:
        if name == ev.VALIDATION:
            files = (run_dir / PREDICTIONS_CSV, run_dir / ev.CALIBRATION_JSON)
        else:
            folder = run_dir / ev.EVALUATIONS_DIR / name
            files = (folder / ev.EVALUATION_METRICS, folder / PREDICTIONS_CSV)
        return tuple(file_stamp(f) for f in files)

    def load(self, run_dir: Path, name: str) -> ev.EvaluationData:
        """``evaluations.load_evaluation``, cached; raises what it raises."""
        key = (str(run_dir), name)
        stamp = self._stamp(run_dir, name)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(key)
                return hit[1]
        data = ev.load_evaluation(run_dir, name)
        with self._lock:
            self._items[key] = (stamp, data)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data


CACHE = EvaluationCache()


@dataclass(frozen=True)
class RunData:
    """One run's predictions on the chosen data set, or why there are none (``problem``)."""

    role: str
    run_id: str
    name: str  # the run's display name
    data: ev.EvaluationData | None = None
    problem: str | None = None

    @property
    def frame(self) -> pd.DataFrame | None:
        return None if self.data is None else self.data.predictions


def load_run_data(ctx: AppContext, role: str, run_id: str, data_name: str) -> RunData:
    """A run's data set ``data_name`` as a RunData; never raises (the reason goes in ``problem``)."""
    with reactive.isolate():
        summary = ctx.snapshot().by_id(run_id)
    name = run_label(summary) if summary is not None else run_id
    try:
        data = CACHE.load(ctx.index.resolve(run_id), data_name)
    except Exception as exc:  # noqa: BLE001 - a damaged evaluation must never break the page
        return RunData(role, run_id, name, problem=user_message(exc, context=f"reading data {data_name!r}"))
    return RunData(role, run_id, name, data)


def describe(item: RunData, *, level: str = "slice", named: bool = True) -> str:
    """One sentence about the data behind a run's numbers: which set, how big, calibrated or not
    (``named``: starting with the run's name)."""
    data = item.data
    if data is None:
        return f"{item.name}: {item.problem}"
    text = data.describe()
    if level == "study":
        text += f"; study level: {data.n_studies} series, each the maximum over its slices"
    if data.calibration is not None:
        text += "; probabilities calibrated (temperature scaling fitted on validation)"
    return f"{item.name}: {text}." if named else f"{text}."


def pipeline_pair(runs_dir: Path) -> tuple[str | None, str | None]:
    """The pipeline's two final models (pipeline.json's phase1.stage2 and phase2.stage2), or Nones."""
    import json

    try:
        record = json.loads((Path(runs_dir) / PIPELINE_JSON).read_text(encoding="utf-8"))
        pair = (record["phase1"]["stage2"], record["phase2"]["stage2"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return tuple(p if isinstance(p, str) and p else None for p in pair)  # type: ignore[return-value]


# --------------------------------------------------------------------------------- Shiny parts
def data_select(input_id: str = "data", label: str = "Data set") -> Tag:
    """The select input of the data selector (its choices come from ``data_selector``)."""
    return ui.input_select(input_id, label, choices={})


def level_select(input_id: str = "level") -> Tag:
    return ui.input_radio_buttons(input_id, "Level", choices=LEVEL_CHOICES, selected="slice")


def data_selector(
    ctx: AppContext,
    input_id: str,
    runs: Callable[[], Sequence[tuple[str, str | None]]],
    current: Callable[[], str | None],
) -> Callable[[], list[RunData]]:
    """Keep the data select ``input_id`` in step with the data sets of ``runs()`` ((role, run id)
    pairs; empty ids are skipped) and return a reactive calc of each run's chosen data set.

    The choice survives a change of runs when the new runs offer it; otherwise ``default_data`` picks.
    """

    def watch() -> tuple:
        reactive.invalidate_later(ctx.config.poll_seconds)  # evaluations appear without a run's files changing
        out = []
        for role, run_id in runs():
            if not run_id:
                continue
            try:
                stamp = evaluation_stamp(ctx.index.resolve(run_id))
            except Exception:  # noqa: BLE001 - an unknown or removed run has no data; its panel says so
                stamp = None
            out.append((role, run_id, stamp))
        return tuple(out)

    watched = distinct(watch, initial=(), name=f"{input_id}_watched")

    @reactive.calc
    def statuses() -> tuple[tuple[str, str, tuple[ev.EvaluationStatus, ...]], ...]:
        out = []
        for role, run_id, stamp in watched():
            found: tuple[ev.EvaluationStatus, ...] = ()
            if stamp is not None:
                try:
                    found = tuple(ev.list_evaluations(ctx.index.resolve(run_id)))
                except Exception:  # noqa: BLE001 - list_evaluations never raises; a vanished run might
                    found = ()
            out.append((role, run_id, found))
        return tuple(out)

    @reactive.effect
    def _sync() -> None:
        per_run = [(role, found) for role, _, found in statuses()]
        choices = data_choices(per_run)
        with reactive.isolate():
            selected = current()
        chosen = selected if selected in choices else default_data(per_run)
        ui.update_select(input_id, choices=choices, selected=chosen)

    @reactive.calc
    def loaded() -> list[RunData]:
        name = current()
        items = statuses()
        if not name:
            return []
        out = []
        for role, run_id, found in items:
            if not any(s.name == name for s in found):
                out.append(RunData(role, run_id, _name(ctx, run_id), problem=f"no data set {name!r} in this run"))
            else:
                out.append(load_run_data(ctx, role, run_id, name))
        return out

    return loaded


def _name(ctx: AppContext, run_id: str) -> str:
    with reactive.isolate():
        summary = ctx.snapshot().by_id(run_id)
    return run_label(summary) if summary is not None else run_id


def data_note(items: Sequence[RunData], *, level: str = "slice", extra: TagChild = None) -> Tag | None:
    """The panel's statement of its data: the set and its size (one line when every run's is the same),
    as a warning for validation (optimistic) and for a run whose data cannot be used."""
    if not items:
        return None

    def line(text: str, warn: bool) -> Tag:
        if warn:
            return ui.div(ui.strong("Data: "), text, class_="alert alert-warning panel-message data-note", role="status")
        return ui.p(ui.strong("Data: "), text, class_="small data-note mb-2")

    texts = {describe(item, level=level, named=False) for item in items}
    if len(items) > 1 and len(texts) == 1 and all(item.data is not None for item in items):
        return ui.div(line(f"Both runs: {texts.pop()}", items[0].data.optimistic), extra)
    lines = [line(describe(item, level=level), item.problem is not None or item.data.optimistic) for item in items]
    return ui.div(*lines, extra)
