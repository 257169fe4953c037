"""The dashboard's PACS panels in headless Chromium, against a real Orthanc (tests/pacs_fixtures.py).

With HEMORRHAGE_DICOMWEB_URL pointing at it: the worklist lists the stored CT studies with what
``pacs watch`` predicted, suspected hemorrhage first; Open shows a study in the Predict panel, fetched and
predicted with the same numbers as its files uploaded; Store result in PACS stores an SR that QIDO-RS
finds, and the worklist then shows the study as predicted here. Without the URL the PACS source is
disabled with one line and the worklist says how to configure it; with a server that is down each panel
shows one message. No patient name or id, and no credential, reaches the page. Screenshots go to
``$HEMORRHAGE_SCREENSHOTS`` (e.g. docs/images) when set, else to the test's temporary folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser_helpers import figure_data, open_panel, settle
from pacs_fixtures import ORTHANC_BINARY, SKIP_REASON, OrthancServer, free_port, pacs_run, phantom_studies
from playwright.sync_api import Page, expect
from shiny.playwright import controller
from shiny.run import run_shiny_app

from hemorrhage_core.dashboard import pacs_source as ps
from hemorrhage_core.dashboard.predictors import PredictorCache, Upload, analyse_uploads
from hemorrhage_core.labels import LABELS

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.skipif(ORTHANC_BINARY is None, reason=SKIP_REASON)]

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium is not installed (make test-deps installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
SLICES = 6
IDENTITY = {"PatientName": "CANARY^BROWSERNAME{patient}", "PatientID": "PIDCANARY{patient}B",
            "InstitutionName": "Canary Institute 9023"}
CANARIES = ("CANARY", "BROWSERNAME", "PIDCANARY", "Canary Institute")
NO_PACS = {name: "" for name in ("HEMORRHAGE_DICOMWEB_URL", "HEMORRHAGE_DICOMWEB_USER",
                                 "HEMORRHAGE_DICOMWEB_PASSWORD", "HEMORRHAGE_DICOMWEB_TOKEN")}


@pytest.fixture(scope="module")
def orthanc():
    server = OrthancServer("hemorrhage-browser")
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def world(orthanc, tmp_path_factory) -> SimpleNamespace:
    """A run with a real tiny model and validation predictions; three phantom studies on the server, the
    oldest predicted by a real ``pacs watch`` poll (its state file handed to the app)."""
    import pydicom

    from hemorrhage_core.pacs import PacsClient, Watcher, WatchState
    from hemorrhage_core.runs import read_run

    root = tmp_path_factory.mktemp("pacs-browser")
    run_dir = pacs_run(root / "runs")
    record = read_run(run_dir)
    predictor = PredictorCache().get(run_dir.name, record.model_path, run_dir)
    files = phantom_studies(root / "data", patients=3, slices=SLICES, seed=31, size=128, identity=IDENTITY)
    datasets = [[pydicom.dcmread(p) for p in series] for series in files]
    studies = [SimpleNamespace(uid=ds[0].StudyInstanceUID, series=ds[0].SeriesInstanceUID, files=paths,
                               date=ds[0].StudyDate) for ds, paths in zip(datasets, files, strict=True)]
    studies.sort(key=lambda s: (s.date, s.uid))
    state_path = root / "watch-state.json"
    by_uid = {ds[0].StudyInstanceUID: ds for ds in datasets}
    orthanc.stow(by_uid[studies[0].uid])
    env = dict(orthanc.env)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with PacsClient.from_url(orthanc.url) as client:
            watcher = Watcher(client, predictor, WatchState.load(state_path, url=client.url, run_id=record.id),
                              run_id=record.id, include_existing=True)
            watcher.poll_once()
            (watched,) = watcher.poll_once()
    for study in studies[1:]:
        orthanc.stow(by_uid[study.uid])
    return SimpleNamespace(run_dir=run_dir, run_id=record.id, predictor=predictor, studies=studies,
                           watched=watched, state_path=state_path)


def start_app(world, env: dict[str, str]):
    return run_shiny_app(
        REPO / "app.py",
        cwd=str(REPO),
        timeout_secs=120,
        env={"HEMORRHAGE_RUNS_DIR": str(world.run_dir.parent), "CUDA_VISIBLE_DEVICES": "",
             "HEMORRHAGE_PACS_WATCH_STATE": str(world.state_path), **env},
    )


@pytest.fixture(scope="module")
def dashboard(world, orthanc):
    app = start_app(world, {**NO_PACS, "HEMORRHAGE_DICOMWEB_URL": orthanc.url, **orthanc.env})
    yield app
    app.close()


def row(page: Page, study_uid: str):
    return page.locator(f"#worklist-table tr[data-study='{study_uid}']")


def logged(app, needle: str) -> bool:
    """Whether the app's log (stderr) holds ``needle`` so far."""
    try:
        return app.stderr.wait_for(lambda line: needle in line, 0.2)
    except TimeoutError:
        return False


def assert_clean(page: Page, *secrets: str) -> None:
    """No Shiny error, traceback, patient identity or credential anywhere in the page."""
    expect(page.locator(".shiny-output-error")).to_have_count(0)
    text = page.content()
    assert "Traceback" not in text and "site-packages" not in text
    for needle in (*CANARIES, *secrets):
        assert needle not in text, needle


def test_worklist_opens_a_study_predicts_it_from_pacs_and_stores_the_result(
    page: Page, dashboard, world, orthanc, outside_requests, shot_dir
):
    watched_uid = world.studies[0].uid
    target = world.studies[1]
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    open_panel(page, "worklist")
    table = page.locator("#worklist-table")
    for study in world.studies:
        expect(row(page, study.uid)).to_have_count(1, timeout=60_000)
    expect(page.locator(".research-banner")).to_be_visible()
    expect(page.locator("#worklist-threshold_note")).to_contain_text("chosen on the run's validation set")

    # What the watch predicted is shown, and the order is the worklist's: suspected hemorrhage first.
    threshold, _ = ps.run_any_threshold(world.run_dir)
    watched_any = world.watched.prediction.study["any"]
    expect(row(page, watched_uid)).to_contain_text(f"{watched_any:.3f}")
    expect(row(page, watched_uid)).to_contain_text("pacs watch")
    expect(row(page, target.uid)).to_contain_text("not predicted")
    order = table.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.study)")
    assert order == expected_order(world, orthanc)
    expect(row(page, watched_uid).locator(".badge")).to_have_count(1 if watched_any >= threshold else 0)

    # Open: the Predict panel fetches the study's series from the PACS and predicts it with the run.
    row(page, target.uid).locator("button.worklist-open").click()
    expect(page.locator(".tab-pane[data-value='predict']")).to_be_visible(timeout=30_000)
    controller.InputRadioButtons(page, "predict-source").expect_selected("pacs")
    expect(page.locator("#predict-aligned_image img")).to_be_visible(timeout=180_000)
    status = page.locator("#predict-status")
    expect(status).to_contain_text(f"{SLICES} slice(s) predicted", timeout=60_000)
    settle(page)
    expect(page.locator("#predict-slice option")).to_have_count(SLICES)
    expect(page.locator("#predict-verdict")).to_contain_text("Series verdict")
    expect(page.locator("#predict-pacs_summary")).to_contain_text(f"{SLICES} of {SLICES} slices predicted")
    controller.InputSelect(page, "predict-pacs_study").expect_selected(target.uid)
    controller.InputSelect(page, "predict-pacs_series").expect_selected(target.series)
    expect(page.locator("#predict-cam_image img")).to_be_visible()

    # The same numbers as the same files uploaded (first slice in z order, and along z).
    uploaded = analyse_uploads(world.predictor, [Upload(p.name, p.read_bytes()) for p in target.files], "any")
    bars = figure_data(page, "predict-bars", "{labels: data[0].y, values: data[0].x}")
    assert bars["labels"] == list(LABELS)
    # The app is another process: float32 convolutions may sum in another order there (its own thread
    # count), a few 1e-8 apart; the same process gives equal values (test_dashboard_pacs.py).
    assert bars["values"] == pytest.approx([uploaded[0].probabilities[label] for label in LABELS], abs=1e-6)
    profile = figure_data(page, "predict-profile", "data.map(t => [t.name, t.y])")
    assert dict(profile)["any"] == pytest.approx([r.probabilities["any"] for r in uploaded], abs=1e-6)

    # Store: one SR in the study, the UID the page shows; the button is then disabled.
    store = page.locator("#predict-pacs_push")
    expect(store).to_be_enabled()
    store.click()
    pushed = page.locator("#predict-pacs_pushed")
    expect(pushed).to_contain_text("Stored in the PACS", timeout=60_000)
    sop_uid = pushed.locator("code.sr-uid").inner_text()
    (sr_series,) = orthanc.series_of(target.uid, "SR")
    assert orthanc.instances_of(target.uid, sr_series["0020000E"]["Value"][0]) == [sop_uid]
    expect(store).to_be_disabled()
    settle(page)
    page.screenshot(path=str(shot_dir / "dashboard-predict-pacs.png"), full_page=True)

    # Back on the worklist the study is predicted by this dashboard, its SR stored.
    open_panel(page, "worklist")
    study_any = max(r.probabilities["any"] for r in uploaded)
    expect(row(page, target.uid)).to_contain_text(f"{study_any:.3f}", timeout=30_000)
    expect(row(page, target.uid)).to_contain_text("this dashboard · SR stored")
    assert logged(dashboard, "loading the model of run")  # the log is read...
    assert not any(logged(dashboard, needle) for needle in (orthanc.password, *CANARIES))  # ...and holds neither
    assert table.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.study)") == expected_order(
        world, orthanc, dashboard={target.uid: study_any})
    settle(page)
    page.screenshot(path=str(shot_dir / "dashboard-worklist.png"), full_page=True)
    assert_clean(page, orthanc.password)
    assert outside_requests == []


def test_a_study_and_series_picked_in_the_predict_panel_are_predicted(
    page: Page, dashboard, world, orthanc, outside_requests
):
    study = world.studies[2]
    page.goto(dashboard.url)
    open_panel(page, "predict")
    controller.InputRadioButtons(page, "predict-source").set("pacs")
    picker = controller.InputSelect(page, "predict-pacs_study")
    expect(page.locator(f"#predict-pacs_study option[value='{study.uid}']")).to_have_count(1, timeout=60_000)
    option = page.locator(f"#predict-pacs_study option[value='{study.uid}']").inner_text()
    assert option.startswith(f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:]} · CT HEAD WITHOUT CONTRAST")
    picker.set(study.uid)
    expect(page.locator(f"#predict-pacs_series option[value='{study.series}']")).to_have_count(1, timeout=60_000)
    controller.InputSelect(page, "predict-pacs_series").expect_selected(study.series)
    page.locator("#predict-pacs_fetch").click()
    expect(page.locator("#predict-status")).to_contain_text(f"{SLICES} slice(s) predicted", timeout=180_000)
    expect(page.locator("#predict-pacs_summary")).to_contain_text(study.uid[-12:])
    # A Grad-CAM class change re-predicts from memory: nothing is fetched again, the slices stay.
    controller.InputSelect(page, "predict-cam_label").set("subdural")
    expect(page.locator("#predict-cam_title")).to_contain_text("subdural")
    settle(page)
    expect(page.locator("#predict-slice option")).to_have_count(SLICES)
    assert_clean(page, orthanc.password)
    assert outside_requests == []


def expected_order(world, orthanc, dashboard: dict[str, float] | None = None) -> list[str]:
    """The worklist's order computed by the library from what the server lists, the watch knows and
    (``dashboard``: study -> any) the dashboard predicted."""
    from hemorrhage_core.dashboard.config import DashboardConfig

    threshold, _ = ps.run_any_threshold(world.run_dir)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in orthanc.env.items():
            mp.setenv(name, value)
        studies = ps.list_studies(DashboardConfig(pacs_url=orthanc.url))
    known = ps.watch_results(world.state_path, orthanc.url, world.run_id)
    for uid, any_p in (dashboard or {}).items():
        known[uid] = ps.StudyResult(uid, {**dict.fromkeys(LABELS, 0.0), "any": any_p}, None, "", ps.DASHBOARD)
    return [r.study.study_uid for r in ps.worklist_rows(studies, known, threshold)]


def test_without_a_pacs_url_the_source_is_off_and_the_worklist_says_how(page: Page, world, outside_requests):
    app = start_app(world, NO_PACS)
    try:
        page.goto(app.url)
        open_panel(page, "predict")
        expect(page.locator("#predict-source input[value='pacs']")).to_be_disabled()
        expect(page.locator(".pacs-off")).to_have_text(re.compile(r"^From PACS is off: set HEMORRHAGE_DICOMWEB_URL"))
        expect(page.locator("#predict-status")).to_contain_text("Upload one or more DICOM slices")
        open_panel(page, "worklist")
        expect(page.locator("#worklist-status")).to_contain_text("No PACS is configured")
        expect(page.locator("#worklist-status")).to_contain_text("HEMORRHAGE_DICOMWEB_URL")
        expect(page.locator("#worklist-table tr")).to_have_count(0)
        assert_clean(page)
        assert outside_requests == []
    finally:
        app.close()


def test_a_pacs_that_is_down_gives_one_message_in_each_panel(page: Page, world, orthanc, outside_requests):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    app = start_app(world, {**NO_PACS, "HEMORRHAGE_DICOMWEB_URL": url, "HEMORRHAGE_DICOMWEB_TIMEOUT": "5"})
    try:
        page.goto(app.url)
        open_panel(page, "worklist")
        error = page.locator("#worklist-status .alert-danger")
        expect(error).to_have_count(1, timeout=60_000)
        expect(error).to_contain_text(f"cannot connect to {url}")
        open_panel(page, "predict")
        controller.InputRadioButtons(page, "predict-source").set("pacs")
        error = page.locator("#predict-status .alert-danger")
        expect(error).to_have_count(1, timeout=60_000)
        expect(error).to_contain_text(f"cannot connect to {url}")
        # The session lives on: another panel still renders.
        open_panel(page, "runs")
        expect(page.locator("#runs-runs_grid")).to_contain_text(world.run_dir.name)
        assert_clean(page)
        assert outside_requests == []
    finally:
        app.close()
