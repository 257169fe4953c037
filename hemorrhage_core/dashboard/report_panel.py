"""Report panel: the runs folder's report (``hemorrhage_core.report``, ``report_html``) as tables, each with a CSV
download, and the whole report as one self-contained HTML file ("Download report").

Gathering (the paired comparison's bootstrap included) runs in an extended task on a worker thread,
only while the tab is shown. It runs again when a finished run's files or pipeline.json change, and
on "Gather again" (saving an evaluation changes neither, so a report waiting for a new evaluation
needs the button).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import report, report_html
from hemorrhage_core.dashboard.common import AppContext, distinct, help_text, message
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import file_stamp

# How often this session looks at pipeline.json (one stat call), which the runs poll does not watch.
PIPELINE_POLL_SECONDS = 5.0
# Report tables in the dashboard: Bootstrap's look, numbers right-aligned, validation rows muted.
_STYLE = """
.report-panel td.num { text-align: right; font-variant-numeric: tabular-nums; }
.report-panel td.id { white-space: nowrap; font-family: var(--bs-font-monospace); font-size: 0.8rem; }
.report-panel tr.optimistic td { color: var(--bs-secondary-color); font-style: italic; }
.report-panel .note { color: var(--bs-secondary-color); font-size: 0.85rem; margin: 0; }
.report-panel .scroll { overflow-x: auto; }
"""


@module.ui
def report_ui() -> Tag:
    cards = [
        ui.card(
            ui.card_header(
                ui.div(
                    ui.span(title),
                    ui.download_link(f"csv_{key}", "CSV", class_="btn btn-sm btn-outline-secondary py-0"),
                    class_="d-flex justify-content-between align-items-center w-100",
                )
            ),
            ui.output_ui(f"table_{key}"),
            full_screen=True,
            max_height="520px",  # long tables scroll; full screen shows them whole
        )
        for key, title in report.TABLE_TITLES.items()
    ]
    return ui.layout_sidebar(
        ui.sidebar(
            ui.download_button("download_report", "Download report", class_="btn-primary"),
            ui.input_action_button("refresh", "Gather again"),
            help_text(
                "One HTML file with every table below and the figures (ROC, paired comparison, "
                "reliability): it loads nothing from the network, so it opens offline and can be "
                "archived or sent as it is. The pipeline's four runs (pipeline.json), else the "
                "finished runs."
            ),
            ui.output_ui("summary"),
            width=320,
        ),
        ui.tags.style(_STYLE),
        ui.output_ui("status"),
        *cards,
        class_="report-panel",
    )


@module.server
def report_server(input, output, session, ctx: AppContext) -> None:
    runs_dir = Path(ctx.config.runs_dir)

    @reactive.poll(lambda: file_stamp(runs_dir / report.PIPELINE_JSON), PIPELINE_POLL_SECONDS)
    def pipeline_stamp():
        return file_stamp(runs_dir / report.PIPELINE_JSON)

    # What the report reads that the runs poll sees: the finished runs' files. A run that is training
    # changes its stamp every epoch but is not in the report until it finishes.
    source = distinct(
        lambda: (
            pipeline_stamp(),
            tuple(
                (s.id, ctx.snapshot().stamps.get(s.path.name))
                for s in ctx.snapshot().summaries
                if s.status == "finished"
            ),
        ),
        initial=None,
        name="report_source",
    )

    @reactive.extended_task
    async def gather(_key) -> Gathered | str:
        return await asyncio.to_thread(_gather, ctx)

    invoked: list = [object()]  # the key last gathered for (a sentinel that equals no key)

    @reactive.effect
    def _start() -> None:
        key = (source(), input.refresh())
        # Gather only while the tab is shown: a session that never opens it costs nothing. (None:
        # the browser has not reported yet, so gather.)
        if session.clientdata.output_hidden("status") or key == invoked[0]:
            return
        invoked[0] = key
        gather.invoke(key)

    last: reactive.Value[Gathered | str | None] = reactive.value(None, name="last_report")

    @reactive.effect
    def _keep() -> None:
        if gather.status() == "success":
            last.set(gather.result())

    def tables() -> dict[str, report.ReportTable]:
        gathered = last()
        return gathered.tables if isinstance(gathered, Gathered) else {}

    @render.ui
    def status():
        gathered = last()
        lines = []
        if gather.status() == "running":
            lines.append(message("Gathering the report…"))
        elif gather.status() == "error":
            try:
                gather.result()
            except Exception as exc:  # noqa: BLE001
                lines.append(message(user_message(exc, context="report"), kind="error"))
        if isinstance(gathered, str):
            lines.append(message(gathered, kind="warning"))
        elif gathered is not None:
            lines += [message(note, kind="warning") for note in gathered.content.notes]
        return ui.div(*lines)

    @render.ui
    def summary():
        gathered = last()
        if not isinstance(gathered, Gathered):
            return None
        content = gathered.content
        kind = "the pipeline's runs (pipeline.json)" if content.pipeline is not None else "the finished runs"
        return help_text(
            f"{len(content.runs)} runs: {kind}; held-out evaluation '{content.evaluation}'; "
            f"gathered {content.generated}."
        )

    for key in report.TABLE_TITLES:
        _table_outputs(output, key, tables)

    @render.download(filename=lambda: f"hemorrhage-report-{datetime.now(UTC):%Y%m%d-%H%M}.html",
                     media_type="text/html")
    async def download_report():
        text = await asyncio.to_thread(_report_html, ctx, last())
        yield text.encode("utf-8")


def _table_outputs(output, key: str, tables) -> None:
    """The table and CSV download outputs of report table ``key``."""

    @output(id=f"table_{key}")
    @render.ui
    def _table():
        table = tables().get(key)
        if table is None:
            return ui.div("Gathering…", class_="text-muted small")
        if table.frame.empty:
            return ui.div("Nothing to show here for these runs.", class_="text-muted small")
        return ui.HTML(report_html.table_html(table, css_class="table table-sm table-hover mb-1"))

    @output(id=f"csv_{key}")
    @render.download(filename=f"report-{key.replace('_', '-')}.csv", media_type="text/csv")
    def _csv():
        table = tables().get(key)
        frame = table.frame if table is not None else None
        yield "" if frame is None else frame.to_csv(index=False, lineterminator="\n")


@dataclass(frozen=True)
class Gathered:
    """A gathered report and its tables by key (built on the worker thread too)."""

    content: report.ReportContent
    tables: dict[str, report.ReportTable]


def _gather(ctx: AppContext) -> Gathered | str:
    """Worker-thread body: the report's content and tables, or why there is none (for the page)."""
    try:
        content = report.collect_report(
            ctx.config.runs_dir, n_resamples=ctx.config.bootstrap_resamples, seed=ctx.config.bootstrap_seed
        )
    except report.ReportError as exc:
        return str(exc).replace(os.fspath(ctx.config.runs_dir), "the runs folder")
    return Gathered(content, {t.key: t for t in report.report_tables(content)})


def _report_html(ctx: AppContext, gathered: Gathered | str | None) -> str:
    """The report the panel shows (gathered afresh when none is shown yet); a page saying why when
    there is nothing to report."""
    if not isinstance(gathered, Gathered):
        gathered = _gather(ctx)
    if isinstance(gathered, str):
        return report_html.message_page(gathered)
    return report_html.render_report(gathered.content, list(gathered.tables.values()))
