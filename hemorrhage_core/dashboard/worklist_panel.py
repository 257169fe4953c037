"""Worklist panel: the PACS's recent CT studies, suspected hemorrhage first, each opening in Predict.

A study shows the study-level probability of ``any`` hemorrhage (the maximum over its series' slices)
when the chosen run has predicted it, here (``DashboardResults``, any session of this app) or by a
``pacs watch`` of the same server and run (its state file); studies at or above the run's study-level
threshold for ``any``, chosen on its validation set, are flagged and listed first. Clicking a study
opens it in the Predict panel, fetched from the PACS and predicted by the same run.

The study list is one QIDO-RS query on an extended task's worker thread when the panel is first shown,
then every ``REFRESH_SECONDS`` while it is shown, and on Refresh; results are re-read every few
seconds (an in-memory counter and a file stamp). Without ``HEMORRHAGE_DICOMWEB_URL`` the panel says how
to configure a PACS and asks nothing of any server.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core.dashboard import pacs_source as ps
from hemorrhage_core.dashboard.common import AppContext, help_text, message, sync_run_select
from hemorrhage_core.dashboard.config import PACS_URL_ENV
from hemorrhage_core.dashboard.predict_panel import default_model
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import file_stamp

REFRESH_SECONDS = 60.0
RESULTS_POLL_SECONDS = 2.0
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SOURCE_NAMES = {ps.DASHBOARD: "this dashboard", ps.WATCH: "pacs watch"}


@module.ui
def worklist_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("model", "Model (a finished run)", choices={}),
            ui.input_action_button("refresh", "Refresh list", class_="btn-sm btn-outline-secondary"),
            ui.output_ui("threshold_note"),
            help_text(
                "The PACS's newest CT studies. A probability appears once the chosen run has predicted the "
                "study: in this dashboard (Predict, From PACS; kept until the app restarts) or by "
                "`python -m training pacs watch` with the same server and run. Studies at or above the run's "
                "threshold are flagged and listed first; the others follow, newest first. Click Open to see "
                "a study's series in the Predict panel. Only the study date, description, modalities and "
                "counts are shown: no patient name or id."
            ),
            width=320,
        ),
        ui.output_ui("status"),
        ui.output_ui("table"),
        ui.p(
            "Research use only: the flags are a model's output to question, not a diagnosis, and this order "
            "is no triage decision.",
            class_="small fw-semibold mt-2",
        ),
    )


def _date(text: str | None) -> str:
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "–"


def worklist_table(rows: list[ps.WorklistRow], open_input: str) -> Tag:
    """The worklist as an HTML table; each row's Open button sets ``open_input`` to
    ``"<study uid>|<series uid>"`` (UIDs are digits and dots, checked again on arrival)."""
    body = []
    for row in rows:
        study, result = row.study, row.result
        if row.flagged:
            flag = ui.span("⚠ suspected", class_="badge text-bg-danger")
        elif result is not None:
            flag = ui.span("below threshold", class_="text-muted small")
        else:
            flag = ui.span("not predicted", class_="text-muted small")
        if result is not None:
            origin = SOURCE_NAMES.get(result.source, result.source)
            where = ui.span(origin, ui.span(" · SR stored", class_="sr-stored") if result.sr_sop_instance_uid else "")
        else:
            where = ""
        series = result.series_uid if result is not None and result.series_uid else ""
        target = f"{study.study_uid}|{series}"
        button = ui.tags.button(
            "Open",
            type="button",
            class_="btn btn-sm btn-outline-primary worklist-open",
            onclick=f"Shiny.setInputValue({json.dumps(open_input)}, {json.dumps(target)}, {{priority: 'event'}})",
        ) if parse_open(target) is not None else ""  # a server's malformed UID gets no button
        body.append(
            ui.tags.tr(
                ui.tags.td(flag),
                ui.tags.td("–" if row.any is None else f"{row.any:.3f}", class_="text-end"),
                ui.tags.td(_date(study.study_date)),
                ui.tags.td(study.description or ui.span("no description", class_="text-muted")),
                ui.tags.td("/".join(study.modalities)),
                ui.tags.td("" if study.n_series is None else str(study.n_series), class_="text-end"),
                ui.tags.td("" if study.n_instances is None else str(study.n_instances), class_="text-end"),
                ui.tags.td(where, class_="small"),
                ui.tags.td(button),
                class_="worklist-flagged" if row.flagged else "",
                **{"data-study": study.study_uid},
            )
        )
    head = ui.tags.thead(
        ui.tags.tr(
            ui.tags.th("flag"),
            ui.tags.th("any", class_="text-end", title="study-level probability of any hemorrhage"),
            ui.tags.th("study date"),
            ui.tags.th("description"),
            ui.tags.th("modalities"),
            ui.tags.th("series", class_="text-end"),
            ui.tags.th("images", class_="text-end"),
            ui.tags.th("predicted by"),
            ui.tags.th(""),
        )
    )
    return ui.tags.table(head, ui.tags.tbody(*body), class_="table table-sm table-hover worklist-table")


def parse_open(value: object) -> tuple[str, str | None] | None:
    """(study uid, series uid or None) from an Open click's value; None for anything else."""
    if not isinstance(value, str) or value.count("|") != 1:
        return None
    study, series = value.split("|")
    if not (0 < len(study) <= 64 and _UID.match(study)) or (series and not (len(series) <= 64 and _UID.match(series))):
        return None
    return study, series or None


@module.server
def worklist_server(input, output, session, ctx: AppContext) -> None:
    config = ctx.config
    enabled = config.pacs_url is not None
    results = ctx.pacs_results or ps.DashboardResults()

    def candidates():
        return ctx.snapshot().select(kind="train", statuses=("finished",), with_model=True)

    sync_run_select(
        "model", candidates, current=lambda: input.model(), default=lambda runs: default_model(list(runs))
    )

    @reactive.extended_task
    async def studies_task() -> tuple[list, str | None]:
        return await asyncio.to_thread(_list, config)

    root = session.root_scope()

    def shown() -> bool:
        try:
            return root.input["panel"]() == "worklist"
        except Exception:  # noqa: BLE001 - the navbar's input is absent until the page reports it
            return False

    @reactive.effect
    def _auto_refresh() -> None:
        if not enabled or not shown():
            return
        reactive.invalidate_later(REFRESH_SECONDS)
        with reactive.isolate():
            if studies_task.status() != "running":
                studies_task.invoke()

    @reactive.effect
    @reactive.event(input.refresh)
    def _refresh() -> None:
        if enabled and studies_task.status() != "running":
            studies_task.invoke()

    # -- the chosen run: its id, threshold and results ------------------------------------------------
    @reactive.calc
    def run() -> tuple[str, Path] | None:
        run_key = input.model()
        if not run_key:
            return None
        try:
            record = ctx.index.record(run_key)
        except Exception:  # noqa: BLE001 - the status line says so
            return None
        return record.id, record.path

    @reactive.calc
    def threshold() -> tuple[float | None, str]:
        chosen = run()
        if chosen is None:
            return None, ""
        try:
            return ps.run_any_threshold(chosen[1])
        except Exception as exc:  # noqa: BLE001
            return None, f"No threshold: {user_message(exc, context='worklist threshold')}"

    @reactive.calc
    def server() -> tuple[str | None, str | None]:
        """(the URL as the library writes it, or None; why it cannot be used)."""
        if not enabled:
            return None, None
        try:
            return ps.server_url(config), None
        except Exception as exc:  # noqa: BLE001
            return None, ps.pacs_message(exc, context="PACS settings")

    @reactive.calc
    def state_path() -> Path | None:
        url, chosen = server()[0], run()
        if url is None or chosen is None:
            return None
        try:
            return ps.watch_state_path(config, url, chosen[0])
        except Exception:  # noqa: BLE001 - no state folder: no watch results
            return None

    def results_stamp():
        path = state_path()
        return results.version, file_stamp(path) if path is not None else None

    @reactive.poll(results_stamp, RESULTS_POLL_SECONDS)
    def known() -> tuple[dict[str, ps.StudyResult], str | None]:
        url, chosen, path = server()[0], run(), state_path()
        if url is None or chosen is None:
            return {}, None
        problem = None
        watched: dict[str, ps.StudyResult] = {}
        if path is not None:
            try:
                watched = ps.watch_results(path, url, chosen[0])
            except Exception as exc:  # noqa: BLE001
                problem = ps.describe_state_problem(exc)
        return ps.merge_results(watched, results.results(url, chosen[0])), problem

    # -- output ------------------------------------------------------------------------------------
    @render.ui
    def threshold_note():
        value, how = threshold()
        if value is None:
            return help_text(how) if how else None
        return help_text(ui.tags.strong(f"Flag: any ≥ {value:.3f}"), f" (the run's study-level threshold, {how}).")

    @render.ui
    def status():
        if not enabled:
            return ui.div(
                message(
                    ui.span(
                        ui.tags.strong("No PACS is configured. "),
                        f"Set {PACS_URL_ENV} to the PACS's DICOMweb address (e.g. "
                        "http://127.0.0.1:8042/dicom-web), with HEMORRHAGE_DICOMWEB_USER and "
                        "HEMORRHAGE_DICOMWEB_PASSWORD (or HEMORRHAGE_DICOMWEB_TOKEN) for its credentials, and "
                        "restart the dashboard. See docs/pacs.md.",
                    ),
                    kind="info",
                ),
                class_="worklist-off",
            )
        lines = []
        problem = server()[1]
        if problem:
            return message(problem, kind="error")
        if not candidates():
            lines.append(message("No finished run with a saved model yet: studies are listed without "
                                 "probabilities.", kind="warning"))
        state_problem = known()[1]
        if state_problem:
            lines.append(message(state_problem, kind="warning"))
        task = studies_task.status()
        if task == "running":
            lines.append(ui.div(ui.span(class_="spinner-border spinner-border-sm me-2", role="status"),
                                "Listing the PACS's CT studies…", class_="alert alert-info panel-message"))
        elif task == "success" and studies_task.result()[1]:
            lines.append(message(studies_task.result()[1], kind="error"))
        return ui.div(*lines) if lines else None

    @render.ui
    def table():
        if not enabled or studies_task.status() != "success":
            return None
        studies, error = studies_task.result()
        if error:
            return None
        if not studies:
            return message("The PACS holds no CT study.", kind="warning")
        rows = ps.worklist_rows(studies, known()[0], threshold()[0])
        flagged = sum(r.flagged for r in rows)
        predicted = sum(r.result is not None for r in rows)
        summary = ui.p(
            f"{len(rows)} CT studies (the newest {config.pacs_worklist_limit} at most) · {predicted} predicted by "
            f"this run · {flagged} flagged",
            class_="text-muted small mb-1 worklist-summary",
        )
        return ui.div(summary, worklist_table(rows, session.ns("open")), class_="worklist")

    @reactive.effect
    @reactive.event(input.open)
    def _open() -> None:
        target = parse_open(input.open())
        if target is None or ctx.open_study is None:
            return
        ctx.open_study.set(ps.OpenStudy(target[0], target[1], input.model() or None))
        ui.update_navs("panel", selected="predict", session=root)


def _list(config) -> tuple[list, str | None]:
    """Worker thread: the studies, or one message."""
    try:
        return ps.list_studies(config), None
    except Exception as exc:  # noqa: BLE001 - one message for the page, details in the log
        return [], ps.pacs_message(exc, context="listing PACS studies")
