"""The dashboard's PACS side (hemorrhage_core.dashboard.pacs_source and the Predict panel's worker
calls) against a real Orthanc with its DICOMweb plugin (tests/pacs_fixtures.py): the study list keeps
no patient attribute, a fetched series predicts into the same UploadResults as the same files uploaded,
the stored SR is found again by QIDO-RS and holds the probabilities shown, the worklist puts suspected
hemorrhage first at the run's threshold, and a server that is down, refuses the credentials or is too
slow gives one message, never an exception. The browser side is tests/test_dashboard_pacs_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pacs_fixtures import (
    ORTHANC_BINARY,
    SKIP_REASON,
    OrthancServer,
    fake_dicomweb,
    free_port,
    pacs_run,
    phantom_studies,
)

from hemorrhage_core.dashboard import pacs_source as ps
from hemorrhage_core.dashboard.config import DashboardConfig, load_config
from hemorrhage_core.dashboard.predictors import PredictorCache, Progress, Upload, analyse_uploads
from hemorrhage_core.errors import PacsError, PacsUnavailableError
from hemorrhage_core.labels import LABELS

pytestmark = pytest.mark.skipif(ORTHANC_BINARY is None, reason=SKIP_REASON)

ENV_NAMES = ("HEMORRHAGE_DICOMWEB_USER", "HEMORRHAGE_DICOMWEB_PASSWORD", "HEMORRHAGE_DICOMWEB_TOKEN",
             "HEMORRHAGE_DICOMWEB_CA_BUNDLE")
IDENTITY = {"PatientName": "CANARY^DASHNAME{patient}", "PatientID": "PIDCANARY{patient}D",
            "InstitutionName": "Canary Institute 4451"}
CANARIES = ("CANARY", "DASHNAME", "PIDCANARY", "Canary Institute")
SLICES = 5


@pytest.fixture(scope="module")
def orthanc():
    server = OrthancServer("hemorrhage-dashboard")
    server.start()
    yield server
    server.close()


@pytest.fixture
def credentials(orthanc, monkeypatch):
    """The fixture server's credentials in the environment, as the dashboard's process would have them."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in orthanc.env.items():
        monkeypatch.setenv(name, value)
    return orthanc.env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished stage-2 run with validation predictions (so study thresholds are chosen on them) and a
    real tiny untrained model."""
    return pacs_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory) -> list[dict]:
    """Two phantom studies of SLICES axial slices each (canary identity in the headers), stored with STOW-RS."""
    import pydicom

    out = []
    for files in phantom_studies(tmp_path_factory.mktemp("studies"), patients=2, slices=SLICES, seed=23,
                                 identity=IDENTITY):
        datasets = [pydicom.dcmread(p) for p in files]
        orthanc.stow(datasets)
        out.append({"study_uid": datasets[0].StudyInstanceUID, "series_uid": datasets[0].SeriesInstanceUID,
                    "files": files, "sop": [ds.SOPInstanceUID for ds in datasets],
                    "date": datasets[0].StudyDate})
    return out


@pytest.fixture
def config(orthanc, run_dir) -> DashboardConfig:
    return DashboardConfig(runs_dir=run_dir.parent, pacs_url=orthanc.url, pacs_timeout_s=20)


@pytest.fixture(scope="module")
def predictor(run_dir):
    from hemorrhage_core.runs import read_run

    return PredictorCache().get(run_dir.name, read_run(run_dir).model_path, run_dir)


def assert_no_identity(*texts: str) -> None:
    for text in texts:
        for canary in CANARIES:
            assert canary not in text, canary


# ------------------------------------------------------------------------------------------ settings
def test_config_reads_the_pacs_settings_and_keeps_credentials_out():
    off = load_config({})
    assert off.pacs_url is None and off.pacs_timeout_s == 30 and off.pacs_max_slices == 400
    on = load_config({"HEMORRHAGE_DICOMWEB_URL": " http://pacs:8042/dicom-web ", "HEMORRHAGE_DICOMWEB_TIMEOUT": "5",
                      "HEMORRHAGE_PACS_MAX_SLICES": "50", "HEMORRHAGE_PACS_WATCH_STATE": "/tmp/w.json",
                      "HEMORRHAGE_DICOMWEB_PASSWORD": "s3cret"})
    assert (on.pacs_url, on.pacs_timeout_s, on.pacs_max_slices) == ("http://pacs:8042/dicom-web", 5.0, 50)
    assert on.pacs_watch_state == Path("/tmp/w.json") and "s3cret" not in repr(on)
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="HEMORRHAGE_DICOMWEB_TIMEOUT"):
            load_config({"HEMORRHAGE_DICOMWEB_TIMEOUT": bad})


def test_without_a_url_nothing_is_asked_of_any_server(monkeypatch):
    from hemorrhage_core.dashboard import pacs_predict

    def no_network(*args, **kwargs):  # pragma: no cover - the assertion is that this never runs
        raise AssertionError("a network call was made")

    monkeypatch.setattr("requests.Session.request", no_network)
    off = DashboardConfig()
    for call in (lambda: ps.list_studies(off), lambda: ps.list_series(off, "1.2.3"),
                 lambda: ps.fetch_series(off, "1.2.3")):
        with pytest.raises(PacsError, match="HEMORRHAGE_DICOMWEB_URL"):
            call()
    outcome = pacs_predict._studies(off)
    assert outcome.value is None and outcome.error == ps.NOT_CONFIGURED


# ------------------------------------------------------------------------------------- find, series
def test_study_list_and_labels_hold_no_patient_attribute(config, credentials, studies):
    found = {s.study_uid: s for s in ps.list_studies(config)}
    for study in studies:
        summary = found[study["study_uid"]]
        assert summary.modalities == ("CT",) and summary.n_instances == SLICES
        label = ps.study_label(summary)
        assert label.startswith(f"{study['date'][:4]}-{study['date'][4:6]}-{study['date'][6:]} · ")
        assert label.endswith(study["study_uid"][-6:])
        assert_no_identity(label, json.dumps(summary.to_dict()))
    choices = ps.list_series(config, studies[0]["study_uid"])
    assert [(c.series_uid, c.n_slices, c.refusal) for c in choices] == [(studies[0]["series_uid"], SLICES, None)]
    assert ps.default_series(choices) == studies[0]["series_uid"]


# ---------------------------------------------------------------------------------- fetch, predict
def test_a_fetched_series_predicts_into_the_same_results_as_its_files_uploaded(config, credentials, studies,
                                                                              predictor, run_dir):
    from hemorrhage_core.dashboard.predict_panel import PredictRequest, _run_request
    from hemorrhage_core.pacs import PacsClient, predict_study
    from hemorrhage_core.runs import read_run

    study = studies[0]
    seen: list[tuple[int, int]] = []
    fetched = ps.fetch_series(config, study["study_uid"], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (SLICES, SLICES) and len(seen) == SLICES
    origin = fetched.origin
    assert (origin.study_uid, origin.series_uid, origin.url) == (study["study_uid"], study["series_uid"], config.pacs_url)
    assert list(origin.sop_uids) == study["sop"] and not origin.fetch_errors and fetched.problems == ()
    assert_no_identity(*(u.name for u in fetched.uploads), repr(origin))

    from_pacs = analyse_uploads(predictor, fetched.uploads, "any")
    uploaded = analyse_uploads(predictor, [Upload(p.name, p.read_bytes()) for p in study["files"]], "any")
    assert len(from_pacs) == len(uploaded) == SLICES and all(r.ok for r in from_pacs)
    for a, b in zip(from_pacs, uploaded, strict=True):
        assert a.probabilities == b.probabilities and a.raw_probabilities == b.raw_probabilities
        assert a.z == b.z and a.series == b.series == study["series_uid"] and a.flags == b.flags
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.aligned, b.aligned)
        np.testing.assert_array_equal(a.heatmap, b.heatmap)

    # The panel's own worker: the same results, the run's thresholds, and where they came from.
    record = read_run(run_dir)
    batch = _run_request(SimpleCtx(), PredictRequest(run_dir.name, "a run", record.model_path, fetched.uploads,
                                                     "any", run_dir, origin, record.id))
    assert batch.error is None and batch.origin is origin and batch.run_id == record.id
    assert [r.probabilities for r in batch.results] == [r.probabilities for r in uploaded]
    assert batch.thresholds["data"] == "validation"

    # As the library predicts the study (batched, without Grad-CAM): the same numbers.
    prediction = ps.study_prediction(origin, batch.results, run_id=record.id)
    assert [s.sop_instance_uid for s in prediction.slices] == study["sop"] and not prediction.failed
    with PacsClient.from_url(config.pacs_url) as client:
        library = predict_study(client, predictor, study["study_uid"], run_id=record.id)
    for mine, theirs in zip(prediction.slices, library.slices, strict=True):
        assert mine.sop_instance_uid == theirs.sop_instance_uid and mine.z == theirs.z
        for label in LABELS:
            assert mine.probabilities[label] == pytest.approx(theirs.probabilities[label], abs=1e-5)
    result = ps.complete_result(origin, batch.results)
    assert result.probabilities == prediction.study and result.source == ps.DASHBOARD


class SimpleCtx:
    """What ``_run_request`` reads of the app context."""

    predictors = PredictorCache()


def test_a_series_longer_than_the_limit_is_refused_before_any_fetch(config, credentials, studies):
    from dataclasses import replace

    with pytest.raises(PacsError, match=f"has {SLICES} slices, more than .*HEMORRHAGE_PACS_MAX_SLICES"):
        ps.fetch_series(replace(config, pacs_max_slices=SLICES - 1), studies[0]["study_uid"])


# ---------------------------------------------------------------------------------------------- push
def test_store_creates_an_sr_found_by_qido_with_the_probabilities_shown(orthanc, config, credentials, studies,
                                                                       predictor, run_dir):
    from hemorrhage_core.dashboard import pacs_predict
    from hemorrhage_core.pacs import PacsClient, read_sr
    from hemorrhage_core.runs import read_run

    study = studies[1]
    run_id = read_run(run_dir).id
    fetched = ps.fetch_series(config, study["study_uid"])
    results = analyse_uploads(predictor, fetched.uploads, "any")
    assert orthanc.series_of(study["study_uid"], "SR") == []

    # A partial series is never stored: nothing reaches the server.
    partial = pacs_predict._push(config, pacs_predict._PushRequest(fetched.origin, tuple(results[1:]), run_id, None))
    assert partial.value is None and "nothing to store: 1 of 5 slices" in partial.error
    assert ps.complete_result(fetched.origin, results[1:]) is None
    assert orthanc.series_of(study["study_uid"], "SR") == []

    outcome = pacs_predict._push(config, pacs_predict._PushRequest(fetched.origin, tuple(results), run_id, None))
    assert outcome.error is None
    pushed = outcome.value
    (sr_series,) = orthanc.series_of(study["study_uid"], "SR")
    assert sr_series["0020000E"]["Value"] == [pushed.series_uid]
    assert orthanc.instances_of(study["study_uid"], pushed.series_uid) == [pushed.sop_instance_uid]
    with PacsClient.from_url(config.pacs_url) as client:
        summary = read_sr(client.fetch_dataset(study["study_uid"], pushed.series_uid, pushed.sop_instance_uid))
    shown = {label: max(r.probabilities[label] for r in results) for label in LABELS}
    assert summary.values == shown and summary.source_series == (study["series_uid"],)
    assert not summary.verified and summary.series_description.startswith("CAUTION: Not for Diagnostic Use")
    # The study now lists the SR as a series that cannot be predicted.
    choices = {c.series_uid: c for c in ps.list_series(config, study["study_uid"])}
    assert choices[pushed.series_uid].refusal == "modality SR, not CT"
    assert ps.default_series(list(choices.values())) == study["series_uid"]


# ------------------------------------------------------------------------------------------ worklist
def _summary(uid: str, date: str):
    from hemorrhage_core.pacs import StudySummary

    return StudySummary(uid, date, "CT HEAD", ("CT",), 1, 10)


def _result(uid: str, any_p: float, at: str = "2026-01-01T00:00:00Z", source: str = ps.DASHBOARD):
    return ps.StudyResult(uid, {**dict.fromkeys(LABELS, 0.01), "any": any_p}, "9.9", at, source)


def test_worklist_lists_suspected_hemorrhage_first_then_newest_first():
    studies = [_summary("1.5", "20260105"), _summary("1.4", "20260104"), _summary("1.3", "20260103"),
               _summary("1.2", "20260102"), _summary("1.1", "20260101")]
    results = {"1.1": _result("1.1", 0.90), "1.3": _result("1.3", 0.40), "1.4": _result("1.4", 0.95),
               "1.2": _result("1.2", 0.40)}
    rows = ps.worklist_rows(studies, results, 0.40)
    assert [r.study.study_uid for r in rows] == ["1.4", "1.1", "1.3", "1.2", "1.5"]
    assert [r.flagged for r in rows] == [True, True, True, True, False]  # at the threshold counts
    rows = ps.worklist_rows(studies, results, 0.5)
    assert [r.study.study_uid for r in rows] == ["1.4", "1.1", "1.5", "1.3", "1.2"]
    assert [r.any for r in rows] == [0.95, 0.90, None, 0.40, 0.40]
    rows = ps.worklist_rows(studies, results, None)  # no threshold: no flag, the server's order
    assert [r.study.study_uid for r in rows] == ["1.5", "1.4", "1.3", "1.2", "1.1"] and not any(r.flagged for r in rows)


def test_worklist_flags_at_the_runs_validation_threshold(config, credentials, studies, run_dir):
    from hemorrhage_core.evaluations import read_calibration, run_thresholds

    threshold, how = ps.run_any_threshold(run_dir)
    assert threshold == run_thresholds(run_dir, read_calibration(run_dir))["study"]["any"]
    assert how.startswith("chosen on the run's validation set") and 0.0 < threshold < 1.0 and threshold != 0.5
    listed = ps.list_studies(config)
    low, high = studies[0]["study_uid"], studies[1]["study_uid"]
    results = {low: _result(low, max(0.0, threshold - 0.01)), high: _result(high, min(1.0, threshold + 0.01))}
    rows = ps.worklist_rows(listed, results, threshold)
    assert rows[0].study.study_uid == high and rows[0].flagged
    assert {r.study.study_uid for r in rows} == {s.study_uid for s in listed}
    assert not next(r for r in rows if r.study.study_uid == low).flagged


def test_results_of_this_dashboard_and_of_pacs_watch_are_merged(config, credentials, studies, predictor, run_dir,
                                                               tmp_path):
    from hemorrhage_core.pacs import PacsClient, Watcher, WatchState
    from hemorrhage_core.runs import read_run

    run_id = read_run(run_dir).id
    path = tmp_path / "watch.json"
    with PacsClient.from_url(config.pacs_url) as client:
        state = WatchState.load(path, url=client.url, run_id=run_id)
        watcher = Watcher(client, predictor, state, run_id=run_id, include_existing=True)
        watcher.poll_once()  # first sight: instance counts noted
        outcomes = {o.study_uid: o for o in watcher.poll_once()}
    watched = ps.watch_results(path, config.pacs_url, run_id)
    for study in studies:
        assert watched[study["study_uid"]].probabilities == outcomes[study["study_uid"]].prediction.study
        assert watched[study["study_uid"]].source == ps.WATCH
    assert ps.watch_results(tmp_path / "absent.json", config.pacs_url, run_id) == {}
    with pytest.raises(PacsError, match="another server or run"):
        ps.watch_results(path, config.pacs_url, "another-run")

    record = ps.DashboardResults()
    version = record.version
    uid = studies[0]["study_uid"]
    newer = _result(uid, 0.7, at="2999-01-01T00:00:00Z")
    record.record(config.pacs_url, run_id, newer)
    record.mark_pushed(config.pacs_url, run_id, uid, "9.9", "1.2.3.4")
    assert record.version == version + 2
    mine = record.results(config.pacs_url, run_id)
    assert mine[uid].sr_sop_instance_uid == "1.2.3.4" and record.results(config.pacs_url, "other") == {}
    merged = ps.merge_results(watched, mine)
    assert merged[uid].source == ps.DASHBOARD and merged[studies[1]["study_uid"]].source == ps.WATCH
    older = {uid: _result(uid, 0.2, at="2000-01-01T00:00:00Z")}
    assert ps.merge_results(watched, older)[uid].source == ps.WATCH  # the newer result wins


# -------------------------------------------------------------------------------------------- errors
def test_a_server_that_is_down_refuses_or_is_slow_gives_one_message(orthanc, monkeypatch):
    from hemorrhage_core.dashboard import pacs_predict

    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    down = DashboardConfig(pacs_url=f"http://127.0.0.1:{free_port()}/dicom-web", pacs_timeout_s=5)
    with pytest.raises(PacsUnavailableError):
        ps.list_studies(down)
    outcome = pacs_predict._studies(down)
    assert outcome.value is None and "cannot connect to" in outcome.error

    monkeypatch.setenv("HEMORRHAGE_DICOMWEB_USER", orthanc.user)
    monkeypatch.setenv("HEMORRHAGE_DICOMWEB_PASSWORD", "not-the-password-" + orthanc.password[:4])
    refused = DashboardConfig(pacs_url=orthanc.url, pacs_timeout_s=10)
    for outcome in (pacs_predict._studies(refused), pacs_predict._series(refused, "1.2.3"),
                    pacs_predict._fetch(refused, pacs_predict._FetchRequest("1.2.3", None, Progress()))):
        assert "HTTP 401 (the credentials were refused)" in outcome.error
        assert "not-the-password" not in outcome.error and orthanc.password not in outcome.error

    with fake_dicomweb("slow", delay_s=3) as (url, _):
        slow = DashboardConfig(pacs_url=url, pacs_timeout_s=0.5)
        assert "did not answer within 0.5 s" in pacs_predict._studies(slow).error

    leaky = DashboardConfig(pacs_url="http://alice:hunter2@127.0.0.1:1/dicom-web")
    error = pacs_predict._studies(leaky).error
    assert "HEMORRHAGE_DICOMWEB_URL must not hold credentials" in error and "hunter2" not in error
