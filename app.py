"""The Shiny dashboard: browse training runs, compare models, predict on uploaded CT slices or on a
PACS's studies (with HEMORRHAGE_DICOMWEB_URL set), and see the PACS's worklist.

    HEMORRHAGE_RUNS_DIR=runs shiny run app.py          # serves http://127.0.0.1:8000
    python app.py                                       # the same

Research use only, not for clinical or diagnostic use. Each panel is a Shiny module in
``hemorrhage_core/dashboard/``; this file only assembles them. The runs folder is polled by file
modification times, so runs that are training appear and update by themselves. Every asset (plotly.js
included) is served by this process: the page needs no network.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from shiny import App, reactive, ui

from hemorrhage_core.dashboard import (
    calibration_panel,
    compare_panel,
    gallery_panel,
    grid_panel,
    metrics_panel,
    predict_panel,
    report_panel,
    roc_panel,
    runs_panel,
    thresholds_panel,
    worklist_panel,
)
from hemorrhage_core.dashboard.common import AppContext, disclaimer_banner
from hemorrhage_core.dashboard.config import DISCLAIMER, load_config
from hemorrhage_core.dashboard.pacs_source import DashboardResults
from hemorrhage_core.dashboard.predictors import PredictorCache
from hemorrhage_core.dashboard.safety import GENERIC_ERROR, UploadSizeLimit
from hemorrhage_core.dashboard.state import RunIndex

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

CONFIG = load_config()
INDEX = RunIndex(CONFIG.runs_dir)  # shared by all sessions: summaries are cached by file stamps
PREDICTORS = PredictorCache()  # one Predictor per model, loaded once, shared read-only
PACS_RESULTS = DashboardResults()  # the studies predicted from the PACS here, for every session's worklist
WWW = Path(__file__).resolve().parent / "www"

# (id, tab title, module ui, module server), in tab order.
PANELS = (
    ("runs", "Runs", runs_panel.runs_ui, runs_panel.runs_server),
    ("metrics", "Training metrics", metrics_panel.metrics_ui, metrics_panel.metrics_server),
    ("roc", "ROC", roc_panel.roc_ui, roc_panel.roc_server),
    ("thresholds", "Thresholds", thresholds_panel.thresholds_ui, thresholds_panel.thresholds_server),
    ("calibration", "Calibration", calibration_panel.calibration_ui, calibration_panel.calibration_server),
    ("stn", "STN gallery", gallery_panel.gallery_ui, gallery_panel.gallery_server),
    ("compare", "Compare", compare_panel.compare_ui, compare_panel.compare_server),
    (
        "predict",
        "Predict",
        partial(predict_panel.predict_ui, pacs_enabled=CONFIG.pacs_url is not None),
        predict_panel.predict_server,
    ),
    ("worklist", "Worklist", worklist_panel.worklist_ui, worklist_panel.worklist_server),
    ("grid", "Grid search", grid_panel.grid_ui, grid_panel.grid_server),
    ("report", "Report", report_panel.report_ui, report_panel.report_server),
)

app_ui = ui.page_navbar(
    *[ui.nav_panel(title, panel_ui(panel_id), value=panel_id) for panel_id, title, panel_ui, _ in PANELS],
    ui.head_content(
        ui.tags.link(rel="stylesheet", href="style.css"),
        ui.tags.link(rel="icon", href="favicon.svg", type="image/svg+xml"),
        ui.tags.meta(name="description", content=DISCLAIMER),
    ),
    id="panel",
    title=ui.span("Hemorrhage CT", ui.span("research dashboard", class_="brand-sub")),
    window_title="Hemorrhage CT · research use only",
    header=disclaimer_banner(),
    footer=ui.div(DISCLAIMER, class_="research-footer"),
    navbar_options=ui.navbar_options(bg="#1f3b57", theme="dark"),
    fillable=False,
    lang="en",
)


# One poll for all sessions: stat calls every few seconds; summaries re-read only for changed runs.
@reactive.poll(INDEX.stamps, CONFIG.poll_seconds, session=None)
def snapshot():
    return INDEX.snapshot()


def server(input, output, session):
    ctx = AppContext(
        config=CONFIG,
        index=INDEX,
        predictors=PREDICTORS,
        snapshot=snapshot,
        pacs_results=PACS_RESULTS,
        open_study=reactive.value(None, name="open_study"),  # the worklist's click, for Predict
    )
    for panel_id, _, _, panel_server in PANELS:
        panel_server(panel_id, ctx=ctx)


shiny_app = App(app_ui, server, static_assets=WWW)
# Unexpected errors reach the page as one generic sentence; their details go to the server log.
shiny_app.sanitize_errors = True
shiny_app.sanitize_error_msg = GENERIC_ERROR
# The upload cap sits below Shiny, so an oversized upload never reaches the disk whole.
app = UploadSizeLimit(shiny_app, CONFIG.max_upload_bytes)


if __name__ == "__main__":
    from shiny import run_app

    run_app(app, host="127.0.0.1", port=8000)  # local only; see the README to serve it to others
