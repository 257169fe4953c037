"""Shared pieces of the panels: the app context, change-only reactive values, run pickers, UI bits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from htmltools import Tag, TagChild
from shiny import reactive, ui

from hemorrhage_core.dashboard.config import DISCLAIMER, DashboardConfig
from hemorrhage_core.dashboard.pacs_source import DashboardResults, OpenStudy
from hemorrhage_core.dashboard.predictors import PredictorCache
from hemorrhage_core.dashboard.state import RunIndex, Snapshot, run_choices, run_key
from hemorrhage_core.runs import RunSummary

T = TypeVar("T")


@dataclass(frozen=True)
class AppContext:
    """What every panel server receives: settings, the shared caches and the live runs snapshot."""

    config: DashboardConfig
    index: RunIndex
    predictors: PredictorCache
    snapshot: Callable[[], Snapshot]  # a reactive read: re-runs its readers when a run's files change
    # The studies this app predicted from the PACS (process-wide), and, per session, the worklist's
    # request to show a study in the Predict panel. Panels make their own when these are None.
    pacs_results: DashboardResults | None = None
    open_study: reactive.Value[OpenStudy | None] | None = None


def distinct(compute: Callable[[], T], *, initial: T, name: str) -> reactive.Value[T]:
    """A reactive value following ``compute()`` that invalidates its readers only when the value changes.

    Shiny re-runs everything downstream of a poll on each tick; this stops a run that is training
    elsewhere from redrawing plots of runs that did not change. ``name`` labels the value for Shiny
    (given explicitly because Shiny otherwise infers it by reading the call stack, about 10 ms each).
    """
    value: reactive.Value[T] = reactive.value(initial, name=name)

    @reactive.effect(priority=100)
    def _follow() -> None:
        new = compute()
        with reactive.isolate():
            old = value.get()
        if new != old:
            value.set(new)

    return value


def sync_run_select(
    input_id: str,
    candidates: Callable[[], Sequence[RunSummary]],
    *,
    current: Callable[[], Any],
    default: Callable[[Sequence[RunSummary]], str | list[str] | None] = lambda runs: (
        run_key(runs[0]) if runs else None
    ),
    multiple: bool = False,
    allow_none: str | None = None,
) -> None:
    """Keep a run select input's choices equal to ``candidates()`` and its selection valid.

    The current selection survives updates when its runs still exist; otherwise ``default`` picks.
    ``allow_none`` adds a leading "no run" choice with that label (value ``""``).
    """

    def choice_map() -> tuple[tuple[str, str], ...]:
        return tuple(run_choices(candidates()).items())

    choices = distinct(choice_map, initial=(), name=f"{input_id}_choices")

    @reactive.effect
    def _update() -> None:
        items = dict(choices())
        options = ({"": allow_none} if allow_none is not None else {}) | items
        with reactive.isolate():  # only a change of the choices themselves should re-run this
            selected = current()
            runs_now = candidates()
        if multiple:
            kept = [s for s in (selected or ()) if s in items]
            chosen = kept or default(runs_now) or []
        else:
            chosen = (
                selected
                if selected in options and (selected or allow_none is not None)
                else default(runs_now)
            )
            chosen = chosen if chosen is not None else ("" if allow_none is not None else None)
        if multiple:
            ui.update_selectize(input_id, choices=options, selected=chosen)
        else:
            ui.update_select(input_id, choices=options, selected=chosen)


def disclaimer_banner() -> Tag:
    """The research-use notice shown at the top of every page."""
    return ui.div(
        ui.tags.strong("Research use only, not for clinical or diagnostic use."),
        " The models here were trained for research and have not been validated for patient care.",
        class_="research-banner",
        role="note",
        **{"aria-label": DISCLAIMER},
    )


def message(text: TagChild, *, kind: str = "info") -> Tag:
    """A short inline notice (info, warning or error); text is escaped by htmltools."""
    classes = {"info": "alert-secondary", "warning": "alert-warning", "error": "alert-danger"}
    return ui.div(text, class_=f"alert {classes.get(kind, 'alert-secondary')} panel-message", role="status")


def help_text(*text: TagChild) -> Tag:
    return ui.p(*text, class_="panel-help text-muted")


@dataclass(frozen=True)
class Loaded:
    """A run's table as a panel needs it: a display name and the frame, or why there is none."""

    run_id: str
    name: str
    frame: Any = None
    problem: str | None = None


def load_run_table(ctx: AppContext, run_id: str | None, what: str) -> Loaded | None:
    """Read ``what`` ("predictions", "gallery" or "grid_results") of a run chosen in the UI.

    None when no run is chosen; otherwise a Loaded whose ``problem`` says why a frame is missing
    (the run is unknown, unreadable, or has not written that file yet). Never raises.
    """
    from hemorrhage_core.dashboard.safety import user_message
    from hemorrhage_core.dashboard.state import run_label

    if not run_id:
        return None
    with reactive.isolate():
        summary = ctx.snapshot().by_id(run_id)
    name = run_label(summary) if summary is not None else run_id
    try:
        record = ctx.index.record(run_id)
        frame = getattr(record, what)
    except Exception as exc:  # noqa: BLE001 - a damaged run must never break the page
        return Loaded(run_id, name, None, user_message(exc, context=f"reading {what}"))
    if frame is None or len(frame) == 0:
        missing = {
            "predictions": "no validation predictions yet (they are written at the best epoch)",
            "gallery": "no gallery yet (it is written at the best epoch)",
            "grid_results": "no grid-search results yet",
        }
        return Loaded(run_id, name, None, missing.get(what, f"no {what} yet"))
    return Loaded(run_id, name, frame)


def chosen_run_table(
    ctx: AppContext,
    input_id: str,
    current: Callable[[], Any],
    candidates: Callable[[], Sequence[RunSummary]],
    what: str,
) -> Callable[[], Loaded | None]:
    """The run picker of a one-run panel and the table it shows: keeps the select in step with
    ``candidates()`` and returns a reactive calc of ``load_run_table`` for the chosen run, re-read only
    when that run's files change (not on every poll of the runs folder)."""
    sync_run_select(input_id, candidates, current=current)
    chosen = distinct(
        lambda: (current(), ctx.snapshot().stamps.get(current())), initial=(None, None), name=f"{input_id}_chosen"
    )

    @reactive.calc
    def loaded() -> Loaded | None:
        return load_run_table(ctx, chosen()[0], what)

    return loaded


# What a polar model's input looks like, for a reader who expects a head.
def polar_caption(overlap: float = 0.0, traced: bool = False, fold: int = 1, seam: str = "back",
                  midline: float = 1.0) -> str:
    """The caption of a polar model's input, saying so when the seam's side of the head (the back, or the
    front: ``polar_seam``) is repeated at the edges, when each angle's rows follow the skull
    (``polar_trace``), when the turn is cut into panels (``polar_fold``) and when the columns lie closer
    together at the midline (``polar_midline``)."""
    seam = "front" if seam == "front" else "back"
    # Clockwise on screen from the seam: from the back the turn goes round the image's left side first.
    first, then = ("left", "right") if seam == "back" else ("right", "left")
    rows = ", each column's rows scaled so the skull's inner edge is one straight row" if traced else ""
    if midline > 1.0:  # the image is no longer even in angle: the midline's structures look widened
        rows += f", the columns {midline:g} times as close together at the front and back midlines as on average"
    if fold > 1:
        ends = ", each repeating a little past both its ends" if overlap > 0 else ""
        return (
            f"polar input in {fold} panels, one above the other: in each, rows run from the centre of the head "
            f"(top) out past the skull (bottom); the top panel's columns go from the {seam} of the head round the "
            f"image's {first} side, the next panels on round the {then} side to the {seam}{ends}{rows}; blood under "
            "the skull is a band along it"
        )
    repeated = f", with the {seam} of the head repeated at both edges" if overlap > 0 else ""
    return (
        "polar input: rows run from the centre of the head (top) out past the skull (bottom), columns once "
        f"around the head from the {seam}{repeated}{rows}; blood under the skull is a band along it"
    )


def _config_true(summary: RunSummary | None, key: str) -> bool:
    """Whether a run's config sets ``key`` to true (absent, not a boolean or no run: false)."""
    return summary is not None and (summary.config or {}).get(key) is True


def run_is_polar(summary: RunSummary | None) -> bool:
    """Whether a run reads its slices in polar coordinates (its config's ``polar``)."""
    return _config_true(summary, "polar")


def run_polar_trace(summary: RunSummary | None) -> bool:
    """Whether a polar run's frame follows the skull's inner table (its config's ``polar_trace``)."""
    return _config_true(summary, "polar_trace")


def run_polar_fold(summary: RunSummary | None) -> int:
    """How many panels a polar run's turn is cut into (its config's ``polar_fold``; 1 before it)."""
    value = (summary.config or {}).get("polar_fold", 1) if summary is not None else 1
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def run_polar_seam(summary: RunSummary | None) -> str:
    """Where a polar run's turn starts and ends (its config's ``polar_seam``; the back before it)."""
    value = (summary.config or {}).get("polar_seam", "back") if summary is not None else "back"
    return "front" if value == "front" else "back"


def run_polar_midline(summary: RunSummary | None) -> float:
    """How much closer a polar run's columns lie at the midline (its config's ``polar_midline``; 1 before it)."""
    value = (summary.config or {}).get("polar_midline", 1.0) if summary is not None else 1.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1.0 else 1.0


def run_polar_overlap(summary: RunSummary | None) -> float:
    """The share of a turn a polar run repeats past the seam (its config's ``polar_overlap``; 0 before it)."""
    value = (summary.config or {}).get("polar_overlap", 0.0) if summary is not None else 0.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
