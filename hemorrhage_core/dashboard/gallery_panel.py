"""STN gallery panel: validation slices as the model saw them, before and after the STN's alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
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
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import GALLERY_INDEX

ALL = "all"
# Gallery PNGs are small (one slice at training size); anything far bigger is not ours to inline.
MAX_PNG_BYTES = 4 * 1024 * 1024


@module.ui
def gallery_ui() -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("run", "Run", choices={}),
            ui.input_select("label", "Class", choices={ALL: "all classes", **{lb: lb for lb in LABELS}}),
            ui.input_radio_buttons("outcome", "Show", choices=list(tables.OUTCOMES), selected="all"),
            ui.input_slider("threshold", "Decision threshold", min=0.0, max=1.0, value=0.5, step=0.05),
            help_text(
                "Each card shows a validation slice in the training windows (left) and after the spatial "
                "transformer's alignment (right), the affine matrix θ it applied, and the predicted "
                "probability P beside the truth for each class."
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


def gallery_card(row: pd.Series, threshold: float) -> Tag:
    """One slice's card: images, θ and a per-class table of truth vs probability."""
    body = []
    for label in LABELS:
        truth = float(row.get(f"true_{label}", float("nan"))) > 0.5
        prob = float(row.get(f"prob_{label}", float("nan")))
        called = prob >= threshold
        css = "hit" if truth and called else "miss" if truth else "false-alarm" if called else ""
        body.append(
            ui.tags.tr(
                ui.tags.td(label), ui.tags.td("yes" if truth else "–"), ui.tags.td(f"{prob:.2f}"), class_=css
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
    def shown() -> pd.DataFrame | None:
        item = loaded()
        if item is None or item.frame is None:
            return None
        label = None if input.label() == ALL else input.label()
        return tables.filter_gallery(
            item.frame, label=label, outcome=input.outcome(), threshold=float(input.threshold())
        )

    @render.ui
    def summary():
        item = loaded()
        if item is None:
            return message("No run has written a gallery yet.")
        if item.problem:
            return message(f"{item.name}: {item.problem}", kind="warning")
        frame = shown()
        return ui.p(
            f"{len(frame)} of {len(item.frame)} gallery slices of {item.name} match.", class_="text-muted"
        )

    @render.ui
    def cards():
        frame = shown()
        if frame is None:
            return None
        if frame.empty:
            return message("No slice matches these filters.")
        limit = ctx.config.gallery_page_size
        threshold = float(input.threshold())
        return ui.div(
            *[gallery_card(row, threshold) for _, row in frame.head(limit).iterrows()], class_="gallery-grid"
        )
