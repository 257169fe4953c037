"""Compare panel: two runs on one data set, class by class, paired image by image when they share images.

By default the pipeline's two final models (pipeline.json's phase1 and phase2 stage-2 runs) on the
held-out ``test`` evaluation. Paired: DeLong's p-value per class, Holm-adjusted over the classes, and
patient-bootstrap intervals. Evaluations without a shared image (validation sets of different
patients) fall back to each run's own intervals and an approximate unpaired difference, and say so.
Bootstrap intervals over thousands of slices take a moment, so they are computed in an extended task
off the event loop, keeping every session responsive.
"""

from __future__ import annotations

import asyncio

import pandas as pd
from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import eval_plots, plots
from hemorrhage_core.comparison import summary_sentences
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import AppContext, help_text, message, sync_run_select
from hemorrhage_core.dashboard.evaluation_data import (
    data_note,
    data_select,
    data_selector,
    level_select,
    pipeline_pair,
)
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import run_key
from hemorrhage_core.evaluations import study_frame
from hemorrhage_core.runs import PREDICTIONS_CSV, RunSummary

PREFERRED = ("vgg16", "inception_v3")


def default_pair(runs: list[RunSummary], pipeline: tuple[str | None, str | None] = (None, None)) -> tuple[str | None, str | None]:
    """Two runs to compare first: the pipeline's two final models when both are listed; else the
    best-ranked VGG16 and Inception_v3 runs when both exist, else the best-ranked runs of two
    different backbones, else the two best-ranked runs.

    Ranking prefers stage 2, then finished runs, then the newest.
    """
    keys = {run_key(s) for s in runs}
    if all(p in keys for p in pipeline) and pipeline[0] != pipeline[1]:
        return pipeline
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
    chosen = [run_key(s) for s in picked] + [None, None]
    return chosen[0], chosen[1]


@module.ui
def compare_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run_a", "Run A", choices={}),
            ui.input_select("run_b", "Run B", choices={}),
            data_select("data"),
            level_select("level"),
            help_text(
                "Both runs' predictions on the chosen data set (the pipeline's held-out test set first). "
                "When they share images the comparison is paired on those images: DeLong's test per "
                "class, Holm-adjusted over the classes, and 95% intervals from resampling patients "
                "(all of a patient's slices together). Study level scores each series by its most "
                "suspicious slice."
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

    def first_pair(runs) -> tuple[str | None, str | None]:
        return default_pair(list(runs), pipeline_pair(ctx.config.runs_dir))

    sync_run_select("run_a", candidates, current=lambda: input.run_a(), default=lambda runs: first_pair(runs)[0])
    sync_run_select("run_b", candidates, current=lambda: input.run_b(), default=lambda runs: first_pair(runs)[1])
    selected = data_selector(ctx, "data", lambda: [("A", input.run_a()), ("B", input.run_b())], lambda: input.data())

    @reactive.calc
    def loaded():
        items = selected()
        if len(items) != 2:
            return None
        return items

    def key(items) -> tuple:
        """What a comparison is of: the two runs and the loaded data (a new object when files change)."""
        return tuple((item.run_id, item.data) for item in items)

    def same(pair: tuple, items) -> bool:
        # By identity: EvaluationData holds frames, which do not compare with ==.
        return len(pair) == len(items) and all(
            run_id == item.run_id and data is item.data for (run_id, data), item in zip(pair, items, strict=True)
        )

    @reactive.extended_task
    async def compare_task(pair: tuple, pred_a: pd.DataFrame, pred_b: pd.DataFrame, resamples: int, seed: int):
        result = await asyncio.to_thread(
            tables.compare_evaluations, pred_a, pred_b, n_resamples=resamples, seed=seed
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
            key(items), items[0].frame, items[1].frame, ctx.config.bootstrap_resamples, ctx.config.bootstrap_seed
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
        if not items:
            return f"ROC · run {'AB'[index]}"
        data = items[index].data
        on = f" · {data.name}" if data is not None else ""
        return f"ROC · {'AB'[index]}: {items[index].name}{on}"

    @render.text
    def title_a():
        return title(0)

    @render.text
    def title_b():
        return title(1)

    def roc(index: int):
        items = loaded()
        if not items or items[index].frame is None:
            return plots.empty_figure("Pick two runs and a data set both have.")
        frame = items[index].frame
        if input.level() == "study":
            frame = study_frame(frame)
        return plots.roc_figure({items[index].name: frame}, legend="below")

    @render_figure
    def roc_a():
        return roc(0)

    @render_figure
    def roc_b():
        return roc(1)

    @reactive.calc
    def comparison() -> tables.EvaluationComparison | None:
        """The finished comparison of what is shown now; None while it is computing, stale or failed."""
        if compare_task.status() != "success":
            return None
        try:
            pair, result = compare_task.result()
        except Exception:  # noqa: BLE001 - the verdict shows the error
            return None
        items = loaded()
        if not items or not same(pair, items):
            return None
        return result

    def mode_text(result: tables.EvaluationComparison, level: str) -> str:
        if result.paired:
            shared = result.n_shared
            partial = (
                ""
                if shared == result.n_a == result.n_b
                else f" (A holds {result.n_a} images, B {result.n_b}; only the shared ones are compared)"
            )
            unit = (
                f"{result.result['study']['n_studies']} series of those images" if level == "study" else f"{shared} images"
            )
            method = result.result.get("method", {})  # the library's own words for what it computed
            return (
                f"Paired comparison on the {unit} both runs were scored on{partial}. Interval of the "
                f"difference: {method.get('ci', '95% patient bootstrap')}; of each run's AUC: a 95% percentile "
                f"bootstrap of patients likewise. p: {method.get('p_value', 'DeLong')}; then "
                f"{method.get('p_holm', 'Holm-adjusted over the classes')}."
            )
        return (
            f"Unpaired comparison: {result.reason}. Each run keeps its own images ({result.n_a} and "
            f"{result.n_b}); the difference's interval combines their two intervals as independent errors "
            "and is approximate, and there are no p-values."
        )

    @render.ui
    def verdict():
        items = loaded()
        if not items:
            return message("Pick two runs with predictions.")
        level = input.level()
        header = [
            ui.p(ui.strong("A = "), items[0].name, ui.br(), ui.strong("B = "), items[1].name, class_="small"),
            data_note(items, level=level),
        ]
        if any(item.frame is None for item in items):
            return ui.div(*header, class_="verdict")
        if compare_task.status() == "running":
            return ui.div(*header, message("Computing the comparison (bootstrap intervals)…"), class_="verdict")
        if compare_task.status() == "error":
            try:
                compare_task.result()
            except Exception as exc:  # noqa: BLE001
                return ui.div(*header, message(user_message(exc, context="comparison"), kind="error"), class_="verdict")
        result = comparison()
        if result is None:
            return ui.div(*header, class_="verdict")
        names = run_names(items)
        if result.paired:
            sentences = summary_sentences(result.result, *names, level=level)
            body = [ui.p(ui.strong(sentences[0])), ui.tags.ul(*[ui.tags.li(s) for s in sentences[1:]])]
        else:
            sentences = plots.comparison_summary(result.tables[level], *names)
            body = [ui.p(ui.strong(sentences[0])), ui.tags.ul(*[ui.tags.li(s) for s in sentences[1:]])]
        return ui.div(*header, *body, ui.p(mode_text(result, level), class_="small text-muted"), class_="verdict")

    @render_figure
    def auc():
        result = comparison()
        if result is None:
            return plots.empty_figure("Intervals appear here once computed.")
        unit = "series" if input.level() == "study" else "images"
        return eval_plots.comparison_figure(result.tables[input.level()], "A", "B", unit=unit)

    @render.data_frame
    def numbers():
        result = comparison()
        if result is None:
            return None
        frame = tables.comparison_display(result.tables[input.level()], paired=result.paired)
        return render.DataGrid(frame, width="100%", summary=False)
