"""The metric panels' data selector in headless Chromium, over a real tiny pipeline's runs folder.

Compare opens on the pipeline's two final models and their held-out test evaluation, paired, with
intervals, DeLong and Holm p-values and a plain-language verdict, switches to study level, and falls
back to an unpaired comparison (saying why) on evaluations without a shared image. The calibration
panel draws reliability diagrams before and after temperature scaling. Damaged or half-written
evaluations are listed with their status and never raise. Screenshots go to ``$HEMORRHAGE_SCREENSHOTS``
when set, else to the test's temporary folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser_helpers import figure_data, open_panel, settle
from dashboard_fixtures import synthetic_predictions, write_evaluation_from, write_tiny_pipeline
from playwright.sync_api import Page, expect
from shiny.playwright import controller
from shiny.run import ShinyAppProc, run_shiny_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (make test-deps installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
WAIT_MS = 120_000  # generous: the CPU is shared; never an assertion about speed


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_pipeline(tmp_path_factory.mktemp("evaluated"))


@pytest.fixture(scope="module")
def dashboard(pipeline) -> ShinyAppProc:
    app = run_shiny_app(
        REPO / "app.py",
        cwd=str(REPO),
        timeout_secs=120,
        env={"HEMORRHAGE_RUNS_DIR": str(pipeline["runs"]), "CUDA_VISIBLE_DEVICES": ""},
    )
    yield app
    app.close()


def options(page: Page, select_id: str) -> dict[str, str]:
    return page.evaluate(
        f"() => Object.fromEntries([...document.querySelectorAll('#{select_id} option')].map(o => [o.value, o.text]))"
    )


def test_compare_opens_on_the_pipelines_final_models_paired_on_the_test_set(
    page: Page, dashboard, pipeline, shot_dir
):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    open_panel(page, "compare")
    a, b = pipeline["phase1_stage2"].name, pipeline["phase2_stage2"].name
    controller.InputSelect(page, "compare-run_a").expect_selected(a)
    controller.InputSelect(page, "compare-run_b").expect_selected(b)
    controller.InputSelect(page, "compare-data").expect_selected("test")
    n_test = json.loads((pipeline["runs"] / "pipeline.json").read_text())["test"]["n_images"]
    verdict = page.locator("#compare-verdict")
    expect(verdict).to_contain_text(f"Paired on the same {n_test} images", timeout=WAIT_MS)
    expect(verdict).to_contain_text(f"saved evaluation 'test' ({n_test} images")
    expect(verdict).to_contain_text("DeLong")
    expect(verdict).to_contain_text("Holm")
    expect(verdict).to_contain_text(re.compile(r"No significant difference|has the higher AUC|Not testable"))
    numbers = page.locator("#compare-numbers")
    expect(numbers).to_contain_text("p (DeLong)")
    expect(numbers).to_contain_text("p (Holm)")
    expect(numbers).to_contain_text(re.compile(r"\[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]"))  # the difference's interval
    settle(page)
    notes = figure_data(page, "compare-auc", "data.length ? data[data.length - 1].text : []")
    assert len(notes) == 6 and all(n.startswith("p ") or n == "not testable" for n in notes)
    assert any(n.startswith("p ") for n in notes)
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    page.screenshot(path=str(shot_dir / "evaluation-compare-test.png"), full_page=True)

    controller.InputRadioButtons(page, "compare-level").set("study")
    expect(verdict).to_contain_text("(study level)", timeout=WAIT_MS)
    expect(verdict).to_contain_text("series of those images")
    settle(page)
    page.screenshot(path=str(shot_dir / "evaluation-compare-study.png"), full_page=True)

    # Evaluations of other images in each run: nothing to pair, and the page says so.
    controller.InputSelect(page, "compare-data").set("external")
    expect(verdict).to_contain_text("Unpaired comparison", timeout=WAIT_MS)
    expect(verdict).to_contain_text("share no image")
    expect(page.locator("#compare-numbers")).not_to_contain_text("p (DeLong)")
    expect(page.locator(".shiny-output-error")).to_have_count(0)


def test_calibration_panel_draws_reliability_before_and_after_temperature_scaling(
    page: Page, dashboard, pipeline, shot_dir
):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    open_panel(page, "calibration")
    controller.InputSelect(page, "calibration-run").set(pipeline["phase2_stage2"].name)
    controller.InputSelect(page, "calibration-data").expect_selected("test")
    page.wait_for_function(
        "() => (document.getElementById('calibration-reliability').data || []).some(t => t.type === 'bar')",
        timeout=WAIT_MS,
    )
    settle(page)
    names = figure_data(page, "calibration-reliability", "[...new Set(data.filter(t => t.showlegend).map(t => t.name))]")
    assert set(names) == {"perfect calibration", "raw (model output)", "calibrated (temperature scaling)"}
    titles = page.evaluate(
        "() => document.getElementById('calibration-reliability').layout.annotations.map(a => a.text)"
    )
    assert len(titles) == 6 and all("ECE" in t and "→" in t for t in titles)
    expect(page.locator("#calibration-numbers")).to_contain_text("ECE (calibrated)")
    expect(page.locator("#calibration-numbers")).to_contain_text("temperature")
    expect(page.locator("#calibration-about")).to_contain_text("saved evaluation 'test'")
    expect(page.locator(".tab-pane[data-value='calibration']")).to_contain_text("15 equal-width bins")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    page.screenshot(path=str(shot_dir / "evaluation-calibration.png"), full_page=True)
    # Validation: said to be optimistic, and the fit on it to flatter the calibration.
    controller.InputSelect(page, "calibration-data").set("validation")
    expect(page.locator("#calibration-about")).to_contain_text("optimistic", timeout=WAIT_MS)
    expect(page.locator("#calibration-about")).to_contain_text("flatter")


def test_damaged_evaluations_show_a_status_and_new_ones_appear(page: Page, dashboard, pipeline, shot_dir):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    open_panel(page, "roc")
    run = pipeline["phase2_stage2"]
    controller.InputSelect(page, "roc-run_a").set(run.name)
    controller.InputSelect(page, "roc-run_b").set("")
    # One run (no overlay): each choice carries that run's own status.
    expect(page.locator("#roc-data option[value='half']")).to_have_text(
        re.compile(r"^half \(unusable: incomplete"), timeout=WAIT_MS
    )
    listed = options(page, "roc-data")
    assert list(listed) == ["test", "external", "garbled", "half", "validation"]
    assert listed["half"].startswith("half (unusable: incomplete")
    assert listed["garbled"].startswith("garbled (unusable: metrics.json is damaged")
    assert "optimistic" in listed["validation"]
    controller.InputSelect(page, "roc-data").set("half")
    notes = page.locator("#roc-notes")
    expect(notes).to_contain_text("incomplete (no metrics.json", timeout=WAIT_MS)
    settle(page)
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    page.screenshot(path=str(shot_dir / "evaluation-damaged.png"), full_page=True)
    controller.InputSelect(page, "roc-data").set("garbled")
    expect(notes).to_contain_text("damaged", timeout=WAIT_MS)
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    # An evaluation saved while the page is open joins the choices by itself.
    write_evaluation_from(run, "later", synthetic_predictions(n_patients=3, slices=2, seed=7))
    expect(page.locator("#roc-data option[value='later']")).to_have_text("later (6 images)", timeout=WAIT_MS)
    controller.InputSelect(page, "roc-data").expect_selected("garbled")  # the choice made stays
    controller.InputSelect(page, "roc-data").set("later")
    expect(notes).to_contain_text("saved evaluation 'later' (6 images", timeout=WAIT_MS)
    page.wait_for_function(
        "() => (document.getElementById('roc-roc').data || []).filter(t => t.name !== 'chance').length === 6",
        timeout=WAIT_MS,
    )
    expect(page.locator(".shiny-output-error")).to_have_count(0)


def test_thresholds_start_at_the_runs_youden_threshold_and_the_gallery_says_validation(
    page: Page, dashboard, pipeline
):
    run = pipeline["phase1_stage2"]
    chosen = json.loads((run / "thresholds.json").read_text())["slice"]
    page.goto(dashboard.url)
    open_panel(page, "thresholds")
    controller.InputSelect(page, "thresholds-run").set(run.name)
    controller.InputSelect(page, "thresholds-data").expect_selected("test")
    controller.InputSelect(page, "thresholds-label").set("subdural")
    point = page.locator("#thresholds-operating_point")
    expect(point).to_contain_text(f"Run's threshold for subdural: {chosen['subdural']:.3f}", timeout=WAIT_MS)
    controller.InputSlider(page, "thresholds-threshold").expect_value(f"{round(chosen['subdural'], 2):g}")
    expect(page.locator("#thresholds-problem")).to_contain_text("saved evaluation 'test'")
    expect(page.locator("#thresholds-confusion_title")).to_contain_text("test")
    expect(page.locator(".shiny-output-error")).to_have_count(0)

    open_panel(page, "stn")
    controller.InputSelect(page, "stn-run").set(run.name)
    summary = page.locator("#stn-summary")
    expect(summary).to_contain_text("validation set", timeout=WAIT_MS)
    expect(summary).to_contain_text("optimistic")
    expect(page.locator("#stn-thresholds_used")).to_contain_text(f"subdural {chosen['subdural']:.3f}")
    expect(page.locator(".shiny-output-error")).to_have_count(0)
