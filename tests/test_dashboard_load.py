"""Two browser sessions on one dashboard: a long prediction in one never freezes the other.

Shiny for Python serves every session from one event loop, so a prediction that ran on that loop would
stall every other user until it finished. The app is started through a small launcher module (written
by the fixture, nothing in the app changes) that holds the prediction of any upload whose file name
contains ``slow`` in its worker until the test creates a release file. While session A's prediction
is provably still running (the release file does not exist yet and A's page says "Predicting"),
session B browses the runs table, opens a run's details, uploads its own slice and sees its own
prediction. After the release, A gets its result. Neither page ever shows the other's file names or
probabilities, and each page's probabilities equal the shared Predictor's for that page's own file.
No assertion depends on timing: the order of events is forced by the gate.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dashboard_fixtures import tiny_model_checkpoint, write_run
from playwright.sync_api import Browser, Page, expect
from shiny.playwright import controller
from shiny.run import ShinyAppProc, run_shiny_app

from hemorrhage_core.labels import LABELS
from hemorrhage_core.synthetic import write_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (make test-deps installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
WAIT_MS = 120_000  # generous: the CPU is shared with other work; never an assertion about speed
GATE_ENV = "HEMORRHAGE_TEST_GATE_DIR"

# Imported by `shiny run` instead of app.py: wraps the upload analysis the Predict panel's worker
# calls, then serves the unchanged app. The prediction itself runs first, so the held request has
# really used the shared model; the gate then keeps it "running" until the test releases it.
LAUNCHER = f'''
import os
import time
from pathlib import Path

import hemorrhage_core.dashboard.predict_panel as panel

_analyse = panel.analyse_uploads
_gate = Path(os.environ["{GATE_ENV}"])


def gated_analyse_uploads(predictor, uploads, saliency_label, **options):
    results = _analyse(predictor, uploads, saliency_label, **options)
    if any("slow" in upload.name for upload in uploads):
        (_gate / "entered").touch()
        deadline = time.monotonic() + 600  # never hang a test run forever
        while not (_gate / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return results


panel.analyse_uploads = gated_analyse_uploads

from app import app  # noqa: E402,F401
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """A runs folder with one run that has a real tiny model and one without; slices to upload."""
    root = tmp_path_factory.mktemp("load")
    runs = root / "runs"
    model_run = write_run(runs, stage=2, seed=1, checkpoint_writer=tiny_model_checkpoint)
    other_run = write_run(runs, backbone="resnet18", stage=1, seed=2)
    data = root / "data"
    write_dataset(data, patients=2, slices_per_patient=2, size=48, seed=3, workers=1, progress=False)
    slices = sorted((data / "stage_2_train").glob("*.dcm"))
    uploads = root / "uploads"
    uploads.mkdir()
    names = ("slow-a1.dcm", "slow-a2.dcm", "fast-b1.dcm")
    files = {}
    for name, source in zip(names, slices, strict=False):
        files[name] = uploads / name
        shutil.copyfile(source, files[name])
    gate = root / "gate"
    gate.mkdir()
    (root / "load_app.py").write_text(LAUNCHER)
    return SimpleNamespace(
        root=root, runs=runs, model_run=model_run, other_run=other_run, files=files, gate=gate
    )


@pytest.fixture(scope="module")
def expected(setup) -> dict[str, list[float]]:
    """What the shared Predictor says for each upload, computed here with the same checkpoint."""
    from hemorrhage_core.inference import Predictor

    predictor = Predictor.from_checkpoint(setup.model_run / "checkpoints" / "best.pt")
    return {
        name: [predictor.predict(path, saliency_label="any").probabilities[lb] for lb in LABELS]
        for name, path in setup.files.items()
    }


@pytest.fixture(scope="module")
def gated_dashboard(setup) -> ShinyAppProc:
    app = run_shiny_app(
        setup.root / "load_app.py",
        cwd=str(REPO),
        timeout_secs=120,
        env={
            "HEMORRHAGE_RUNS_DIR": str(setup.runs),
            GATE_ENV: str(setup.gate),
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(REPO),
        },
    )
    yield app
    (setup.gate / "release").touch()  # never leave a worker waiting
    app.close()


def open_panel(page: Page, panel: str) -> None:
    controller.PageNavbar(page, "panel").set(panel)
    expect(page.locator(f".tab-pane[data-value='{panel}']")).to_be_visible()


def shown_bars(page: Page) -> list[float]:
    page.wait_for_function(
        "() => (document.getElementById('predict-bars').data || []).length === 1", timeout=WAIT_MS
    )
    bars = page.evaluate(
        "() => { const t = document.getElementById('predict-bars').data[0]; return {y: t.y, x: t.x}; }"
    )
    assert bars["y"] == list(LABELS)
    return [float(v) for v in bars["x"]]


def slice_options(page: Page) -> list[str]:
    return page.locator("#predict-slice option").all_inner_texts()


def expect_file(path: Path, timeout_s: float = WAIT_MS / 1000) -> None:
    """Wait (polling) until ``path`` exists; fail with its name otherwise."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_a_long_prediction_does_not_freeze_another_session_and_results_never_cross(
    browser: Browser, gated_dashboard, setup, expected
):
    assert expected["slow-a1.dcm"] != pytest.approx(expected["fast-b1.dcm"], abs=1e-4), (
        "precondition: A's and B's files must give different probabilities to tell them apart"
    )
    first, second = browser.new_context(), browser.new_context()
    try:
        a, b = first.new_page(), second.new_page()
        for page in (a, b):
            page.goto(gated_dashboard.url)
            open_panel(page, "predict")
            controller.InputSelect(page, "predict-model").expect_selected(setup.model_run.name)

        # A starts a prediction that the gate holds in its worker thread.
        controller.InputFile(a, "predict-files").set(
            [str(setup.files["slow-a1.dcm"]), str(setup.files["slow-a2.dcm"])]
        )
        # The server has predicted A's slices and holds the result in A's worker thread.
        expect_file(setup.gate / "entered")

        # Meanwhile B changes inputs and its outputs follow: the runs table, then a run's details ...
        open_panel(b, "runs")
        table = b.locator("#runs-runs_grid")
        expect(table).to_contain_text(setup.other_run.name, timeout=WAIT_MS)
        table.locator("tr", has_text=setup.other_run.name).locator("td").first.click()
        expect(b.locator("#runs-details")).to_contain_text(f"Run {setup.other_run.name}", timeout=WAIT_MS)
        # ... and a prediction of its own, start to finish.
        open_panel(b, "predict")
        controller.InputFile(b, "predict-files").set([str(setup.files["fast-b1.dcm"])])
        expect(b.locator("#predict-status")).to_contain_text("1 slice(s) predicted", timeout=WAIT_MS)
        assert shown_bars(b) == pytest.approx(expected["fast-b1.dcm"], abs=1e-4)
        b_options = slice_options(b)
        assert len(b_options) == 1 and "fast-b1.dcm" in b_options[0]

        # All of that happened while A's prediction was still running: the gate is still closed,
        # and A's page, which kept its connection, says so.
        assert not (setup.gate / "release").exists()
        expect(a.locator("#predict-status")).to_contain_text("Predicting 2 slice(s)", timeout=WAIT_MS)
        expect(a.locator("#predict-slice option")).to_have_count(0)

        (setup.gate / "release").touch()
        expect(a.locator("#predict-status")).to_contain_text("2 slice(s) predicted", timeout=WAIT_MS)
        options = slice_options(a)
        assert len(options) == 2 and all("slow-a" in o for o in options) and "fast-b1" not in "".join(options)
        selected = a.locator("#predict-slice option:checked").inner_text()
        name = next(n for n in ("slow-a1.dcm", "slow-a2.dcm") if n in selected)
        assert shown_bars(a) == pytest.approx(expected[name], abs=1e-4)
        # B is untouched by A's result.
        assert shown_bars(b) == pytest.approx(expected["fast-b1.dcm"], abs=1e-4)
        assert not [o for o in slice_options(b) if "slow" in o]
        for page in (a, b):
            expect(page.locator(".shiny-output-error")).to_have_count(0)
    finally:
        first.close()
        second.close()
