"""ROC panel: per-class ROC and precision-recall curves of a run's validation predictions, two runs overlaid."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard.common import (
    AppContext,
    Loaded,
    distinct,
    help_text,
    load_run_table,
    sync_run_select,
)
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.state import run_key
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import PREDICTIONS_CSV


@module.ui
def roc_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run_a", "Run", choices={}),
            ui.input_select("run_b", "Overlay a second run (dashed)", choices={}),
            ui.input_checkbox_group("labels", "Classes", choices=list(LABELS), selected=list(LABELS)),
            help_text(
                "Curves are computed from each run's validation predictions at its best epoch. "
                "The legend gives each class's area under the curve (AUC) or average precision (AP)."
            ),
            ui.output_ui("notes"),
            width=320,
        ),
        ui.card(ui.card_header("ROC curves"), figure_output("roc"), full_screen=True),
        ui.card(ui.card_header("Precision-recall curves"), figure_output("pr"), full_screen=True),
    )


@module.server
def roc_server(input, output, session, ctx: AppContext) -> None:
    def candidates():
        return ctx.snapshot().select(kind="train", with_file=PREDICTIONS_CSV)

    sync_run_select("run_a", candidates, current=lambda: input.run_a())
    sync_run_select(
        "run_b",
        candidates,
        current=lambda: input.run_b(),
        allow_none="(none)",
        default=lambda runs: run_key(runs[1]) if len(runs) > 1 else "",
    )

    chosen = distinct(
        lambda: tuple((r, ctx.snapshot().stamps.get(r)) for r in (input.run_a(), input.run_b()) if r),
        initial=(),
        name="chosen",
    )

    @reactive.calc
    def loaded() -> list[Loaded]:
        out = []
        for run_id, _ in dict.fromkeys(chosen()):
            item = load_run_table(ctx, run_id, "predictions")
            if item is not None:
                out.append(item)
        return out

    def figure(kind: str):
        frames = {item.name: item.frame for item in loaded() if item.frame is not None}
        return plots.roc_figure(frames, labels=list(input.labels() or ()), kind=kind)

    @render_figure
    def roc():
        return figure("roc")

    @render_figure
    def pr():
        return figure("pr")

    @render.ui
    def notes():
        items = loaded()
        lines = [
            ui.p(f"{item.name}: {item.problem}", class_="small text-warning-emphasis")
            for item in items
            if item.problem
        ]
        lines += [
            ui.p(f"{item.name}: {len(item.frame)} validation slices", class_="small text-muted")
            for item in items
            if item.frame is not None
        ]
        return ui.div(*lines)
