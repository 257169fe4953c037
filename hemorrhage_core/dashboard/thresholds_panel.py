"""Thresholds panel: one class, one decision threshold: confusion matrix, sensitivity, specificity, PPV, NPV."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import metrics, plots
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import (
    AppContext,
    chosen_run_table,
    help_text,
    message,
)
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import PREDICTIONS_CSV


@module.ui
def thresholds_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Run", choices={}),
            ui.input_select("label", "Class", choices=list(LABELS), selected="any"),
            ui.input_slider("threshold", "Decision threshold", min=0.0, max=1.0, value=0.5, step=0.01),
            help_text(
                "A slice counts as positive for the class when its predicted probability is at or above "
                "the threshold. Lower thresholds find more bleeds (sensitivity) at the cost of more false "
                "alarms (specificity, PPV)."
            ),
            width=320,
        ),
        ui.output_ui("problem"),
        ui.layout_columns(
            ui.card(ui.card_header("Confusion matrix (validation slices)"), figure_output("confusion")),
            ui.card(ui.card_header("At this threshold"), ui.output_data_frame("numbers")),
            col_widths=(7, 5),
        ),
        ui.card(ui.card_header("Every threshold"), figure_output("sweep"), full_screen=True),
    )


@module.server
def thresholds_server(input, output, session, ctx: AppContext) -> None:
    loaded = chosen_run_table(
        ctx,
        "run",
        input.run,
        lambda: ctx.snapshot().select(kind="train", with_file=PREDICTIONS_CSV),
        "predictions",
    )

    @reactive.calc
    def arrays():
        item = loaded()
        if item is None or item.frame is None:
            return None
        return tables.label_arrays(item.frame, input.label())

    @reactive.calc
    def result() -> metrics.ThresholdMetrics | None:
        data = arrays()
        if data is None or not len(data[0]):
            return None
        return metrics.threshold_metrics(data[0], data[1], float(input.threshold()))

    @render.ui
    def problem():
        item = loaded()
        if item is None:
            return message("No run with validation predictions yet.")
        if item.problem:
            return message(f"{item.name}: {item.problem}", kind="warning")
        return None

    @render_figure
    def confusion():
        r = result()
        if r is None:
            return plots.empty_figure("No predictions to count.")
        return plots.confusion_figure(
            r.tn, r.fp, r.fn, r.tp, label=f"{input.label()} at threshold {r.threshold:.2f}"
        )

    @render.data_frame
    def numbers():
        r = result()
        if r is None:
            return None
        return render.DataGrid(tables.threshold_table(r), width="100%", summary=False)

    @render_figure
    def sweep():
        data = arrays()
        if data is None or not len(data[0]):
            return plots.empty_figure("No predictions to sweep.")
        return plots.threshold_sweep_figure(data[0], data[1], float(input.threshold()), label=input.label())
