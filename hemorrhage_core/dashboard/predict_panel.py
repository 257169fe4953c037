"""Predict panel: upload DICOM slices, or fetch a series from the PACS, pick a model, see probabilities,
the STN alignment and Grad-CAM; a PACS series' result can be stored back as a DICOM SR.

Above the per-slice view, the series verdict: per label the highest probability over the uploaded
slices of the shown slice's series, and the slice it came from, against the run's study-level
threshold chosen on its validation set. Probabilities are calibrated when the run has a calibration.

Uploaded files are read into memory and deleted from disk at once; their bytes live only in this
session. Prediction runs in an extended task on a worker thread (other sessions and this session's
controls stay responsive) through the one shared Predictor of the chosen run. A series from the PACS
(``pacs_predict``) arrives as uploads held in memory and takes the same path. A 2.5D model reads each
slice with its neighbours among the slices uploaded with it: the panel asks for whole series, and says
so when a slice had none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core import plots
from hemorrhage_core.dashboard.common import AppContext, help_text, message, polar_caption, sync_run_select
from hemorrhage_core.dashboard.figures import figure_output, render_figure
from hemorrhage_core.dashboard.pacs_predict import (
    PACS,
    UPLOAD,
    pacs_controls,
    pacs_source_server,
    source_picker,
    store_bar,
)
from hemorrhage_core.dashboard.predictors import (
    Progress,
    SeriesVerdict,
    Upload,
    UploadResult,
    analyse_uploads,
    series_groups,
    series_verdict,
)
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.state import run_key, run_label
from hemorrhage_core.labels import LABELS
from hemorrhage_core.runs import RunSummary
from hemorrhage_core.windowing import PRESETS

if TYPE_CHECKING:
    from hemorrhage_core.dashboard.pacs_source import FetchedSeries, OpenStudy, PacsOrigin

log = logging.getLogger("hemorrhage_core.dashboard")

DISPLAY_PRESETS = ("brain", "subdural", "bone")
CENTER_RANGE = (-1000.0, 3000.0)
WIDTH_RANGE = (1.0, 4000.0)


@dataclass(frozen=True)
class PredictRequest:
    """Everything the worker thread needs, read from reactive inputs before the task starts."""

    run_id: str
    run_name: str
    model_path: Path
    uploads: tuple[Upload, ...]
    saliency_label: str
    run_dir: Path | None = None  # for the run's calibration and thresholds
    origin: PacsOrigin | None = None  # the PACS series the uploads were fetched from
    record_id: str | None = None  # the run's own id (run.json), named in a stored SR
    progress: Progress | None = field(default=None, compare=False)


@dataclass
class PredictBatch:
    """The outcome of one prediction request: per-file results, or one message for the whole batch.

    ``thresholds`` are the run's operating points (``evaluations.run_thresholds``) on the scale of the
    probabilities shown; ``calibrated`` says whether those were calibrated.
    """

    run_name: str
    results: list[UploadResult] = field(default_factory=list)
    error: str | None = None
    thresholds: dict | None = None
    calibrated: bool = False
    run_id: str | None = None  # the run's own id
    origin: PacsOrigin | None = None  # set when the slices came from the PACS
    context: int = 0  # the model's neighbours on each side (2.5D); 0 for a 2D model
    polar_note: str | None = None  # the caption of a polar model's input (SlicePrep.polar); None: Cartesian

    @property
    def usable(self) -> list[UploadResult]:
        return [r for r in self.results if r.ok]


def read_uploads(
    file_infos: list[dict] | None, *, max_bytes: int, max_files: int
) -> tuple[list[Upload], list[str]]:
    """Read Shiny's uploaded files into memory and delete them from disk; refuse oversized ones.

    Returns the uploads and one message per refused file. Files are deleted whatever happens.
    """
    uploads: list[Upload] = []
    problems: list[str] = []
    for position, info in enumerate(file_infos or ()):
        name = str(info.get("name") or f"file {position + 1}")
        path = info.get("datapath")
        try:
            if position >= max_files:
                problems.append(f"{name}: not read; at most {max_files} files at a time.")
                continue
            size = os.path.getsize(path) if path else 0
            if size > max_bytes:
                problems.append(
                    f"{name}: larger than the {max_bytes / (1024 * 1024):g} MB upload limit; not read."
                )
                continue
            if size == 0:
                problems.append(f"{name}: the file is empty.")
                continue
            with open(path, "rb") as fh:
                uploads.append(Upload(name=name, data=fh.read()))
        except OSError as exc:
            problems.append(f"{name}: {user_message(exc, context='reading an upload')}")
        finally:
            if path:
                try:
                    os.remove(path)
                except OSError:
                    pass
    return uploads, problems


def slice_label(position: int, count: int, result: UploadResult) -> str:
    """The slice picker's entry for a usable result; a flagged slice says so, whichever is shown."""
    z = f"z = {result.z:.1f} mm" if result.z is not None else "no z position"
    label = f"{position + 1} of {count} · {z} · {result.name}"
    if result.input_flags:
        label += " · ⚠ not like a head CT"
    if result.without_neighbours:
        label += " · read without neighbours"
    return label


def _neighbours(context: int) -> str:
    return f"{context} neighbour{'s' if context != 1 else ''}"


def context_help(context: int) -> str | None:
    """The upload help's sentence for a 2.5D model (``context`` neighbours on each side), else None."""
    if context <= 0:
        return None
    return (
        f"This model reads each slice with its {_neighbours(context)} on each side in the series: "
        "upload the whole series (all its slices)."
    )


def context_notice(batch: PredictBatch, shown: UploadResult | None) -> Tag | None:
    """For a 2.5D model, the note that some slices were read without their neighbours (the shown one,
    or others marked in the slice list); None when every slice had them or the model is 2D."""
    if batch.context <= 0:
        return None
    alone = [r for r in batch.usable if r.without_neighbours]
    if not alone:
        return None
    if shown is not None and shown.without_neighbours:
        which = f"the slice shown ({shown.name})"
        if len(alone) > 1:
            which += f" and {len(alone) - 1} other slice(s)"
    else:
        which = f"{len(alone)} slice(s), not the one shown"
    return message(
        f"This model reads each slice with its {_neighbours(batch.context)} on each side in the series; "
        "upload the whole series (all its slices) for its full reading. Slices without neighbours were "
        f"read with the slice repeated in their place: {which}, marked 'read without neighbours' in the "
        "slice list. A slice whose header gives no series or z position has none either.",
        kind="warning",
    )


def batch_notices(batch: PredictBatch, shown: UploadResult | None) -> list[Tag]:
    """The status lines of a finished batch, in order: the batch's error, one error per refused file,
    a warning per input flag of the shown slice (the model's output on such a slice is not to be trusted),
    one warning naming the other flagged slices, a 2.5D model's note on slices read without neighbours
    (``context_notice``), and how many slices were predicted."""
    lines = [message(batch.error, kind="error")] if batch.error else []
    lines += [message(f"{r.name}: {r.error}", kind="error") for r in batch.results if not r.ok]
    if shown is not None:
        lines += [
            message(
                f"{shown.name}: does not look like a head CT slice, check it before trusting the "
                f"prediction. {flag}",
                kind="warning",
            )
            for flag in shown.input_flags
        ]
    others = [r.name for r in batch.usable if r.input_flags and r is not shown]
    if others:
        lines.append(
            message(
                f"{len(others)} other slice(s) look unlike a head CT slice (marked ⚠ in the slice list): "
                f"{', '.join(others)}.",
                kind="warning",
            )
        )
    notice = context_notice(batch, shown)
    if notice is not None:
        lines.append(notice)
    if batch.usable:
        lines.append(
            ui.p(f"{len(batch.usable)} slice(s) predicted by {batch.run_name}.", class_="text-muted small")
        )
    return lines


def _prob(p: float) -> str:
    return f"{p:.3f}"


def verdict_card(batch: PredictBatch, shown: UploadResult | None) -> Tag | None:
    """The series verdict of the shown slice's series, or None before a prediction."""
    if shown is None or not batch.usable:
        return None
    groups = series_groups(batch.usable)
    group = next((g for g in groups if any(x is shown for x in g)), [shown])
    thresholds = (batch.thresholds or {}).get("study")
    verdict: SeriesVerdict = series_verdict(group, thresholds)
    rows = []
    for v in verdict.labels:
        where = f"slice {v.slice_position}" + (f" (z = {v.z:.1f} mm)" if v.z is not None else "")
        if v.above is None:
            flag, css = "no threshold", ""
        elif v.above:
            flag, css = "at or above threshold", "table-warning"
        else:
            flag, css = "below threshold", ""
        rows.append(
            ui.tags.tr(
                ui.tags.td(v.label),
                ui.tags.td(_prob(v.probability), class_="text-end"),
                ui.tags.td(where, ui.tags.span(f" · {v.slice_name}", class_="text-muted")),
                ui.tags.td("–" if v.threshold is None else _prob(v.threshold), class_="text-end"),
                ui.tags.td(flag),
                class_=css,
                **{"data-label": v.label},
            )
        )
    table = ui.tags.table(
        ui.tags.thead(
            ui.tags.tr(
                ui.tags.th("label"),
                ui.tags.th("highest probability", class_="text-end"),
                ui.tags.th("on"),
                ui.tags.th("study threshold", class_="text-end"),
                ui.tags.th("verdict"),
            )
        ),
        ui.tags.tbody(*rows),
        class_="table table-sm verdict-table",
    )
    n = verdict.n_slices
    if batch.origin is not None:
        coverage = (
            f"Covers the {n} slice{'s' if n != 1 else ''} of this series predicted from the PACS (of "
            f"{batch.origin.n_instances} usable axial CT slices): each label's highest probability over them."
        )
    else:
        coverage = (
            f"Covers the {n} uploaded slice{'s' if n != 1 else ''} of this series: each label's highest "
            "probability over them. A series is only as complete as the slices uploaded."
        )
    if len(groups) > 1:
        coverage += f" {len(groups)} series were uploaded; this is the series of the slice shown below."
    notes = [ui.p(coverage, class_="small mb-1")]
    chosen = batch.thresholds or {}
    defaulted = chosen.get("study_defaulted") or []
    if thresholds is None:
        notes.append(ui.p("The run offers no thresholds: probabilities only.", class_="small text-muted mb-1"))
    elif chosen.get("data") is None:
        notes.append(
            ui.p(
                "This run has no validation predictions to choose thresholds on: 0.5 for every label.",
                class_="small text-muted mb-1",
            )
        )
    else:
        text = "Thresholds chosen on the run's validation set at study level (Youden's J)"
        if defaulted:
            text += f"; 0.5 where validation could not choose one ({', '.join(defaulted)})"
        notes.append(ui.p(text + ".", class_="small text-muted mb-1"))
    if batch.calibrated:
        notes.append(
            ui.p(
                "Probabilities are calibrated (temperature scaling fitted on the run's validation set).",
                class_="small text-muted mb-1",
            )
        )
    notes.append(
        ui.p(
            "Research use only: a model's output to question, not a diagnosis.",
            class_="small fw-semibold mb-0",
        )
    )
    return ui.card(
        ui.card_header("Series verdict (study level)"),
        table,
        *notes,
        class_="series-verdict",
    )


def run_context(summary: RunSummary | None) -> int:
    """A run's neighbours on each side (its config's ``context``; 0 when absent or not a whole number)."""
    value = (summary.config or {}).get("context") if summary is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def default_model(runs: list[RunSummary]) -> str | None:
    """The newest finished stage-2 run, else the newest finished run."""
    stage2 = [s for s in runs if s.stage == 2]
    pick = (stage2 or runs)[:1]
    return run_key(pick[0]) if pick else None


@module.ui
def predict_ui(pacs_enabled: bool = False) -> Tag:
    return ui.layout_sidebar(
        ui.sidebar(
            ui.input_select("model", "Model (a finished run)", choices={}),
            source_picker(pacs_enabled),
            ui.panel_conditional(
                f"input.source === '{UPLOAD}'",
                ui.input_file(
                    "files",
                    "DICOM slices (.dcm)",
                    multiple=True,
                    accept=[".dcm", ".dicom", "application/dicom"],
                    button_label="Choose files…",
                    placeholder="no file chosen",
                ),
                ui.input_task_button("predict", "Predict", label_busy="Predicting…", type="primary"),
            ),
            pacs_controls(),
            ui.input_select("cam_label", "Grad-CAM for class", choices=list(LABELS), selected="any"),
            ui.output_ui("limits"),
            width=320,
        ),
        ui.output_ui("status"),
        ui.output_ui("verdict"),
        store_bar(),
        ui.div(
            ui.input_select("slice", "Slice (in z order)", choices={}, width="100%"),
            class_="slice-picker",
        ),
        ui.layout_columns(
            ui.card(
                ui.card_header("Slice"),
                ui.output_ui("slice_image"),
                ui.input_radio_buttons(
                    "preset", None, choices={p: p for p in DISPLAY_PRESETS}, selected="brain", inline=True
                ),
                ui.layout_columns(
                    ui.input_slider(
                        "center",
                        "Centre (HU)",
                        min=CENTER_RANGE[0],
                        max=CENTER_RANGE[1],
                        value=PRESETS["brain"].center,
                        step=5,
                    ),
                    ui.input_slider(
                        "width",
                        "Width (HU)",
                        min=WIDTH_RANGE[0],
                        max=WIDTH_RANGE[1],
                        value=PRESETS["brain"].width,
                        step=5,
                    ),
                    col_widths=(6, 6),
                ),
            ),
            ui.card(ui.card_header("STN-aligned (what the classifier sees)"), ui.output_ui("aligned_image")),
            ui.card(ui.card_header(ui.output_text("cam_title", inline=True)), ui.output_ui("cam_image")),
            col_widths=(4, 4, 4),
        ),
        ui.layout_columns(
            ui.card(ui.card_header("Probabilities"), figure_output("bars")),
            ui.card(ui.card_header("Probabilities along z (this series)"), figure_output("profile")),
            col_widths=(5, 7),
        ),
    )


@module.server
def predict_server(input, output, session, ctx: AppContext) -> None:
    def candidates():
        return ctx.snapshot().select(kind="train", statuses=("finished",), with_model=True)

    sync_run_select(
        "model", candidates, current=lambda: input.model(), default=lambda runs: default_model(list(runs))
    )

    uploads: reactive.Value[tuple[Upload, ...]] = reactive.value((), name="uploads")
    upload_problems: reactive.Value[tuple[str, ...]] = reactive.value((), name="upload_problems")
    origin: reactive.Value[PacsOrigin | None] = reactive.value(None, name="origin")  # where uploads came from
    progress = Progress()

    def source() -> str:
        return input.source() or UPLOAD

    def chosen_context() -> int:
        """The chosen run's 2.5D context, from its config (0 for a 2D model or a run from before 2.5D)."""
        return run_context(ctx.snapshot().by_id(input.model()))

    @render.ui
    def limits():
        if source() == PACS:
            return help_text(
                f"A series of up to {ctx.config.pacs_max_slices} slices is fetched into memory and forgotten "
                "when you close the page. Studies are listed by date and description; patient names and "
                "other identifying header fields are never shown."
            )
        whole_series = context_help(chosen_context())
        return help_text(
            *([ui.strong(whole_series), " "] if whole_series else []),
            f"Up to {ctx.config.max_upload_files} files, each at most {ctx.config.max_upload_mb:g} MB. "
            "Files are read into memory, deleted from the server at once, and forgotten when you "
            "close the page. Patient names and other identifying header fields are never shown.",
        )

    @reactive.effect
    @reactive.event(input.files)
    def _receive() -> None:
        files, problems = read_uploads(
            input.files(), max_bytes=ctx.config.max_upload_bytes, max_files=ctx.config.max_upload_files
        )
        upload_problems.set(tuple(problems))
        origin.set(None)
        uploads.set(tuple(files))

    def _fetched(fetched: FetchedSeries) -> None:
        upload_problems.set(fetched.problems)
        origin.set(fetched.origin)
        uploads.set(fetched.uploads)

    def _opening(request: OpenStudy) -> None:
        # The old uploads go first, so that the model's change below does not predict them again.
        uploads.set(())
        origin.set(None)
        upload_problems.set(())
        if request.run_id and any(run_key(s) == request.run_id for s in candidates()):
            ui.update_select("model", selected=request.run_id)

    @ui.bind_task_button(button_id="predict")
    @reactive.extended_task
    async def predict_task(request: PredictRequest) -> PredictBatch:
        return await asyncio.to_thread(_run_request, ctx, request)

    def request() -> PredictRequest | None:
        run_id = input.model()
        files = uploads()
        if not run_id or not files:
            return None
        try:
            record = ctx.index.record(run_id)
            model_path = record.model_path
        except Exception as exc:  # noqa: BLE001
            upload_problems.set(
                (f"The chosen model cannot be used: {user_message(exc, context='model choice')}",)
            )
            return None
        summary = ctx.snapshot().by_id(run_id)
        progress.reset()
        return PredictRequest(
            run_id,
            run_label(summary) if summary else run_id,
            model_path,
            files,
            input.cam_label(),
            record.path,
            origin(),
            record.id,
            progress,
        )

    @reactive.effect
    @reactive.event(uploads, input.model, input.cam_label, input.predict, ignore_init=True)
    def _start() -> None:
        with reactive.isolate():
            req = request()
        if req is not None:
            predict_task.invoke(req)

    # The last finished batch stays on screen while a new one (another class, model or upload) runs.
    last_batch: reactive.Value[PredictBatch | None] = reactive.value(None, name="last_batch")

    results_record = ctx.pacs_results

    @reactive.effect
    def _keep_result() -> None:
        if predict_task.status() == "success":
            b = predict_task.result()
            last_batch.set(b)
            if b.origin is not None and results_record is not None:
                from hemorrhage_core.dashboard.pacs_source import complete_result

                done = complete_result(b.origin, b.results)
                if done is not None:  # the worklist shows it (a partial series would understate the study)
                    results_record.record(b.origin.url, b.run_id, done)

    def batch() -> PredictBatch | None:
        return last_batch()

    pacs = pacs_source_server(input, ctx, batch=batch, on_fetched=_fetched, on_open=_opening)

    @reactive.effect
    def _slice_choices() -> None:
        b = batch()
        choices = {}
        if b is not None:
            for i, r in enumerate(b.usable):
                choices[str(i)] = slice_label(i, len(b.usable), r)
        with reactive.isolate():
            previous = input.slice()
        selected = previous if previous in choices else ("0" if choices else None)
        ui.update_select("slice", choices=choices, selected=selected)

    @reactive.calc
    def current() -> UploadResult | None:
        b = batch()
        if b is None or not b.usable:
            return None
        try:
            index = int(input.slice() or 0)
        except ValueError:
            index = 0
        return b.usable[min(max(index, 0), len(b.usable) - 1)]

    @reactive.effect
    @reactive.event(input.preset)
    def _preset() -> None:
        window = PRESETS[input.preset()]
        ui.update_slider("center", value=window.center)
        ui.update_slider("width", value=window.width)

    @render.ui
    def status():
        lines = [message(p, kind="warning") for p in upload_problems()]
        if not candidates():
            lines.append(
                message(
                    "No finished run with a saved model yet: train one, then come back here.", kind="warning"
                )
            )
        lines += pacs.lines()
        if not uploads() and not lines:
            if source() == PACS:
                return message("Choose a study and a series from the PACS, then Fetch and predict.")
            return message("Upload one or more DICOM slices of a head CT to see the model's prediction.")
        if predict_task.status() == "running":
            reactive.invalidate_later(0.5)
            lines.append(
                ui.div(
                    ui.span(class_="spinner-border spinner-border-sm me-2", role="status"),
                    f"Predicting {len(uploads())} slice(s)…"
                    + (f" {progress.done} done." if progress.total else ""),
                    class_="alert alert-info panel-message",
                )
            )
        elif predict_task.status() == "error":
            try:
                predict_task.result()
            except Exception as exc:  # noqa: BLE001
                lines.append(message(user_message(exc, context="prediction"), kind="error"))
        b = batch()
        if b is not None:
            lines += batch_notices(b, current())
        return ui.div(*lines)

    @render.ui
    def verdict():
        b = batch()
        return None if b is None else verdict_card(b, current())

    def _img(array, alt: str) -> Tag:
        return ui.img(src=plots.png_data_uri(array), alt=alt, class_="ct-image")

    @render.ui
    def slice_image():
        r = current()
        if r is None or r.hu is None:
            return ui.div("no slice yet", class_="image-placeholder")
        return _img(plots.window_hu(r.hu, input.center(), input.width()), "windowed slice")

    @render.ui
    def aligned_image():
        r = current()
        if r is None or r.aligned is None:
            return ui.div("no slice yet", class_="image-placeholder")
        b = batch()
        return ui.div(
            _img(plots.chw_to_rgb(r.aligned), "STN-aligned slice"),
            ui.p("channels: brain, subdural and bone windows as red, green and blue", class_="caption"),
            *([ui.p(b.polar_note, class_="caption")] if b is not None and b.polar_note else []),
        )

    @render.text
    def cam_title():
        return f"Grad-CAM for '{input.cam_label()}'"

    @render.ui
    def cam_image():
        r = current()
        if r is None or r.hu is None:
            return ui.div("no slice yet", class_="image-placeholder")
        if r.heatmap is None:
            return ui.div("no saliency map for this slice", class_="image-placeholder")
        base = plots.window_hu(r.hu, input.center(), input.width())
        return _img(plots.heatmap_overlay(base, r.heatmap), "Grad-CAM overlay")

    @render_figure
    def bars():
        r = current()
        if r is None:
            return plots.empty_figure("Probabilities appear here after a prediction.")
        return plots.probability_bars(r.probabilities)

    @render_figure
    def profile():
        b = batch()
        r = current()
        if b is None or r is None:
            return plots.empty_figure("Upload several slices of one series to see probabilities along z.")
        group = next((g for g in series_groups(b.usable) if any(x is r for x in g)), [r])
        with_z = [g for g in group if g.z is not None]
        if len(with_z) < 2:
            return plots.empty_figure("Only one slice of this series has a z position.")
        return plots.z_profile_figure(
            [g.z for g in with_z],
            [g.probabilities for g in with_z],
            selected=next((i for i, x in enumerate(with_z) if x is r), None),
        )


def _run_request(ctx: AppContext, request: PredictRequest) -> PredictBatch:
    """Worker-thread body: load (or reuse) the run's calibrated Predictor, analyse every upload, and
    read the run's thresholds on the same probability scale."""
    from hemorrhage_core.evaluations import run_thresholds

    try:
        predictor = ctx.predictors.get(request.run_id, request.model_path, request.run_dir)
    except Exception as exc:  # noqa: BLE001 - a message for the page, details in the log
        return PredictBatch(
            request.run_name,
            error=f"The model cannot be loaded: {user_message(exc, context='model load')}",
            run_id=request.record_id or request.run_id,
            origin=request.origin,
        )
    calibration = getattr(predictor, "calibration", None)
    thresholds = None
    if request.run_dir is not None:
        try:
            thresholds = run_thresholds(request.run_dir, calibration)
        except Exception as exc:  # noqa: BLE001 - the verdict then shows probabilities without thresholds
            log.info("no thresholds for run %s: %s", request.run_id, user_message(exc, context="thresholds"))
    progress = request.progress.update if request.progress is not None else None
    results = analyse_uploads(predictor, request.uploads, request.saliency_label, progress=progress)
    prep = getattr(predictor, "prep", None)
    return PredictBatch(
        request.run_name,
        results,
        thresholds=thresholds,
        calibrated=calibration is not None,
        run_id=request.record_id or request.run_id,
        origin=request.origin,
        context=int(getattr(predictor, "context", 0) or 0),
        polar_note=polar_caption(prep.polar_overlap, getattr(prep, "polar_trace", False), getattr(prep, "polar_fold", 1),
                                 getattr(prep, "polar_seam", "back"), getattr(prep, "polar_midline", 1.0))
        if getattr(prep, "polar", False) else None,
    )
