"""Grid-search panel: a grid run's cross-validated results, best parameters highlighted."""

from __future__ import annotations

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import (
    AppContext,
    chosen_run_table,
    help_text,
    message,
)
from hemorrhage_core.dashboard.figures import figure_output, render_figure


@module.ui
def grid_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Grid-search run", choices={}),
            help_text(
                "Each row is one parameter combination, scored by cross-validation with folds split by "
                "patient. The best combination (rank 1) is highlighted."
            ),
            width=320,
        ),
        ui.output_ui("best"),
        ui.card(ui.card_header("Results"), ui.output_data_frame("results"), full_screen=True),
        ui.card(
            ui.card_header("Mean score of each combination (± standard deviation over folds)"),
            figure_output("scores"),
        ),
        ui.card(
            ui.card_header("Parameters against the score (parallel coordinates)"),
            help_text(
                "Each line is one parameter combination, coloured by its mean cross-validated score. "
                "Drag along an axis to keep only the lines inside a range; drag an axis name to reorder."
            ),
            figure_output("parallel"),
            full_screen=True,
        ),
    )


@module.server
def grid_server(input, output, session, ctx: AppContext) -> None:
    loaded = chosen_run_table(ctx, "run", input.run, lambda: ctx.snapshot().select(kind="grid"), "grid_results")

    @reactive.calc
    def table():
        item = loaded()
        if item is None or item.frame is None:
            return None, None
        return tables.grid_table(item.frame)

    @reactive.calc
    def info() -> dict:
        item = loaded()
        if item is None:
            return {}
        try:
            return ctx.index.record(item.run_id).info
        except Exception:  # noqa: BLE001 - the problem is reported by ``best``
            return {}

    @render.ui
    def best():
        item = loaded()
        if item is None:
            return message("No grid-search run yet. Start one with python -m training grid-search.")
        if item.problem:
            return message(f"{item.name}: {item.problem}", kind="warning")
        meta = info()
        params = meta.get("best_params")
        params_text = tables.params_text(params) if params is not None else "n/a"
        score = meta.get("best_score")
        return ui.div(
            ui.p(ui.strong("Best parameters: "), params_text),
            ui.p(
                ui.strong("Best score: "),
                "n/a" if score is None else f"{float(score):.4f}",
                f" ({meta.get('scoring') or 'score'}, {meta.get('folds') or '?'} folds by patient)",
            ),
            class_="verdict",
        )

    @render.data_frame
    def results():
        frame, best_row = table()
        if frame is None or frame.empty:
            return None
        styles = [{"rows": [best_row], "class": "best-row"}] if best_row is not None else []
        return render.DataGrid(frame, width="100%", styles=styles, summary=False)

    @render_figure
    def scores():
        item = loaded()
        if item is None or item.frame is None:
            return plots.empty_figure("No results to plot.")
        return plots.grid_scores_figure(item.frame, scoring=str(info().get("scoring") or "score"))

    @render_figure
    def parallel():
        item = loaded()
        if item is None or item.frame is None:
            return plots.empty_figure("No results to plot.")
        return plots.grid_parallel_figure(item.frame, scoring=str(info().get("scoring") or "score"))
