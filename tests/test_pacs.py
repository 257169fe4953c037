"""``python -m training pacs find|predict|watch`` end to end against a real Orthanc with its DICOMweb
plugin (tests/pacs_fixtures.py): synthetic phantom series stored with STOW-RS, found with QIDO-RS,
fetched with WADO-RS, predicted with a tiny freshly initialised run, and the DICOM SR pushed back, found
again and read with highdicom (and dciodvfy when installed). Servers that fail (unreachable, 401, 500,
too slow, bad TLS) get one clear message and the documented exit code; no patient name or id, and no
credential, appears in any output or log."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
from pacs_fixtures import (
    ORTHANC_BINARY,
    SKIP_REASON,
    OrthancServer,
    fake_dicomweb,
    free_port,
    self_signed_certificate,
)

from hemorrhage_core.labels import LABELS
from training import cli

pytestmark = pytest.mark.skipif(ORTHANC_BINARY is None, reason=SKIP_REASON)

REPO = Path(__file__).resolve().parent.parent
ENV_NAMES = ("HEMORRHAGE_DICOMWEB_USER", "HEMORRHAGE_DICOMWEB_PASSWORD", "HEMORRHAGE_DICOMWEB_TOKEN",
             "HEMORRHAGE_DICOMWEB_CA_BUNDLE")
# Written into every phantom's header; none may appear in any output ({patient}: the patient index).
IDENTITY = {"PatientName": "CANARY^PACSNAME{patient}", "PatientID": "PIDCANARY{patient}Q",
            "InstitutionName": "Canary Institute 7719", "PatientBirthDate": "19450704"}
CANARIES = ("CANARY", "PACSNAME", "PIDCANARY", "Canary Institute")
UID_PATTERN = re.compile(r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))+$")
SLICES = 6


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def orthanc():
    server = OrthancServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A freshly initialised tiny stage-2 run (resnet18 at 32 px: its outputs differ between slices)."""
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    spec = ModelSpec(backbone="resnet18", stage=2, input_size=32, hidden=(16, 8))
    model = build_model(spec, weights="none")
    writer = RunWriter.create(tmp_path_factory.mktemp("runs"), backbone=spec.backbone, stage=2,
                              config={"image_size": 48})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=SlicePrep(48), config={"seed": 0})
    writer.finish()
    return writer.path


def phantom_series(folder: Path, *, patients: int, slices: int, seed: int) -> list[list[Path]]:
    """Synthetic series (one study each, canary identity in the headers): files per patient, in z order."""
    import pydicom

    from hemorrhage_core.synthetic import write_dataset

    write_dataset(folder, patients=patients, slices_per_patient=slices, size=64, seed=seed, workers=1,
                  progress=False, identity_tags=IDENTITY)
    by_series: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted((folder / "stage_2_train").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append((float(ds.ImagePositionPatient[2]), path))
    return [[p for _, p in sorted(files)] for files in by_series.values()]


def read(paths):
    import pydicom

    return [pydicom.dcmread(p) for p in paths]


def call(*argv, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m training ARGV`` in this process with only ``env``'s DICOMweb variables set."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_NAMES:
            mp.delenv(name, raising=False)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_no_identity(*texts: str) -> None:
    for text in texts:
        for canary in CANARIES:
            assert canary not in text


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory) -> dict:
    """One phantom study of SLICES axial CT slices, stored with STOW-RS."""
    (files,) = phantom_series(tmp_path_factory.mktemp("study"), patients=1, slices=SLICES, seed=11)
    datasets = read(files)
    orthanc.stow(datasets)
    return {"study_uid": datasets[0].StudyInstanceUID, "series_uid": datasets[0].SeriesInstanceUID,
            "files": files, "sop": {str(p): ds.SOPInstanceUID for p, ds in zip(files, datasets, strict=True)},
            "datasets": datasets}


@pytest.fixture(scope="module")
def pushed(orthanc, study, run_dir) -> dict:
    """``pacs predict --push --json`` on the study, run once for the tests that check its SR."""
    code, out, err = call("pacs", "predict", "--url", orthanc.url, "--study", study["study_uid"], "--run", run_dir,
                          "--push", "--json", env=orthanc.env)
    assert code == 0, err
    return {"result": json.loads(out), "out": out, "err": err}


@pytest.fixture(scope="module")
def sr(orthanc, study, pushed):
    """The SR as WADO-RS returns it."""
    from hemorrhage_core.pacs import PacsClient

    where = pushed["result"]["pushed"]
    with PacsClient.from_url(orthanc.url, environ=orthanc.env) as client:
        return client.fetch_dataset(study["study_uid"], where["series_uid"], where["sop_instance_uid"])


# ------------------------------------------------------------------------------------------------ find
def test_find_lists_the_study_without_patient_identifiers(orthanc, study):
    code, out, err = call("pacs", "find", "--url", orthanc.url, "--json", env=orthanc.env)
    assert code == 0, err
    found = {s["study_uid"]: s for s in json.loads(out)}
    entry = found[study["study_uid"]]
    assert set(entry) == {"study_uid", "study_date", "description", "modalities", "n_series", "n_instances"}
    first = study["datasets"][0]
    assert entry == {"study_uid": study["study_uid"], "study_date": first.StudyDate,
                     "description": first.StudyDescription, "modalities": ["CT"], "n_series": 1,
                     "n_instances": SLICES}
    assert_no_identity(out, err)
    # The filters narrow the answer; the table names the study too.
    next_day = str(int(first.StudyDate) + 1)
    code, out, _ = call("pacs", "find", "--url", orthanc.url, "--json", "--since", next_day, env=orthanc.env)
    assert code == 0 and study["study_uid"] not in out
    code, out, _ = call("pacs", "find", "--url", orthanc.url, "--json", "--modality", "MR", env=orthanc.env)
    assert code == 0 and study["study_uid"] not in out
    code, out, err = call("pacs", "find", "--url", orthanc.url, env=orthanc.env)
    assert code == 0 and study["study_uid"] in out
    assert_no_identity(out, err)
    code, _, err = call("pacs", "find", "--url", orthanc.url, "--since", "2019-01-01", env=orthanc.env)
    assert code == 2 and "YYYYMMDD" in err


# --------------------------------------------------------------------------------------------- predict
def test_predict_reports_every_slice_as_predict_does(pushed, study, run_dir):
    result = pushed["result"]
    assert set(result) == {"study_uid", "series_uid", "slices", "study", "pushed"}
    assert (result["study_uid"], result["series_uid"]) == (study["study_uid"], study["series_uid"])
    slices = result["slices"]
    assert [s["sop_instance_uid"] for s in slices] == [ds.SOPInstanceUID for ds in study["datasets"]]  # z order
    assert [s["z"] for s in slices] == [float(ds.ImagePositionPatient[2]) for ds in study["datasets"]]
    assert all(s["error"] is None for s in slices)
    # The same Predictor on the same files: `predict --json` gives the same probabilities and flags.
    code, out, err = call("predict", "--run", run_dir, "--json", *study["files"])
    assert code == 0, err
    by_sop = {study["sop"][row["file"]]: row for row in json.loads(out)}
    for s in slices:
        reference = by_sop[s["sop_instance_uid"]]
        np.testing.assert_allclose([s["probabilities"][k] for k in LABELS],
                                   [reference["probabilities"][k] for k in LABELS], rtol=0, atol=0)  # exactly equal
        assert s["warnings"] == reference["flags"]
    spread = np.ptp([[s["probabilities"][k] for k in LABELS] for s in slices], axis=0)
    assert spread.max() > 1e-4  # the slices differ, so the maxima below are a real check
    assert result["study"] == {k: max(s["probabilities"][k] for s in slices) for k in LABELS}
    assert_no_identity(pushed["out"], pushed["err"])


def test_pushed_sr_is_found_again_and_holds_the_study_probabilities(orthanc, study, pushed, sr):
    from hemorrhage_core.pacs import read_sr

    result = pushed["result"]
    where = result["pushed"]
    series = orthanc.series_of(study["study_uid"], modality="SR")
    assert [s["0020000E"]["Value"][0] for s in series] == [where["series_uid"]]
    assert orthanc.instances_of(study["study_uid"], where["series_uid"]) == [where["sop_instance_uid"]]
    summary = read_sr(sr)  # highdicom parses it against TID 1500
    assert summary.study_uid == study["study_uid"]
    assert (summary.series_uid, summary.sop_instance_uid) == (where["series_uid"], where["sop_instance_uid"])
    assert summary.values == result["study"]  # exactly: FloatingPointValue carries the float
    for label in LABELS:  # each value references the first slice (in z order) holding the maximum
        top = next(s for s in result["slices"] if s["probabilities"][label] == result["study"][label])
        assert summary.max_slices[label] == top["sop_instance_uid"]
    assert summary.source_series == (study["series_uid"],)
    evidence = {item.ReferencedSOPInstanceUID for series_item in sr.CurrentRequestedProcedureEvidenceSequence
                for ref in series_item.ReferencedSeriesSequence for item in ref.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID for ds in study["datasets"]}


def test_pushed_sr_follows_the_ihe_ai_results_conventions(sr, study, run_dir):
    import highdicom as hd

    from hemorrhage_core import __version__
    from hemorrhage_core.runs import read_run

    assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription.startswith("CAUTION: Not for Diagnostic Use")
    (equipment,) = sr.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == "hemorrhage-ct"
    assert __version__ in list(np.atleast_1d(equipment.SoftwareVersions))
    assert read_run(run_dir).id in equipment.ContributionDescription
    for uid in (sr.SeriesInstanceUID, sr.SOPInstanceUID):
        assert UID_PATTERN.match(uid) and len(uid) <= 64
        assert uid not in {study["series_uid"], *study["sop"].values()}
    units = {item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
             for group in sr.ContentSequence if "ContentSequence" in group
             for measurement_group in group.ContentSequence for item in measurement_group.ContentSequence
             if item.ValueType == "NUM"}
    assert units == {"1"}


def test_pushed_sr_copies_patient_and_study_and_nothing_else_identifying(sr, study):
    source = study["datasets"][0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyDescription", "AccessionNumber"):
        assert str(sr.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert "InstitutionName" not in sr
    copy = deepcopy(sr)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        del copy[keyword]
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True)
    for text in (*CANARIES, "19450704"):
        assert text.encode() not in buffer.getvalue()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_pushed_sr_passes_dciodvfy(sr, tmp_path):
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = checked.stdout + checked.stderr
    assert "Comprehensive3DSR" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_predict_chooses_the_axial_ct_series_and_refuses_the_others(orthanc, run_dir, tmp_path):
    from pydicom.uid import MRImageStorage, generate_uid

    (files,) = phantom_series(tmp_path, patients=1, slices=4, seed=21)
    axial = read(files)

    def derived(datasets, **changes):
        series_uid = generate_uid()
        out = []
        for ds in datasets:
            copy = deepcopy(ds)
            copy.SeriesInstanceUID = series_uid
            copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            for keyword, value in changes.items():
                setattr(copy, keyword, value)
            if "SOPClassUID" in changes:
                copy.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
            out.append(copy)
        return out

    localizer = derived(axial[:1], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    sagittal = derived(axial + axial[:1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])  # more slices than axial
    mr = derived(axial[:2], Modality="MR", SOPClassUID=MRImageStorage)
    orthanc.stow(axial + localizer + sagittal + mr)
    study_uid = axial[0].StudyInstanceUID
    base = ("pacs", "predict", "--url", orthanc.url, "--study", study_uid, "--run", run_dir, "--json")

    code, out, err = call(*base, env=orthanc.env)
    assert code == 0, err
    assert json.loads(out)["series_uid"] == axial[0].SeriesInstanceUID
    for series, words in ((mr, "modality MR, not CT"), (localizer, "localizer"), (sagittal, "not axial")):
        code, out, err = call(*base, "--series", series[0].SeriesInstanceUID, env=orthanc.env)
        assert code == 2 and out == ""
        assert words in err and series[0].SeriesInstanceUID in err
    code, _, err = call(*base, "--series", "1.2.3.4", env=orthanc.env)
    assert code == 2 and "is not in study" in err


def test_predict_refuses_a_study_without_ct_and_an_unknown_study(orthanc, run_dir, tmp_path):
    from pydicom.uid import MRImageStorage

    (files,) = phantom_series(tmp_path, patients=1, slices=2, seed=31)
    datasets = read(files)
    for ds in datasets:
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    orthanc.stow(datasets)
    for study_uid, words in ((datasets[0].StudyInstanceUID, "holds no CT series (modalities: MR)"),
                             ("1.2.3.999", "was not found"), ("not-a-uid", "is not a DICOM UID")):
        code, out, err = call("pacs", "predict", "--url", orthanc.url, "--study", study_uid, "--run", run_dir,
                              "--push", env=orthanc.env)
        assert code == 2 and out == "", err
        assert words in err
    assert orthanc.series_of(datasets[0].StudyInstanceUID, modality="SR") == []


def test_a_broken_instance_is_reported_and_nothing_is_pushed(orthanc, run_dir, tmp_path):
    (files,) = phantom_series(tmp_path, patients=1, slices=4, seed=41)
    datasets = read(files)
    broken = datasets[2]
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]  # a well-formed file with half its pixels
    orthanc.stow(datasets)
    study_uid = datasets[0].StudyInstanceUID
    code, out, err = call("pacs", "predict", "--url", orthanc.url, "--study", study_uid, "--run", run_dir, "--push",
                          "--json", env=orthanc.env)
    assert code == 2
    result = json.loads(out)
    assert result["pushed"] is None
    by_sop = {s["sop_instance_uid"]: s for s in result["slices"]}
    assert len(by_sop) == 4
    failed = by_sop.pop(broken.SOPInstanceUID)
    assert failed["probabilities"] is None and "pixel" in failed["error"].lower()
    assert all(s["probabilities"] is not None and s["error"] is None for s in by_sop.values())
    assert "1 of 4 slices could not be predicted; nothing was stored" in err
    assert orthanc.series_of(study_uid, modality="SR") == []
    assert_no_identity(out, err)


def test_assess_series_keeps_tilted_axial_slices_and_leaves_out_the_rest():
    import math

    from hemorrhage_core.pacs import SeriesSummary, assess_series

    def item(sop: str, z: float, *, tilt_deg: float = 0.0, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
             sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> dict:
        c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
        return {"00080018": {"vr": "UI", "Value": [sop]}, "00080016": {"vr": "UI", "Value": [sop_class]},
                "00080008": {"vr": "CS", "Value": list(image_type)},
                "00200037": {"vr": "DS", "Value": [1, 0, 0, 0, c, -s]},
                "00200032": {"vr": "DS", "Value": [0, 0, z]}}

    summary = SeriesSummary("1.2.3", "CT", None, 2, 6)
    found = assess_series("1.2", summary, [
        item("1.9.3", 10.0, tilt_deg=25), item("1.9.1", -5.0), item("1.9.2", 2.5, tilt_deg=-20),
        item("1.9.4", 0.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), item("1.9.5", 0.0, tilt_deg=90),
        item("1.9.6", 0.0, sop_class="1.2.840.10008.5.1.4.1.1.2.1")])
    assert found.refusal is None
    assert [ref.sop_instance_uid for ref in found.instances] == ["1.9.1", "1.9.2", "1.9.3"]  # along z
    assert found.left_out == {"localizer (scout) images": 1,
                              "slices that are not axial (coronal or sagittal reformats)": 1,
                              "not single-frame CT images (SOP class 1.2.840.10008.5.1.4.1.1.2.1)": 1}
    assert found.header["00080018"]["Value"] == ["1.9.1"]
    scout = assess_series("1.2", summary, [item("1.9.4", 0.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))])
    assert scout.refusal == "it holds only localizer (scout) images" and scout.instances == ()
    assert assess_series("1.2", SeriesSummary("1.2.4", "MR", None, 3, 1), []).refusal == "modality MR, not CT"


# ----------------------------------------------------------------------------------------- bad servers
def test_an_unreachable_server_exits_1(run_dir):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, out, err = call("pacs", "find", "--url", url)
    assert code == 1 and out == ""
    assert f"cannot connect to {url} (Connection refused)" in err and "Traceback" not in err
    code, _, err = call("pacs", "predict", "--url", url, "--study", "1.2.3", "--run", run_dir)
    assert code == 1 and "cannot connect" in err


def test_refused_credentials_exit_2_and_are_never_shown(orthanc, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = {"HEMORRHAGE_DICOMWEB_USER": orthanc.user, "HEMORRHAGE_DICOMWEB_PASSWORD": "wrong-Pa55word-42"}
    code, out, err = call("-v", "pacs", "find", "--url", orthanc.url, env=wrong)
    assert code == 2 and out == ""
    assert "HTTP 401 (the credentials were refused)" in err and "HEMORRHAGE_DICOMWEB_PASSWORD" in err
    code, _, err = call("pacs", "find", "--url", orthanc.url)
    assert code == 2 and "HTTP 401 (it asks for credentials)" in err
    # The right ones work, and no password reaches the output or the log, even at debug level.
    code, out, err = call("-v", "pacs", "find", "--url", orthanc.url, "--json", env=orthanc.env)
    assert code == 0, err
    for secret in ("wrong-Pa55word-42", orthanc.password):
        assert secret not in out + err + caplog.text
    code, _, err = call("pacs", "find", "--url", orthanc.url.replace("http://", f"http://x:{orthanc.password}@"))
    assert code == 2 and "must not hold credentials" in err and orthanc.password not in err


def test_a_failing_server_exits_1():
    with fake_dicomweb("error500") as (url, _):
        code, out, err = call("pacs", "find", "--url", url)
    assert code == 1 and out == ""
    assert f"{url} failed (HTTP 500)" in err and "internal failure" not in err


def test_a_slow_server_times_out():
    with fake_dicomweb("slow", delay_s=6) as (url, _):
        start = time.monotonic()
        code, out, err = call("pacs", "find", "--url", url, "--timeout", "1")
        elapsed = time.monotonic() - start
    assert code == 1 and out == ""
    assert f"{url} did not answer within 1 s" in err
    assert elapsed < 4  # one attempt, no retries behind the user's back


def test_a_bearer_token_is_sent_and_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    token = "tok-SECRET-7d1e"
    with fake_dicomweb("bearer", token=token) as (url, seen):
        code, out, err = call("-v", "pacs", "find", "--url", url, "--json", env={"HEMORRHAGE_DICOMWEB_TOKEN": token})
        assert code == 0, err
        assert json.loads(out) == []
        assert seen and all(r["authorization"] == f"Bearer {token}" for r in seen)
        assert token not in out + err + caplog.text
        code, _, err = call("pacs", "find", "--url", url, env={"HEMORRHAGE_DICOMWEB_TOKEN": "other"})
        assert code == 2 and "HTTP 401" in err
    code, _, err = call("pacs", "find", "--url", "ftp://127.0.0.1/dicom-web")
    assert code == 2 and "http:// or https://" in err


def test_tls_certificates_are_verified(tmp_path):
    tls = self_signed_certificate(tmp_path)
    if tls is None:
        pytest.skip("openssl is not installed")
    env = {"HEMORRHAGE_DICOMWEB_TOKEN": "t0ken"}
    with fake_dicomweb("bearer", token="t0ken", tls=tls) as (url, _):
        code, _, err = call("pacs", "find", "--url", url, env=env)
        assert code == 2 and "cannot be verified" in err and "HEMORRHAGE_DICOMWEB_CA_BUNDLE" in err
        code, out, err = call("pacs", "find", "--url", url, "--json", env={**env, "HEMORRHAGE_DICOMWEB_CA_BUNDLE": tls[0]})
        assert code == 0 and json.loads(out) == [], err


# ----------------------------------------------------------------------------------------------- watch
def test_backoff_doubles_up_to_its_maximum():
    from hemorrhage_core.pacs.watch import backoff_s

    assert [backoff_s(n, 5.0, 60.0) for n in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert backoff_s(1000, 5.0, 60.0) == 60.0
    assert backoff_s(3, 100.0, 60.0) == 100.0  # never shorter than the interval


def test_watch_state_belongs_to_one_server_and_run(tmp_path):
    from hemorrhage_core.errors import PacsError
    from hemorrhage_core.pacs import WatchState

    state = WatchState.load(tmp_path / "state.json", url="http://a/dicom-web", run_id="r1")
    state.record("1.2.3", "pushed", sr_sop_instance_uid="1.2.4")
    again = WatchState.load(tmp_path / "state.json", url="http://a/dicom-web", run_id="r1")
    assert again.studies["1.2.3"]["status"] == "pushed" and not again.fresh
    with pytest.raises(PacsError, match="another server or run"):
        WatchState.load(tmp_path / "state.json", url="http://b/dicom-web", run_id="r1")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(PacsError, match="damaged"):
        WatchState.load(tmp_path / "state.json", url="http://a/dicom-web", run_id="r1")


def _wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"watch exited with {proc.returncode} while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}:\n{log.read_text()}")


def test_watch_predicts_each_new_study_once_and_outlives_a_server_restart(run_dir, tmp_path):
    server = OrthancServer("hemorrhage-watch")
    server.start()
    proc = None
    try:
        before, first, second = (read(files) for files in phantom_series(tmp_path / "data", patients=3, slices=2, seed=51))
        server.stow(before)  # there before the watch starts: left alone
        state, log = tmp_path / "state.json", tmp_path / "watch.log"
        env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES} | server.env
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "training", "pacs", "watch", "--url", server.url, "--run", str(run_dir),
                 "--interval", "0.5", "--push", "--json", "--state", str(state)],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        _wait_for(state.exists, 120, "the first poll", proc, log)
        baseline = json.loads(state.read_text())["studies"]
        assert baseline == {before[0].StudyInstanceUID: baseline[before[0].StudyInstanceUID]}
        assert baseline[before[0].StudyInstanceUID]["status"] == "baseline"

        server.stow(first)
        _wait_for(lambda: server.series_of(first[0].StudyInstanceUID, "SR"), 90, "the first study's SR", proc, log)
        server.stop()  # the server goes away...
        _wait_for(lambda: "polling again in" in log.read_text(), 30, "a failed poll", proc, log)
        time.sleep(1.5)  # ...for a few polls
        server.start()  # and comes back with its storage
        server.stow(second)
        _wait_for(lambda: server.series_of(second[0].StudyInstanceUID, "SR"), 90, "the second study's SR", proc, log)
        _wait_for(lambda: "answers again" in log.read_text(), 30, "the recovery message", proc, log)
        time.sleep(2)  # a few more polls: nothing is predicted twice
        assert [len(server.series_of(ds[0].StudyInstanceUID, "SR")) for ds in (before, first, second)] == [0, 1, 1]

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, log.read_text()
        assert "watch stopped" in log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        server.close()

    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(line["study_uid"], line["status"]) for line in lines] == [
        (first[0].StudyInstanceUID, "pushed"), (second[0].StudyInstanceUID, "pushed")]
    for line, datasets in zip(lines, (first, second), strict=True):
        assert [s["sop_instance_uid"] for s in line["result"]["slices"]] == [ds.SOPInstanceUID for ds in datasets]
    studies = json.loads(state.read_text())["studies"]
    assert {uid: entry["status"] for uid, entry in studies.items()} == {
        before[0].StudyInstanceUID: "baseline", first[0].StudyInstanceUID: "pushed",
        second[0].StudyInstanceUID: "pushed"}
    log_text = log.read_text()
    assert_no_identity(out, log_text)
    assert server.password not in out + log_text
