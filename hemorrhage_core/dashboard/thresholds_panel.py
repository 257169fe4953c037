"""Thresholds panel: one class, one decision threshold: confusion matrix, sensitivity, specificity, PPV, NPV,
on a chosen data set, starting from the run's own operating point (Youden's J, chosen on validation)."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import eval_plots, metrics, plots
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import AppContext, help_text, message, sync_run_select
from hemorrhage_core.dashboard.evaluation_data import RunData, data_note, data_select, data_selector
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import PREDICTIONS_CSV


@module.ui
def thresholds_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Run", choices={}),
            data_select("data"),
            ui.input_select("label", "Class", choices=list(LABELS), selected="any"),
            ui.input_slider("threshold", "Decision threshold", min=0.0, max=1.0, value=0.5, step=0.01),
            ui.output_ui("operating_point"),
            ui.input_action_link("reset", "Back to the run's threshold", class_="small"),
            help_text(
                "A slice counts as positive for the class when its predicted probability is at or above "
                "the threshold. Lower thresholds find more bleeds (sensitivity) at the cost of more false "
                "alarms (specificity, PPV). The slider starts at the run's own threshold, chosen on the "
                "validation set (Youden's J, the point of the ROC curve farthest above chance)."
            ),
            width=320,
        ),
        ui.output_ui("problem"),
        ui.layout_columns(
            ui.card(ui.card_header(ui.output_text("confusion_title", inline=True)), figure_output("confusion")),
            ui.card(ui.card_header("At this threshold"), ui.output_data_frame("numbers")),
            col_widths=(7, 5),
        ),
        ui.card(ui.card_header("Every threshold"), figure_output("sweep"), full_screen=True),
    )


@module.server
def thresholds_server(input, output, session, ctx: AppContext) -> None:
    sync_run_select(
        "run", lambda: ctx.snapshot().select(kind="train", with_file=PREDICTIONS_CSV), current=lambda: input.run()
    )
    selected = data_selector(ctx, "data", lambda: [("run", input.run())], lambda: input.data())

    @reactive.calc
    def loaded() -> RunData | None:
        items = selected()
        return items[0] if items else None

    @reactive.calc
    def run_threshold() -> tuple[float, bool] | str | None:
        """(the run's threshold for the class, whether it was defaulted), or why there is none."""
        item = loaded()
        if item is None or item.data is None:
            return None
        try:
            chosen = item.data.thresholds()
        except Exception as exc:  # noqa: BLE001 - a damaged thresholds file is a message, not an error
            return user_message(exc, context="reading thresholds")
        label = input.label()
        return float(chosen["slice"][label]), label in chosen.get("slice_defaulted", [])

    # Move the slider to the run's threshold when the run, data set or class changes, not on every poll.
    target = reactive.value(None)

    @reactive.effect
    def _follow() -> None:
        value = run_threshold()
        key = (input.run(), input.data(), input.label(), value if isinstance(value, tuple) else None)
        with reactive.isolate():
            if key == target.get():
                return
        target.set(key)
        if isinstance(value, tuple):
            ui.update_slider("threshold", value=round(value[0], 2))

    @reactive.effect
    @reactive.event(input.reset)
    def _reset() -> None:
        value = run_threshold()
        if isinstance(value, tuple):
            ui.update_slider("threshold", value=round(value[0], 2))

    @render.ui
    def operating_point():
        value = run_threshold()
        if value is None:
            return None
        if isinstance(value, str):
            return ui.p(value, class_="small text-warning-emphasis")
        threshold, defaulted = value
        why = (
            "the validation set has one class only for it, so the default"
            if defaulted
            else "Youden's J on the validation set"
        )
        return ui.p(
            ui.strong(f"Run's threshold for {input.label()}: {threshold:.3f}"),
            f" ({why}).",
            class_="small mb-1",
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
            return message("No run with predictions yet.")
        return data_note([item])

    @render.text
    def confusion_title():
        item = loaded()
        if item is None or item.data is None:
            return "Confusion matrix"
        return f"Confusion matrix ({item.data.name}: {item.data.n_images} slices)"

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
        fig = plots.threshold_sweep_figure(data[0], data[1], float(input.threshold()), label=input.label())
        value = run_threshold()
        if isinstance(value, tuple):
            eval_plots.mark_threshold(fig, value[0], f"run's threshold {value[0]:.3f}")
        return fig
