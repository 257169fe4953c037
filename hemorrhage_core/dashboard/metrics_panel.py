"""Training metrics panel: loss, accuracy, weighted log loss and per-class AUC against epoch, runs overlaid."""

from __future__ import annotations

import pandas as pd
from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard.common import AppContext, distinct, help_text, sync_run_select
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import run_key, run_label

DEFAULT_RUNS_SHOWN = 2


def default_runs(runs) -> list[str]:
    """The newest finished runs (then any others), at most DEFAULT_RUNS_SHOWN."""
    ordered = sorted(runs, key=lambda s: s.status != "finished")  # stable: keeps newest first
    return [run_key(s) for s in ordered[:DEFAULT_RUNS_SHOWN]]


@module.ui
def metrics_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_selectize(
                "runs",
                "Runs to overlay",
                choices={},
                multiple=True,
                options={"placeholder": "choose runs", "plugins": ["remove_button"]},
            ),
            help_text(
                "Solid lines are training or per-slice values; dashed lines validation; dotted lines the "
                "z-smoothed or 'any' variants. A star marks each run's best epoch (the one its model "
                "was saved at)."
            ),
            ui.output_ui("notes"),
            width=320,
        ),
        ui.card(
            ui.card_header("Loss, accuracy, weighted log loss and mean AUC by epoch"),
            figure_output("curves"),
            full_screen=True,
        ),
        ui.card(
            ui.card_header("Validation ROC AUC of each class by epoch"),
            figure_output("class_auc"),
            full_screen=True,
        ),
    )


@module.server
def metrics_server(input, output, session, ctx: AppContext) -> None:
    def candidates():
        return ctx.snapshot().select(kind="train")

    sync_run_select("runs", candidates, current=lambda: input.runs(), multiple=True, default=default_runs)

    # Only the chosen runs' file stamps: other runs training elsewhere do not redraw these plots.
    selection = distinct(
        lambda: tuple((r, ctx.snapshot().stamps.get(r)) for r in (input.runs() or ())),
        initial=(),
        name="selection",
    )

    @reactive.calc
    def histories() -> tuple[dict[str, pd.DataFrame], dict[str, int | None], list[str]]:
        frames, best, problems = {}, {}, []
        for run_id, _stamp in selection():
            try:
                record = ctx.index.record(run_id)
            except Exception as exc:  # noqa: BLE001 - show the others, say what is wrong with this one
                problems.append(f"{run_id}: {user_message(exc, context='metrics panel')}")
                continue
            with reactive.isolate():
                summary = ctx.snapshot().by_id(run_id)
            name = run_label(summary) if summary is not None else run_id
            frames[name] = record.metrics
            info_best = record.info.get("best") if isinstance(record.info.get("best"), dict) else None
            best[name] = info_best.get("epoch") if info_best else None
            if record.metrics.empty:
                problems.append(f"{name}: no epoch finished yet")
        return frames, best, problems

    @render_figure
    def curves():
        frames, best, _ = histories()
        return plots.training_curves({k: v for k, v in frames.items() if not v.empty}, best)

    @render_figure
    def class_auc():
        frames, best, _ = histories()
        return plots.per_class_auc_curves({k: v for k, v in frames.items() if not v.empty}, best)

    @render.ui
    def notes():
        _, _, problems = histories()
        return ui.div(*[ui.p(p, class_="small text-warning-emphasis") for p in problems])
