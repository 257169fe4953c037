"""Calibration panel: do a run's probabilities mean what they say? Reliability diagrams per class, ECE
and Brier score on a chosen data set, before and after the run's temperature scaling when it has one."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import eval_plots, plots
from hemorrhage_core.calibration import ECE_BINS
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import AppContext, help_text, message, sync_run_select
from hemorrhage_core.dashboard.evaluation_data import RunData, data_note, data_select, data_selector
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.evaluations import EvaluationError, arrays, read_calibration
from hemorrhage_core.runs import PREDICTIONS_CSV

RAW = "raw (model output)"
CALIBRATED = "calibrated (temperature scaling)"


@module.ui
def calibration_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Run", choices={}),
            data_select("data"),
            help_text(
                "A reliability diagram puts the slices in ",
                ui.strong(f"{ECE_BINS} equal-width bins"),
                " of predicted probability and plots each bin's observed share of positives against its "
                "mean prediction: a calibrated model stays on the diagonal. Marker size and the bars "
                "under each diagram give the bin's number of slices.",
            ),
            help_text(
                f"ECE (expected calibration error): the mean gap between observed and predicted over the "
                f"{ECE_BINS} bins, weighted by their counts. Brier score: the mean squared difference "
                "between probability and truth (0 is perfect). Lower is better for both."
            ),
            help_text(
                "Temperature scaling divides each class's logit by one number fitted on the validation "
                "set; it changes the probabilities but not their order, so AUCs stay the same."
            ),
            width=320,
        ),
        ui.output_ui("about"),
        ui.card(ui.card_header("ECE and Brier score per class"), ui.output_data_frame("numbers")),
        ui.card(ui.card_header("Reliability diagrams"), figure_output("reliability"), full_screen=True),
    )


@module.server
def calibration_server(input, output, session, ctx: AppContext) -> None:
    sync_run_select(
        "run", lambda: ctx.snapshot().select(kind="train", with_file=PREDICTIONS_CSV), current=lambda: input.run()
    )
    selected = data_selector(ctx, "data", lambda: [("run", input.run())], lambda: input.data())

    @reactive.calc
    def loaded() -> RunData | None:
        items = selected()
        return items[0] if items else None

    @reactive.calc
    def calibration():
        """(the calibration shown, whether it is the run's own fitted after these data were saved)."""
        item = loaded()
        if item is None or item.data is None:
            return None, False
        if item.data.calibration is not None:
            return item.data.calibration, False
        try:  # an evaluation saved before the run was calibrated: show what its temperatures do
            fitted_later = read_calibration(item.data.run_dir)
        except EvaluationError:
            return None, False
        return fitted_later, fitted_later is not None

    @reactive.calc
    def series():
        """(truth (N, 6), {series name: probabilities (N, 6)}), raw first; None without data."""
        item = loaded()
        if item is None or item.data is None:
            return None
        data = item.data
        y_true, raw = arrays(data.raw())
        shown, later = calibration()
        if shown is None:
            return y_true, {RAW: raw}
        calibrated = shown.apply(raw) if later else arrays(data.predictions)[1]
        return y_true, {RAW: raw, CALIBRATED: calibrated}

    @render.ui
    def about():
        item = loaded()
        if item is None:
            return message("No run with predictions yet.")
        notes = []
        shown, later = calibration()
        if item.data is not None:
            if later:
                notes.append(
                    help_text(
                        "These predictions were saved before the run's calibration was fitted: 'after' "
                        "applies the run's temperatures (fitted on its validation set) to them."
                    )
                )
            elif shown is None:
                notes.append(
                    help_text(
                        "This run has no calibration: raw probabilities only. Train with `calibrate: true` "
                        "or run `python -m training evaluate --calibrate` to fit one on validation."
                    )
                )
            elif item.data.optimistic:
                notes.append(
                    help_text(
                        "The temperatures were fitted on these validation predictions, so the 'after' "
                        "numbers here flatter the calibration; a saved evaluation (test) shows it honestly."
                    )
                )
        return data_note([item], extra=ui.div(*notes))

    @render.data_frame
    def numbers():
        got = series()
        if got is None:
            return None
        y_true, probs = got
        shown, _ = calibration()
        frame = tables.calibration_table(
            y_true,
            probs[RAW],
            probs.get(CALIBRATED),
            shown.temperatures if shown is not None else None,
        )
        return render.DataGrid(frame, width="100%", summary=False)

    @render_figure
    def reliability():
        got = series()
        if got is None:
            return plots.empty_figure("Select a run and a data set with predictions.")
        y_true, probs = got
        return eval_plots.reliability_figure(y_true, probs, n_bins=ECE_BINS)
