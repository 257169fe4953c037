"""ROC panel: per-class ROC and precision-recall curves of a run on a chosen data set, two runs overlaid,
slice by slice or study by study."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard.common import AppContext, help_text, sync_run_select
from hemorrhage_core.dashboard.evaluation_data import data_note, data_select, data_selector, level_select
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.state import run_key
from hemorrhage_core.evaluations import study_frame
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import PREDICTIONS_CSV


@module.ui
def roc_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run_a", "Run", choices={}),
            ui.input_select("run_b", "Overlay a second run (dashed)", choices={}),
            data_select("data"),
            level_select("level"),
            ui.input_checkbox_group("labels", "Classes", choices=list(LABELS), selected=list(LABELS)),
            help_text(
                "Curves of each run's predictions on the chosen data set: a saved evaluation such as the "
                "held-out test set, or the validation set (which chose the best epoch, so it flatters). "
                "The legend gives each class's area under the curve (AUC) or average precision (AP). "
                "Study level scores each series by its most suspicious slice."
            ),
            width=320,
        ),
        ui.output_ui("notes"),
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
    loaded = data_selector(
        ctx,
        "data",
        lambda: [("run", input.run_a())] + ([("overlay", input.run_b())] if input.run_b() != input.run_a() else []),
        lambda: input.data(),
    )

    @reactive.calc
    def frames() -> dict:
        """Run name -> predictions at the chosen level (one calc for both figures)."""
        out = {item.name: item.frame for item in loaded() if item.frame is not None}
        if input.level() == "study":
            out = {name: study_frame(frame) for name, frame in out.items()}
        return out

    def figure(kind: str):
        if not frames():
            return plots.empty_figure("Select a run and a data set with predictions.")
        return plots.roc_figure(frames(), labels=list(input.labels() or ()), kind=kind)

    @render_figure
    def roc():
        return figure("roc")

    @render_figure
    def pr():
        return figure("pr")

    @render.ui
    def notes():
        return data_note(loaded(), level=input.level())
