"""STN gallery panel: validation slices as the model saw them, before and after the STN's alignment.

The gallery is a fixed sample of the run's validation slices (saved evaluations keep no images), so
its outcomes (found, missed, false alarm) are on validation data only, and the panel says so. They are
judged at the run's own operating points by default (Youden's J per class, chosen on validation), on
the run's calibrated probabilities when it has a calibration, as its thresholds are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import evaluations as ev
from hemorrhage_core import plots
from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import (
    AppContext,
    chosen_run_table,
    help_text,
    message,
    polar_caption,
    run_is_polar,
    run_polar_fold,
    run_polar_midline,
    run_polar_overlap,
    run_polar_seam,
    run_polar_trace,
)
from hemorrhage_core.dashboard.evaluation_data import CACHE
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import GALLERY_INDEX

ALL = "all"
RUN_THRESHOLDS = "run"
FIXED = "fixed"
OPERATING_POINTS = {
    RUN_THRESHOLDS: "the run's thresholds (per class, chosen on validation)",
    FIXED: "one threshold for every class",
}
# Gallery PNGs are small (one slice at training size); anything far bigger is not ours to inline.
MAX_PNG_BYTES = 4 * 1024 * 1024


@module.ui
def gallery_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Run", choices={}),
            ui.input_select("label", "Class", choices={ALL: "all classes", **{lb: lb for lb in LABELS}}),
            ui.input_radio_buttons("outcome", "Show", choices=list(tables.OUTCOMES), selected="all"),
            ui.input_radio_buttons("operating", "Decision threshold", choices=OPERATING_POINTS, selected=RUN_THRESHOLDS),
            ui.panel_conditional(
                f"input.operating === '{FIXED}'",
                ui.input_slider("threshold", "Threshold", min=0.0, max=1.0, value=0.5, step=0.05),
            ),
            ui.output_ui("thresholds_used"),
            help_text(
                "Each card shows a validation slice in the training windows (left) and after the spatial "
                "transformer's alignment (right), the affine matrix θ it applied, and the predicted "
                "probability P beside the truth for each class. Data: validation only, because saved "
                "evaluations such as the test set keep no images; the Thresholds and ROC panels score "
                "the test set."
            ),
            ui.div(
                ui.span("found", class_="legend-hit"),
                ui.span("missed", class_="legend-miss"),
                ui.span("false alarm", class_="legend-false-alarm"),
                class_="gallery-legend",
            ),
            width=320,
        ),
        ui.output_ui("summary"),
        ui.output_ui("cards"),
    )


def _png_uri(path: object) -> str | None:
    """A gallery PNG as a data URI, or None when the file is missing or implausibly large."""
    if not isinstance(path, str):
        return None
    try:
        file = Path(path)
        if file.stat().st_size > MAX_PNG_BYTES:
            return None
        return plots.png_data_uri(file.read_bytes())
    except OSError:
        return None


def _image(uri: str | None, alt: str) -> Tag:
    if uri is None:
        return ui.div("image missing", class_="gallery-missing")
    return ui.img(src=uri, alt=alt, class_="gallery-img")


def _theta_text(value: object) -> str:
    theta = tables.parse_theta(value)
    if theta is None:
        return "θ unavailable"
    return "\n".join("  ".join(f"{v + 0.0:+.3f}" for v in row) for row in np.round(theta, 3))


def gallery_card(row: pd.Series, threshold: float | Mapping[str, float]) -> Tag:
    """One slice's card: images, θ and a per-class table of truth vs probability (``threshold``: one
    for all classes, or one per class)."""
    body = []
    for label in LABELS:
        truth = float(row.get(f"true_{label}", float("nan"))) > 0.5
        prob = float(row.get(f"prob_{label}", float("nan")))
        cut = threshold[label] if isinstance(threshold, Mapping) else threshold
        called = prob >= cut
        css = "hit" if truth and called else "miss" if truth else "false-alarm" if called else ""
        body.append(
            ui.tags.tr(
                ui.tags.td(label),
                ui.tags.td("yes" if truth else "–"),
                # Three decimals: per-class thresholds such as 0.501 must not look equal to a P of 0.50.
                ui.tags.td(f"{prob:.3f}", title=f"threshold {cut:.3f}"),
                class_=css,
            )
        )
    outcome = str(row.get("outcome", ""))
    return ui.div(
        ui.div(
            ui.span(str(row["image_id"]), class_="gallery-id"),
            ui.span(outcome, class_=f"badge outcome-{outcome.replace(' ', '-')}"),
            class_="gallery-head",
        ),
        ui.div(
            ui.div(
                _image(_png_uri(row.get("input_path")), "windowed input"), ui.div("input", class_="caption")
            ),
            ui.div(
                _image(_png_uri(row.get("aligned_path")), "STN-aligned"),
                ui.div("STN-aligned", class_="caption"),
            ),
            class_="gallery-pair",
        ),
        ui.tags.pre(_theta_text(row.get("theta")), class_="theta", title="affine matrix θ (2×3)"),
        ui.tags.table(
            ui.tags.thead(ui.tags.tr(ui.tags.th("class"), ui.tags.th("true"), ui.tags.th("P"))),
            ui.tags.tbody(*body),
            class_="table table-sm gallery-table",
        ),
        class_="gallery-card",
    )


@module.server
def gallery_server(input, output, session, ctx: AppContext) -> None:
    loaded = chosen_run_table(
        ctx, "run", input.run, lambda: ctx.snapshot().select(kind="train", with_file=GALLERY_INDEX), "gallery"
    )

    @reactive.calc
    def validation() -> ev.EvaluationData | str | None:
        """The run's validation data (its calibration and thresholds), or why it cannot be read."""
        item = loaded()
        if item is None or item.frame is None:
            return None
        try:
            return CACHE.load(ctx.index.resolve(item.run_id), ev.VALIDATION)
        except Exception as exc:  # noqa: BLE001 - shown as a message; the gallery still shows at 0.5
            return user_message(exc, context="reading validation data")

    @reactive.calc
    def scored() -> tuple[pd.DataFrame, dict[str, float], str] | None:
        """The gallery on the thresholds' probability scale, the per-class thresholds, and what they are."""
        item = loaded()
        if item is None or item.frame is None:
            return None
        frame, data = item.frame, validation()
        if isinstance(data, ev.EvaluationData) and data.calibration is not None:
            # The run's thresholds were chosen on calibrated probabilities: show and judge on that scale.
            try:
                frame = ev.with_probabilities(frame, data.calibration.apply(frame[ev.PROB_COLUMNS].to_numpy(float)))
            except (KeyError, ValueError):  # a damaged gallery index: judged on what it says
                pass
        if input.operating() == FIXED or not isinstance(data, ev.EvaluationData):
            value = float(input.threshold())
            return frame, dict.fromkeys(LABELS, value), f"{value:.2f} for every class"
        try:
            chosen = data.thresholds()["slice"]
        except Exception as exc:  # noqa: BLE001
            return frame, dict.fromkeys(LABELS, ev.DEFAULT_THRESHOLD), user_message(exc, context="thresholds")
        return frame, {label: float(chosen[label]) for label in LABELS}, "the run's, per class"

    @reactive.calc
    def shown() -> pd.DataFrame | None:
        got = scored()
        if got is None:
            return None
        frame, thresholds, _ = got
        label = None if input.label() == ALL else input.label()
        return tables.filter_gallery_at(frame, label=label, outcome=input.outcome(), thresholds=thresholds)

    @render.ui
    def thresholds_used():
        got, data = scored(), validation()
        if got is None:
            return None
        _, thresholds, what = got
        lines = [ui.strong(f"Thresholds: {what}")]
        if input.operating() != FIXED:
            lines += [ui.br(), ", ".join(f"{label} {thresholds[label]:.3f}" for label in LABELS)]
        if isinstance(data, str):
            lines += [ui.br(), ui.span(data, class_="text-warning-emphasis")]
        elif data is not None and data.calibration is not None:
            lines += [ui.br(), "P is calibrated (temperature scaling fitted on validation)."]
        return ui.p(*lines, class_="small")

    @render.ui
    def summary():
        item = loaded()
        if item is None:
            return message("No run has written a gallery yet.")
        if item.problem:
            return message(f"{item.name}: {item.problem}", kind="warning")
        frame = shown()
        run = ctx.snapshot().by_id(item.run_id)
        return ui.div(
            message(
                f"Data: {len(item.frame)} gallery slices sampled from the validation set of {item.name}, "
                "the split that chose the best epoch, so these outcomes are optimistic.",
                kind="warning",
            ),
            ui.p(f"{len(frame)} of {len(item.frame)} gallery slices match.", class_="text-muted"),
            *([ui.p(polar_caption(run_polar_overlap(run), run_polar_trace(run), run_polar_fold(run), run_polar_seam(run),
                                  run_polar_midline(run)),
                    class_="small")] if run_is_polar(run) else []),
        )

    @render.ui
    def cards():
        frame = shown()
        if frame is None:
            return None
        if frame.empty:
            return message("No slice matches these filters.")
        limit = ctx.config.gallery_page_size
        thresholds = scored()[1]
        return ui.div(
            *[gallery_card(row, thresholds) for _, row in frame.head(limit).iterrows()], class_="gallery-grid"
        )
