"""The dashboard in headless Chromium, over runs made by a short real training (synth -> train -> grid-search).

Every panel renders without a Shiny output error and says "research use only"; the ROC panel overlays
two runs; an uploaded synthetic series gets six probabilities, the aligned image, Grad-CAM and a z
profile; garbage and oversized uploads get a message while the session lives on; sessions do not
share results; and no request leaves 127.0.0.1. Screenshots of each panel go to
``$HEMORRHAGE_SCREENSHOTS`` (e.g. docs/images) when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser_helpers import figure_data, open_panel, settle
from dashboard_fixtures import write_damaged_runs
from playwright.sync_api import Page, expect
from shiny.playwright import controller
from shiny.run import ShinyAppProc, run_shiny_app

from hemorrhage_core.dicom import read_header
from hemorrhage_core.runs import RunWriter

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (make test-deps installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
PANELS = ("runs", "metrics", "roc", "thresholds", "calibration", "stn", "compare", "predict", "worklist", "grid", "report")
# A figure output per panel that must have been drawn before the panel counts as rendered.
FIRST_FIGURE = {
    "metrics": "curves",
    "roc": "roc",
    "thresholds": "confusion",
    "calibration": "reliability",
    "compare": "roc_a",
    "grid": "scores",
}
UPLOAD_CAP_MB = 1  # small, so the oversize refusal is cheap to exercise; the default (64) is a unit test
TRAIN_ARGS = (
    "--epochs",
    "1",
    "--image-size",
    "64",
    "--input-size",
    "64",
    "--weights",
    "none",
    "--threads",
    "1",
    "--workers",
    "0",
    "--val-fraction",
    "0.5",
    "--no-progress",
    "--seed",
    "0",
)


def _cli(*args: str, cwd: Path) -> str:
    """Run ``python -m training ARGS``; return the last stdout line (the run directory, by contract)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"training {args[0]} failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny synthetic set, a stage-1 and a stage-2 run, a grid-search run, and damaged folders."""
    root = tmp_path_factory.mktemp("dashboard")
    data, runs = root / "data", root / "runs"
    _cli(
        "synth",
        "--out",
        str(data),
        "--patients",
        "8",
        "--slices-per-patient",
        "4",
        "--size",
        "128",
        "--seed",
        "0",
        "--workers",
        "1",
        "--no-progress",
        cwd=REPO,
    )
    stage1 = _cli(
        "train",
        "--data",
        str(data),
        "--backbone",
        "resnet18",
        "--stage",
        "1",
        "--runs-dir",
        str(runs),
        *TRAIN_ARGS,
        cwd=REPO,
    )
    stage2 = _cli(
        "train",
        "--data",
        str(data),
        "--backbone",
        "resnet18",
        "--stage",
        "2",
        "--init-from",
        stage1,
        "--runs-dir",
        str(runs),
        *TRAIN_ARGS,
        cwd=REPO,
    )
    grid_file = root / "grid.yaml"
    grid_file.write_text("grid:\n  lr: [0.001, 0.0001]\n")
    grid = _cli(
        "grid-search",
        "--data",
        str(data),
        "--backbone",
        "resnet18",
        "--stage",
        "1",
        "--grid",
        str(grid_file),
        "--folds",
        "2",
        "--runs-dir",
        str(runs),
        *TRAIN_ARGS,
        cwd=REPO,
    )
    write_damaged_runs(runs)
    # The slices of the patient with the most of them, for the series upload.
    by_series: dict[str, list[Path]] = {}
    for path in sorted((data / "stage_2_train").glob("*.dcm")):
        by_series.setdefault(read_header(path).series_uid, []).append(path)
    series = max(by_series.values(), key=len)
    return SimpleNamespace(
        root=root,
        data=data,
        runs=runs,
        stage1=Path(stage1),
        stage2=Path(stage2),
        grid=Path(grid),
        series=series,
    )


@pytest.fixture(scope="module")
def dashboard(trained) -> ShinyAppProc:
    app = run_shiny_app(
        REPO / "app.py",
        cwd=str(REPO),
        timeout_secs=120,
        env={
            "HEMORRHAGE_RUNS_DIR": str(trained.runs),
            "HEMORRHAGE_MAX_UPLOAD_MB": str(UPLOAD_CAP_MB),
            "CUDA_VISIBLE_DEVICES": "",
        },
    )
    yield app
    app.close()


def test_every_panel_renders_and_says_research_use_only(page: Page, dashboard, outside_requests, shot_dir):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    expect(page.locator(".research-banner")).to_contain_text(
        "Research use only, not for clinical or diagnostic use"
    )
    for panel in PANELS:
        open_panel(page, panel)
        if panel in FIRST_FIGURE:
            page.wait_for_selector(f"#{panel}-{FIRST_FIGURE[panel]}.js-plotly-plot", timeout=60_000)
        if panel == "compare":
            expect(page.locator("#compare-verdict")).to_contain_text("A = ", timeout=60_000)
        settle(page)
        expect(page.locator(".shiny-output-error")).to_have_count(0)
        expect(page.locator(".research-banner")).to_be_visible()
        expect(page.locator(f".tab-pane[data-value='{panel}']")).to_be_visible()
        if panel != "predict":  # the predict panel's screenshot is taken after an upload
            page.screenshot(path=str(shot_dir / f"dashboard-{panel}.png"), full_page=True)
    assert outside_requests == []


def test_runs_table_lists_real_and_damaged_runs(page: Page, dashboard, trained, outside_requests):
    page.goto(dashboard.url)
    settle(page)
    table = page.locator("#runs-runs_grid")
    for run in (trained.stage1, trained.stage2, trained.grid):
        expect(table).to_contain_text(run.name)
    expect(table).to_contain_text("malformed")
    # A run that starts, trains and fails while the page is open shows up and updates by itself.
    writer = RunWriter.create(trained.runs, backbone="vgg16", stage=1, config={"epochs": 3}, epochs_planned=3)
    row = table.locator("tr", has_text=writer.id)
    expect(row).to_contain_text("running", timeout=30_000)
    writer.append_metrics({"epoch": 1, "train_loss": 0.5, "val_auc_mean": 0.7})
    expect(row).to_contain_text("1/3", timeout=30_000)
    writer.finish("failed", error="RuntimeError: loss became NaN at epoch 2")
    expect(row).to_contain_text("failed", timeout=30_000)
    expect(row).to_contain_text("loss became NaN")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    assert outside_requests == []


def test_roc_overlay_shows_two_runs(page: Page, dashboard, trained, outside_requests):
    page.goto(dashboard.url)
    open_panel(page, "roc")
    controller.InputSelect(page, "roc-run_a").set(trained.stage2.name)
    controller.InputSelect(page, "roc-run_b").set(trained.stage1.name)
    settle(page)
    page.wait_for_function(
        "() => (document.getElementById('roc-roc').data || []).some(t => t.legendgroup === 'run1')",
        timeout=60_000,
    )
    titles = figure_data(
        page,
        "roc-roc",
        "[...new Set(data.filter(t => t.legendgrouptitle).map(t => t.legendgrouptitle.text))]",
    )
    assert len(titles) == 2
    assert any(trained.stage2.name[-4:] in t for t in titles) and any(
        trained.stage1.name[-4:] in t for t in titles
    )
    groups = figure_data(page, "roc-roc", "data.filter(t => t.name !== 'chance').map(t => t.legendgroup)")
    assert groups.count("run0") == groups.count("run1") == 6
    assert figure_data(page, "roc-pr", "data.length") == 12
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    assert outside_requests == []


def test_upload_of_a_series_shows_probabilities_aligned_image_and_z_profile(
    page: Page, dashboard, trained, outside_requests, shot_dir
):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    open_panel(page, "predict")
    controller.InputSelect(page, "predict-model").expect_selected(trained.stage2.name)
    controller.InputFile(page, "predict-files").set([str(p) for p in trained.series])
    expect(page.locator("#predict-aligned_image img")).to_be_visible(timeout=180_000)
    settle(page)
    page.wait_for_function(
        "() => (document.getElementById('predict-bars').data || []).length === 1", timeout=60_000
    )
    bars = figure_data(page, "predict-bars", "{labels: data[0].y, values: data[0].x}")
    assert bars["labels"] == [
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
        "any",
    ]
    assert all(0.0 <= v <= 1.0 for v in bars["values"])
    expect(page.locator("#predict-slice_image img")).to_be_visible()
    expect(page.locator("#predict-cam_image img")).to_be_visible()
    n = len(trained.series)
    z = figure_data(page, "predict-profile", "data.length ? data[0].x : []")
    assert len(z) == n and z == sorted(z)
    assert figure_data(page, "predict-profile", "data.length") == 6
    expect(page.locator("#predict-slice option")).to_have_count(n)
    expect(page.locator("#predict-status")).to_contain_text(f"{n} slice(s) predicted")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    page.screenshot(path=str(shot_dir / "dashboard-predict.png"), full_page=True)
    # Moving the window sliders re-renders the slice without a new prediction.
    before = page.locator("#predict-slice_image img").get_attribute("src")
    controller.InputRadioButtons(page, "predict-preset").set("bone")
    settle(page)
    assert page.locator("#predict-slice_image img").get_attribute("src") != before
    assert outside_requests == []


def test_garbage_and_oversized_uploads_get_messages_and_the_session_lives_on(
    page: Page, dashboard, trained, tmp_path, outside_requests
):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(os.urandom(4096))
    oversized = tmp_path / "huge.dcm"
    oversized.write_bytes(b"\0" * (UPLOAD_CAP_MB * 1024 * 1024 + 4096))
    page.goto(dashboard.url)
    open_panel(page, "predict")
    controller.InputFile(page, "predict-files").set([str(garbage), str(oversized)])
    status = page.locator("#predict-status")
    expect(status.locator(".alert-danger")).to_contain_text("garbage.dcm", timeout=120_000)
    expect(status).to_contain_text(f"huge.dcm: larger than the {UPLOAD_CAP_MB} MB upload limit")
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and str(tmp_path) not in text and "site-packages" not in text
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    # The same session still answers: a good slice is predicted after the bad ones.
    controller.InputFile(page, "predict-files").set([str(trained.series[0])])
    expect(status).to_contain_text("1 slice(s) predicted", timeout=180_000)
    expect(page.locator("#predict-aligned_image img")).to_be_visible()
    assert outside_requests == []


def test_the_regression_corpus_uploaded_at_once_gets_a_message_per_bad_file(
    page: Page, dashboard, trained, outside_requests
):
    """tests/corpus/ (fuzzing's nastiest files and a few valid edge cases) through the real upload."""
    corpus = sorted((REPO / "tests" / "corpus").glob("*.dcm"))
    bad = [p for p in corpus if p.name.startswith(("bad-", "mr-"))]
    good = [p for p in corpus if p.name.startswith(("ok-", "flag-"))]
    page.goto(dashboard.url)
    open_panel(page, "predict")
    controller.InputFile(page, "predict-files").set([str(p) for p in corpus])
    status = page.locator("#predict-status")
    expect(status).to_contain_text(f"{len(good)} slice(s) predicted", timeout=300_000)
    errors = "\n".join(status.locator(".alert").all_inner_texts())  # refused uploads are warnings
    missing = [p.name for p in bad if p.name not in errors]
    assert missing == []
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and "site-packages" not in text
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    expect(page.locator("#predict-slice option")).to_have_count(len(good))
    # The session lives on: another panel still renders.
    open_panel(page, "runs")
    expect(page.locator("#runs-runs_grid")).to_contain_text(trained.stage2.name)
    assert outside_requests == []


def test_compare_shows_the_intervals_of_the_last_pair_chosen(page: Page, dashboard, trained, outside_requests):
    """Clicking through pairs never leaves the panel computing stale pairs or labelling one pair's
    intervals with another's names: the verdict ends on the last pair, with its numbers."""
    page.goto(dashboard.url)
    open_panel(page, "compare")
    a, b = controller.InputSelect(page, "compare-run_a"), controller.InputSelect(page, "compare-run_b")
    a.set(trained.stage1.name)
    b.set(trained.stage1.name)
    b.set(trained.stage2.name)
    a.set(trained.stage2.name)
    a.set(trained.stage1.name)
    a.expect_selected(trained.stage1.name)
    b.expect_selected(trained.stage2.name)
    verdict = page.locator("#compare-verdict")
    # The verdict settles on the last pair, in the chosen order (a stale result would name another pair).
    expected = re.compile(
        rf"A = [^\n]*{trained.stage1.name[-4:]}\s*B = [^\n]*{trained.stage2.name[-4:]}"
    )
    expect(verdict).to_have_text(expected, timeout=120_000)
    settle(page)
    expect(verdict).to_have_text(expected)
    expect(verdict).not_to_contain_text("Computing")
    expect(page.locator("#compare-numbers")).to_contain_text("subdural")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    assert outside_requests == []


def test_sessions_do_not_share_uploads_or_results(browser, dashboard, trained):
    first, second = browser.new_context(), browser.new_context()
    try:
        a, b = first.new_page(), second.new_page()
        for p in (a, b):
            p.goto(dashboard.url)
            open_panel(p, "predict")
        controller.InputFile(a, "predict-files").set([str(trained.series[0])])
        expect(a.locator("#predict-aligned_image img")).to_be_visible(timeout=180_000)
        settle(b)
        expect(b.locator("#predict-status")).to_contain_text("Upload one or more DICOM slices")
        expect(b.locator("#predict-aligned_image img")).to_have_count(0)
        assert figure_data(b, "predict-bars", "data.length ? data[0].type : null") is None
        expect(b.locator("#predict-slice option")).to_have_count(0)
    finally:
        first.close()
        second.close()
