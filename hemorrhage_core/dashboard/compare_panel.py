"""Compare panel: two runs (by default the newest VGG16 and Inception_v3 models), class by class.

Bootstrap intervals over thousands of slices take a moment, so they are computed in an extended task
off the event loop, keeping every session responsive.
"""

from __future__ import annotations

import asyncio

import pandas as pd
from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import (
    AppContext,
    distinct,
    help_text,
    load_run_table,
    message,
    sync_run_select,
)
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import run_key
from hemorrhage_core.runs import PREDICTIONS_CSV, RunSummary

PREFERRED = ("vgg16", "inception_v3")


def default_pair(runs: list[RunSummary]) -> tuple[str | None, str | None]:
    """Two runs to compare first: the best-ranked VGG16 and Inception_v3 runs when both exist, else the
    best-ranked runs of two different backbones, else the two best-ranked runs.

    Ranking prefers stage 2, then finished runs, then the newest.
    """
    ranked = sorted(runs, key=lambda s: (s.stage == 2, s.status == "finished", s.created or ""), reverse=True)
    picked = [next((s for s in ranked if s.backbone == name), None) for name in PREFERRED]
    picked = [s for s in picked if s is not None]
    if len(picked) < 2:
        for s in ranked:  # another backbone first: the comparison is about architectures
            if len(picked) < 2 and s not in picked and all(s.backbone != p.backbone for p in picked):
                picked.append(s)
        for s in ranked:
            if len(picked) < 2 and s not in picked:
                picked.append(s)
    keys = [run_key(s) for s in picked] + [None, None]
    return keys[0], keys[1]


@module.ui
def compare_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run_a", "Run A", choices={}),
            ui.input_select("run_b", "Run B", choices={}),
            help_text(
                "Both runs' validation predictions at their best epoch. Intervals come from resampling "
                "patients (all of a patient's slices together), 95% level. When both runs were validated "
                "on the same slices the difference is paired slice by slice."
            ),
            width=320,
        ),
        ui.output_ui("verdict"),
        ui.layout_columns(
            ui.card(ui.card_header(ui.output_text("title_a", inline=True)), figure_output("roc_a")),
            ui.card(ui.card_header(ui.output_text("title_b", inline=True)), figure_output("roc_b")),
            col_widths=(6, 6),
        ),
        ui.card(
            ui.card_header("Per-class AUC with intervals, and the difference"),
            figure_output("auc"),
            full_screen=True,
        ),
        ui.card(ui.card_header("Numbers"), ui.output_data_frame("numbers")),
    )


@module.server
def compare_server(input, output, session, ctx: AppContext) -> None:
    def candidates():
        return ctx.snapshot().select(kind="train", with_file=PREDICTIONS_CSV)

    sync_run_select(
        "run_a", candidates, current=lambda: input.run_a(), default=lambda runs: default_pair(list(runs))[0]
    )
    sync_run_select(
        "run_b", candidates, current=lambda: input.run_b(), default=lambda runs: default_pair(list(runs))[1]
    )
    chosen = distinct(
        lambda: tuple((r, ctx.snapshot().stamps.get(r)) for r in (input.run_a(), input.run_b())),
        initial=(),
        name="chosen",
    )

    @reactive.calc
    def loaded():
        pair = chosen()
        if len(pair) != 2 or not pair[0][0] or not pair[1][0]:
            return None
        return [load_run_table(ctx, run_id, "predictions") for run_id, _ in pair]

    @reactive.extended_task
    async def compare_task(
        pair: tuple[str, str], pred_a: pd.DataFrame, pred_b: pd.DataFrame, resamples: int, seed: int
    ):
        result = await asyncio.to_thread(
            tables.comparison_table, pred_a, pred_b, n_resamples=resamples, seed=seed
        )
        return pair, result

    @reactive.effect
    def _start() -> None:
        items = loaded()
        if not items or any(item.frame is None for item in items):
            return
        # A new pair makes any running or queued bootstrap stale: drop it rather than queue behind it
        # (the extended task would otherwise compute every pair the user clicked through, in order).
        compare_task.cancel()
        compare_task.invoke(
            (items[0].run_id, items[1].run_id),
            items[0].frame,
            items[1].frame,
            ctx.config.bootstrap_resamples,
            ctx.config.bootstrap_seed,
        )

    def run_names(items) -> tuple[str, str]:
        with reactive.isolate():
            snap = ctx.snapshot()
        names = []
        for letter, item in zip("AB", items, strict=True):
            summary = snap.by_id(item.run_id)
            names.append(
                f"{letter} ({summary.backbone} s{summary.stage})" if summary and summary.backbone else letter
            )
        return names[0], names[1]

    def title(index: int) -> str:
        items = loaded()
        return f"ROC · {'AB'[index]}: {items[index].name}" if items else f"ROC · run {'AB'[index]}"

    @render.text
    def title_a():
        return title(0)

    @render.text
    def title_b():
        return title(1)

    def roc(index: int):
        items = loaded()
        if not items or items[index].frame is None:
            return plots.empty_figure("Pick two runs with validation predictions.")
        return plots.roc_figure({items[index].name: items[index].frame}, legend="below")

    @render_figure
    def roc_a():
        return roc(0)

    @render_figure
    def roc_b():
        return roc(1)

    @reactive.calc
    def comparison() -> tables.Comparison | None | Exception:
        """The finished comparison of the pair shown now; None while it is computing or stale."""
        if compare_task.status() != "success":
            return None
        try:
            pair, result = compare_task.result()
        except Exception as exc:  # noqa: BLE001 - shown as a message, never a traceback
            return exc
        items = loaded()
        if not items or pair != (items[0].run_id, items[1].run_id):
            return None
        return result

    @render.ui
    def verdict():
        items = loaded()
        if not items:
            return message("Pick two runs that have validation predictions.")
        problems = [f"{item.name}: {item.problem}" for item in items if item.problem]
        if problems:
            return message(" ".join(problems), kind="warning")
        if compare_task.status() == "running":
            return message("Computing bootstrap intervals…")
        if compare_task.status() == "error":
            try:
                compare_task.result()
            except Exception as exc:  # noqa: BLE001
                return message(user_message(exc, context="comparison"), kind="error")
        result = comparison()
        if not isinstance(result, tables.Comparison):
            return None
        sentences = plots.comparison_summary(result.table, *run_names(items))
        mode = (
            f"Paired comparison on the {result.n_common} slices both runs were validated on."
            if result.paired
            else f"Unpaired comparison: the runs were validated on different slices ({result.n_images_a} and "
            f"{result.n_images_b}, {result.n_common} shared); the difference's interval is approximate."
        )
        return ui.div(
            ui.p(ui.strong("A = "), items[0].name, ui.br(), ui.strong("B = "), items[1].name, class_="small"),
            ui.p(ui.strong(sentences[0])),
            ui.tags.ul(*[ui.tags.li(s) for s in sentences[1:]]),
            ui.p(mode, class_="small text-muted"),
            class_="verdict",
        )

    @render_figure
    def auc():
        result = comparison()
        if not isinstance(result, tables.Comparison):
            return plots.empty_figure("Intervals appear here once computed.")
        return plots.auc_comparison_figure(result.table, "A", "B")

    @render.data_frame
    def numbers():
        result = comparison()
        if not isinstance(result, tables.Comparison):
            return None
        frame = result.table.copy().round(4)
        floor = 1.0 / ctx.config.bootstrap_resamples
        frame["p_value"] = [
            "n/a" if pd.isna(p) else f"< {floor:g}" if p < floor else f"{p:.3f}"
            for p in result.table["p_value"]
        ]
        frame.columns = [
            "class",
            "AUC A",
            "A low",
            "A high",
            "AUC B",
            "B low",
            "B high",
            "A − B",
            "diff low",
            "diff high",
            "p (paired)",
        ]
        return render.DataGrid(frame, width="100%", summary=False)
