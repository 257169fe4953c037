"""The Report tab and the Predict panel's series verdict in headless Chromium, over a pipeline-shaped
runs folder (generated numbers, real tiny models, calibrated stage-2 runs).

The report downloaded from the dashboard opens in a browser context with no network at all and shows
every one of its figures; its tables and CSV downloads carry the library's numbers; an uploaded series
gets its study-level verdict (each label's maximum over the slices, the slice, the run's threshold).
Screenshots go to ``$HEMORRHAGE_SCREENSHOTS`` when set, else to the test's temporary folder.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from browser_helpers import settle
from dashboard_fixtures import tiny_model_checkpoint, write_dicom_series, write_report_runs
from playwright.sync_api import Browser, Page, expect
from shiny.playwright import controller
from shiny.run import ShinyAppProc, run_shiny_app

from hemorrhage_core.comparison import paired_comparison
from hemorrhage_core.dashboard.config import DISCLAIMER
from hemorrhage_core.evaluations import TEST, load_evaluation, read_calibration, run_thresholds
from hemorrhage_core.inference import Predictor
from hemorrhage_core.labels import LABELS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (make test-deps installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(path: Path) -> Path:
    # The run folder's id says its stage (…-s1-…, …-s2-…): the model matches it.
    return tiny_model_checkpoint(path, stage=1 if "-s1-" in path.parent.parent.name else 2, size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("report-browser")
    runs = write_report_runs(root / "runs", checkpoint_writer=_checkpoint)
    return SimpleNamespace(root=root, runs=runs, series=write_dicom_series(root / "series", n=4))


@pytest.fixture(scope="module")
def dashboard(setup) -> ShinyAppProc:
    app = run_shiny_app(
        REPO / "app.py",
        cwd=str(REPO),
        timeout_secs=120,
        env={"HEMORRHAGE_RUNS_DIR": str(setup.runs["runs"]), "CUDA_VISIBLE_DEVICES": ""},
    )
    yield app
    app.close()


def _expected_comparison(setup) -> dict:
    a = load_evaluation(setup.runs["phase1_stage2"], TEST).predictions
    b = load_evaluation(setup.runs["phase2_stage2"], TEST).predictions
    return paired_comparison(a, b)  # the dashboard's defaults: 1000 resamples, seed 0


def test_report_downloads_from_the_dashboard_and_shows_its_figures_offline(
    page: Page, browser: Browser, dashboard, setup, outside_requests, tmp_path, shot_dir
):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    controller.PageNavbar(page, "panel").set("report")
    table = page.locator("#report-table_comparison table")
    expect(table).to_be_visible(timeout=120_000)
    settle(page)
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    expected = _expected_comparison(setup)
    shown = [float(v) for v in table.locator("td[data-value]").evaluate_all("cells => cells.map(c => c.dataset.value)")]
    want = [row[k] for level in (expected["labels"], expected["study"]["labels"]) for row in level.values()
            for k in ("positives", "auc_a", "auc_b", "diff") if row[k] is not None]
    assert all(any(abs(s - w) < 1e-12 for s in shown) for w in want)
    page.screenshot(path=str(shot_dir / "dashboard-report.png"), full_page=True)

    # Each table's CSV: the comparison's rows are paired_comparison's, at full precision.
    with page.expect_download() as csv_download:
        page.locator("#report-csv_comparison").click()
    csv = pd.read_csv(csv_download.value.path())
    slice_rows = csv[csv["level"] == "slice"].set_index("label")
    for label in LABELS:
        row = expected["labels"][label]
        got = slice_rows.loc[label, "A − B"]
        assert np.isnan(got) if row["diff"] is None else got == pytest.approx(row["diff"], rel=1e-12)
        if row["p_holm"] is not None:
            assert slice_rows.loc[label, "p (Holm)"] == pytest.approx(row["p_holm"], rel=1e-12)

    with page.expect_download() as download:
        page.locator("#report-download_report").click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    assert download.value.suggested_filename.endswith(".html")

    # A browser with no network: anything but the file itself is refused and listed.
    offline = browser.new_context(offline=True, viewport={"width": 1300, "height": 1000})
    attempted: list[str] = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            attempted.append(r.request.url)
            r.abort()

    offline.route("**/*", route)
    try:
        view = offline.new_page()
        view.goto(report.as_uri())
        view.wait_for_load_state("load")
        figures = view.locator("img.report-figure")
        n = figures.count()
        # ROC on test and validation per run, a comparison panel per level with a testable label, and
        # a reliability figure per run.
        levels = sum(any(r["diff"] is not None for r in rows.values())
                     for rows in (expected["labels"], expected["study"]["labels"]))
        assert n == 4 * 2 + levels + 4 and levels >= 1
        loaded = figures.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)")
        assert loaded == [True] * n
        expect(view.locator("#disclaimer")).to_contain_text(DISCLAIMER)
        for role in ("phase1_stage1", "phase1_stage2", "phase2_stage1", "phase2_stage2"):
            expect(view.locator("#table-runs")).to_contain_text(setup.runs[role].name)
        view.screenshot(path=str(shot_dir / "report.png"), full_page=True)
    finally:
        offline.close()
    assert attempted == []
    assert outside_requests == []


def test_an_uploaded_series_gets_its_study_level_verdict(page: Page, dashboard, setup, outside_requests, shot_dir):
    run = setup.runs["phase2_stage2"]
    calibration = read_calibration(run)
    assert calibration is not None  # the verdict is on calibrated probabilities
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "best.pt", calibration=calibration)
    probs = np.array([[p.probabilities[label] for label in LABELS] for p in predictor.predict_many(setup.series)])
    thresholds = run_thresholds(run, calibration)["study"]

    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    controller.PageNavbar(page, "panel").set("predict")
    controller.InputSelect(page, "predict-model").set(run.name)
    controller.InputFile(page, "predict-files").set([str(p) for p in reversed(setup.series)])
    verdict = page.locator("#predict-verdict")
    expect(verdict.locator("table")).to_be_visible(timeout=180_000)
    settle(page)
    expect(verdict).to_contain_text("Covers the 4 uploaded slices of this series")
    expect(verdict).to_contain_text("Research use only")
    expect(verdict).to_contain_text("calibrated")
    for j, label in enumerate(LABELS):
        cells = verdict.locator(f"tr[data-label='{label}'] td").all_inner_texts()
        best = int(np.argmax(probs[:, j]))
        assert cells[0] == label
        assert abs(float(cells[1]) - probs[best, j]) <= 5e-4 + 1e-9
        assert cells[2].startswith(f"slice {best + 1} (z = {5.0 * best:.1f} mm)") and setup.series[best].name in cells[2]
        assert abs(float(cells[3]) - thresholds[label]) <= 5e-4 + 1e-9
        assert cells[4] == ("at or above threshold" if probs[best, j] >= thresholds[label] else "below threshold")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    page.screenshot(path=str(shot_dir / "dashboard-predict-verdict.png"), full_page=True)
    assert outside_requests == []
