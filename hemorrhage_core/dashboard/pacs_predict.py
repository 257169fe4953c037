"""The Predict panel's second source, "From PACS": pick a study and a series, fetch it, store the result.

Called from inside the Predict module (its inputs share the module's namespace). The fetched series
is handed to the panel as uploads (``on_fetched``), so the panel's one pipeline predicts it: the same
PredictorCache, calibration and ``any`` rule, and the same views, as for uploaded files. Every call
to the server (listing studies and series, fetching, storing the SR) runs in an extended task on a
worker thread, so neither this session's controls nor other sessions wait for it, and each failure
becomes one message in the panel. Nothing is asked of any server until the user picks this source
(or the worklist opens a study), and never when ``HEMORRHAGE_DICOMWEB_URL`` is unset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from htmltools import Tag, TagChild
from shiny import reactive, render, ui

from hemorrhage_core.dashboard import pacs_source as ps
from hemorrhage_core.dashboard.common import AppContext, help_text, message
from hemorrhage_core.dashboard.config import PACS_URL_ENV, DashboardConfig
from hemorrhage_core.dashboard.predictors import Progress, UploadResult

if TYPE_CHECKING:
    from hemorrhage_core.pacs import PushedSr, StudySummary

UPLOAD, PACS = "upload", "pacs"
SOURCES = {UPLOAD: "Upload files", PACS: "From PACS"}
PACS_OFF = f"From PACS is off: set {PACS_URL_ENV} to use a PACS (docs/pacs.md)."


# ----------------------------------------------------------------------------------------------- UI
def _disable_choice(tag: Any, value: str) -> None:
    """Disable the radio input of ``value`` inside ``tag`` (Shiny offers no per-choice switch)."""
    if not isinstance(tag, Tag):
        return
    if tag.name == "input" and tag.attrs.get("value") == value:
        tag.attrs["disabled"] = "disabled"
        return
    for child in tag.children:
        _disable_choice(child, value)


def source_picker(pacs_enabled: bool) -> TagChild:
    """Upload or PACS; without a configured PACS its choice is disabled and one line says why."""
    picker = ui.input_radio_buttons("source", "Source", choices=SOURCES, selected=UPLOAD, inline=True)
    if pacs_enabled:
        return picker
    _disable_choice(picker, PACS)
    return ui.div(picker, ui.p(PACS_OFF, class_="panel-help text-muted pacs-off"))


def pacs_controls() -> Tag:
    """The sidebar's PACS pickers, shown while the source is the PACS."""
    return ui.panel_conditional(
        f"input.source === '{PACS}'",
        ui.input_select("pacs_study", "Study (CT, newest first)", choices={}, width="100%"),
        ui.input_select("pacs_series", "Series", choices={}, width="100%"),
        ui.output_ui("pacs_series_note"),
        ui.div(
            ui.input_task_button("pacs_fetch", "Fetch and predict", label_busy="Fetching…", type="primary"),
            ui.input_action_button("pacs_refresh", "Refresh list", class_="btn-sm btn-outline-secondary"),
            class_="pacs-buttons",
        ),
    )


def store_bar() -> Tag:
    """Below the verdict, while the source is the PACS: what was predicted, and the Store button."""
    return ui.panel_conditional(
        f"input.source === '{PACS}'",
        ui.div(
            ui.output_ui("pacs_summary"),
            ui.input_action_button("pacs_push", "Store result in PACS", class_="btn-outline-primary", disabled=True),
            ui.output_ui("pacs_pushed"),
            class_="pacs-store",
        ),
    )


# ------------------------------------------------------------------------------------- worker calls
@dataclass(frozen=True)
class _Outcome:
    """What a worker call came to: a value, or one message for the page."""

    value: Any = None
    error: str | None = None


def _studies(config: DashboardConfig) -> _Outcome:
    try:
        return _Outcome(ps.list_studies(config))
    except Exception as exc:  # noqa: BLE001 - one message for the page, details in the log
        return _Outcome(error=ps.pacs_message(exc, context="listing PACS studies"))


def _series(config: DashboardConfig, study_uid: str) -> _Outcome:
    try:
        return _Outcome((study_uid, ps.list_series(config, study_uid)))
    except Exception as exc:  # noqa: BLE001
        return _Outcome((study_uid, []), ps.pacs_message(exc, context="listing PACS series"))


@dataclass(frozen=True)
class _FetchRequest:
    study_uid: str
    series_uid: str | None
    progress: Progress = field(compare=False)


def _fetch(config: DashboardConfig, request: _FetchRequest) -> _Outcome:
    try:
        return _Outcome(ps.fetch_series(config, request.study_uid, request.series_uid,
                                        progress=request.progress.update))
    except Exception as exc:  # noqa: BLE001
        return _Outcome(error=ps.pacs_message(exc, context="fetching a PACS series"))


@dataclass(frozen=True)
class _PushRequest:
    origin: ps.PacsOrigin
    results: tuple[UploadResult, ...]
    run_id: str
    key: object = field(compare=False)  # the batch pushed: an outcome is shown only beside it


def _push(config: DashboardConfig, request: _PushRequest) -> _Outcome:
    try:
        prediction = ps.study_prediction(request.origin, request.results, run_id=request.run_id)
        return _Outcome(ps.push(config, prediction, run_id=request.run_id))
    except Exception as exc:  # noqa: BLE001
        return _Outcome(error=ps.pacs_message(exc, context="storing the SR"))


# ------------------------------------------------------------------------------------------ server
@dataclass
class PacsSource:
    """What the Predict panel's status shows of the PACS source: ``lines()``, a reactive read."""

    lines: Callable[[], list[Tag]]


def pacs_source_server(
    input: Any,
    ctx: AppContext,
    *,
    batch: Callable[[], Any],
    on_fetched: Callable[[ps.FetchedSeries], None],
    on_open: Callable[[ps.OpenStudy], None],
) -> PacsSource:
    """Wire the PACS source inside the Predict module's server.

    ``batch()`` is the panel's last finished PredictBatch (``origin`` set when it came from the PACS);
    ``on_fetched`` hands a fetched series to the panel as its uploads; ``on_open`` prepares the panel
    for a study opened from the worklist (model choice, clearing the old uploads).
    """
    config = ctx.config
    enabled = config.pacs_url is not None
    results = ctx.pacs_results or ps.DashboardResults()
    fetch_progress = Progress()

    @reactive.extended_task
    async def studies_task() -> _Outcome:
        return await asyncio.to_thread(_studies, config)

    @reactive.extended_task
    async def series_task(study_uid: str) -> _Outcome:
        return await asyncio.to_thread(_series, config, study_uid)

    @ui.bind_task_button(button_id="pacs_fetch")
    @reactive.extended_task
    async def fetch_task(request: _FetchRequest) -> _Outcome:
        return await asyncio.to_thread(_fetch, config, request)

    @reactive.extended_task
    async def push_task(request: _PushRequest) -> _Outcome:
        return await asyncio.to_thread(_push, config, request)

    pending_study: reactive.Value[str | None] = reactive.value(None, name="pending_study")
    pending_series: reactive.Value[str | None] = reactive.value(None, name="pending_series")
    listed = reactive.value(False, name="studies_listed")

    def fetch(study_uid: str, series_uid: str | None) -> None:
        fetch_progress.reset()
        fetch_task.invoke(_FetchRequest(study_uid, series_uid, fetch_progress))

    # -- studies and series -----------------------------------------------------------------------
    @reactive.effect
    @reactive.event(input.source)
    def _first_list() -> None:
        if enabled and input.source() == PACS and not listed():
            listed.set(True)
            studies_task.invoke()

    @reactive.effect
    @reactive.event(input.pacs_refresh)
    def _refresh() -> None:
        if enabled:
            listed.set(True)
            studies_task.invoke()

    @reactive.effect
    def _studies_listed() -> None:
        if studies_task.status() != "success":
            return
        outcome = studies_task.result()
        studies: list[StudySummary] = outcome.value or []
        choices = {s.study_uid: ps.study_label(s) for s in studies}
        with reactive.isolate():
            wanted = pending_study() or input.pacs_study()
        if wanted and wanted not in choices:
            choices = {wanted: f"study …{wanted[-6:]}", **choices}
        selected = wanted if wanted in choices else next(iter(choices), None)
        ui.update_select("pacs_study", choices=choices, selected=selected)

    @reactive.effect
    @reactive.event(input.pacs_study)
    def _list_series() -> None:
        study_uid = input.pacs_study()
        if enabled and study_uid:
            series_task.invoke(study_uid)

    @reactive.effect
    def _series_listed() -> None:
        if series_task.status() != "success":
            return
        study_uid, choices = series_task.result().value
        usable = {c.series_uid: c.label for c in choices if c.refusal is None}
        with reactive.isolate():
            opened = pending_study() == study_uid
            wanted = pending_series() if opened else None
            current = input.pacs_series()
            if opened:  # the study opened from the worklist is shown: the user's choices rule again
                pending_study.set(None)
                pending_series.set(None)
        selected = next((uid for uid in (wanted, current) if uid in usable), ps.default_series(choices))
        ui.update_select("pacs_series", choices=usable, selected=selected)

    @render.ui
    def pacs_series_note():
        if series_task.status() != "success":
            return None
        _, choices = series_task.result().value
        refused = [c for c in choices if c.refusal is not None]
        if not refused:
            return None
        items = [ui.tags.li(f"#{c.number if c.number is not None else '?'} "
                            f"{c.description or 'no description'}: {c.refusal}") for c in refused]
        return ui.div(ui.p("Not offered (this model reads axial head CT):", class_="mb-1"), ui.tags.ul(*items),
                      class_="panel-help text-muted small pacs-refused")

    # -- fetch ------------------------------------------------------------------------------------
    @reactive.effect
    @reactive.event(input.pacs_fetch)
    def _fetch_clicked() -> None:
        study_uid = input.pacs_study()
        if not (enabled and study_uid):
            return
        series_uid = input.pacs_series() or None
        if series_task.status() == "success":
            listed_study, choices = series_task.result().value
            if listed_study != study_uid or series_uid not in {c.series_uid for c in choices}:
                series_uid = None  # the pickers are still catching up: the study's default series
        fetch(study_uid, series_uid)

    @reactive.effect
    def _fetched() -> None:
        if fetch_task.status() == "success":
            outcome = fetch_task.result()
            if outcome.value is not None:
                with reactive.isolate():
                    on_fetched(outcome.value)

    # -- the worklist's click-through ---------------------------------------------------------------
    if ctx.open_study is not None:
        open_study = ctx.open_study

        @reactive.effect
        def _open() -> None:
            request = open_study()
            if request is None or not enabled:
                return
            with reactive.isolate():
                open_study.set(None)  # consumed
                ui.update_radio_buttons("source", selected=PACS)
                pending_study.set(request.study_uid)
                pending_series.set(request.series_uid)
                on_open(request)
                listed.set(True)
                studies_task.invoke()  # the pickers then show the study opened
                fetch(request.study_uid, request.series_uid)
                if _value(input.pacs_study) == request.study_uid:  # no change of the picker lists its series
                    series_task.invoke(request.study_uid)

    # -- store ------------------------------------------------------------------------------------
    def pushable() -> tuple[Any, str | None]:
        """(the batch, None) when its result can be stored; else (batch or None, why not)."""
        b = batch()
        if b is None or getattr(b, "origin", None) is None:
            return b, "Fetch and predict a series first."
        origin = b.origin
        if ps.complete_result(origin, b.results) is None:
            return b, (f"Only {len(b.usable)} of {origin.n_instances} slices were predicted: nothing is stored "
                       "unless every slice is.")
        return b, None

    pushed_batch: reactive.Value[object] = reactive.value(None, name="pushed_batch")  # the batch last stored
    invoked: list[object] = [None]  # the batch of the last push invoked (its outcome is shown beside it)

    @reactive.effect
    def _push_button() -> None:
        b, why = pushable()
        stored = b is not None and pushed_batch() is b
        ui.update_action_button("pacs_push", disabled=why is not None or push_task.status() == "running" or stored)

    @reactive.effect
    @reactive.event(input.pacs_push)
    def _push_clicked() -> None:
        b, why = pushable()
        if why is not None or push_task.status() == "running" or pushed_batch() is b:
            return
        invoked[0] = b
        push_task.invoke(_PushRequest(b.origin, tuple(b.results), b.run_id, b))

    @reactive.effect
    def _pushed() -> None:
        if push_task.status() != "success" or push_task.result().value is None:
            return
        pushed: PushedSr = push_task.result().value
        b = invoked[0]
        with reactive.isolate():
            pushed_batch.set(b)
            results.mark_pushed(b.origin.url, b.run_id, b.origin.study_uid, b.origin.series_uid,
                                pushed.sop_instance_uid)

    @render.ui
    def pacs_summary():
        b = batch()
        if b is None or getattr(b, "origin", None) is None:
            return help_text("After a series from the PACS is predicted, its result can be stored in the PACS "
                             "as a DICOM SR (marked unverified, not for diagnostic use) in the same study.")
        origin = b.origin
        return ui.p(
            f"Study …{origin.study_uid[-12:]}, {origin.series_label}: {len(b.usable)} of {origin.n_instances} "
            f"slices predicted by {b.run_name}.",
            class_="mb-2",
        )

    @render.ui
    def pacs_pushed():
        status = push_task.status()
        if status == "running":
            return ui.div(ui.span(class_="spinner-border spinner-border-sm me-2", role="status"),
                          "Storing the SR…", class_="alert alert-info panel-message mt-2")
        b, why = pushable()
        if status != "success" or invoked[0] is not b:
            return help_text(why) if why and b is not None and b.origin is not None else None
        outcome = push_task.result()
        if outcome.error:
            return ui.div(message(outcome.error, kind="error"), class_="mt-2")
        pushed: PushedSr = outcome.value
        return ui.div(
            ui.tags.strong("Stored in the PACS. "),
            "New SR: SOP Instance UID ",
            ui.tags.code(pushed.sop_instance_uid, class_="sr-uid"),
            f" (series {pushed.series_uid}).",
            class_="alert alert-success panel-message mt-2 pacs-stored",
            role="status",
        )

    # -- status lines for the panel -----------------------------------------------------------------
    def lines() -> list[Tag]:
        if not enabled or input.source() != PACS:
            return []
        out: list[Tag] = []
        for task in (studies_task, series_task):
            if task.status() == "success" and task.result().error:
                out.append(message(task.result().error, kind="error"))
        if studies_task.status() == "running":
            out.append(_busy("Listing the PACS's CT studies…"))
        elif studies_task.status() == "success" and not studies_task.result().error and not studies_task.result().value:
            out.append(message("The PACS holds no CT study.", kind="warning"))
        status = fetch_task.status()
        if status == "running":
            reactive.invalidate_later(0.5)
            out.append(_busy(fetch_progress.text("Fetching")))
        elif status == "success" and fetch_task.result().error:
            out.append(message(fetch_task.result().error, kind="error"))
        return out

    return PacsSource(lines=lines)


def _value(read: Callable[[], Any]) -> Any:
    """An input's value, or None before the browser has reported it (Shiny would stop the caller)."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - SilentException: no value yet
        return None


def _busy(text: str) -> Tag:
    return ui.div(ui.span(class_="spinner-border spinner-border-sm me-2", role="status"), text,
                  class_="alert alert-info panel-message")
