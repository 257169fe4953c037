"""Canary: identifying DICOM header text never leaves the DICOM files.

Synthetic slices whose PatientName, PatientID, PatientBirthDate, InstitutionName,
ReferringPhysicianName, StudyDescription, AccessionNumber and SpecificCharacterSet hold unique marker
strings go through synth -> ``train`` (stage 1, then stage 2) -> ``evaluate`` -> ``predict --json`` ->
the dashboard's upload analysis (in this process) and the dashboard page (headless Chromium). The
markers must appear in no byte of any file under the runs folder, in no stdout/stderr of the commands
(run with ``-v``: DEBUG logging), in no log record or warning of this process, and in neither the page
nor the app server's DEBUG log.

Two markers sit where pydicom's own validation warnings quote them: an unknown SpecificCharacterSet on
every slice ("Unknown encoding '<value>'", the slices stay usable) and an invalid IS NumberOfFrames on
one extra slice ("Invalid value for VR IS: '<value>'", the slice is refused). Control tests show that
pydicom does emit those warnings with the raw values, so a pass means the project kept them in.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hemorrhage_core.labels import LABELS
from hemorrhage_core.synthetic import write_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# A fresh token per test session, so a marker found anywhere can only have come from these files.
# 10 characters: the length of "ISO_IR 100", which the charset marker replaces byte for byte.
MARKER = f"CNRY{secrets.token_hex(3).upper()}"
BIRTH_DATE = "18610923"  # DA must be 8 digits; a date nobody alive has
IDENTITY_TAGS = {
    "PatientName": f"{MARKER}NAME^PATIENT{{patient}}",
    "PatientID": f"{MARKER}PID{{patient}}",
    "PatientBirthDate": BIRTH_DATE,
    "InstitutionName": f"{MARKER}INSTITUTION",
    "ReferringPhysicianName": f"{MARKER}REF^DOCTOR",
    "StudyDescription": f"{MARKER}STUDY",
    "AccessionNumber": f"{MARKER}AN",  # SH: at most 16 characters
}
NEEDLES = (MARKER.lower().encode(), BIRTH_DATE.encode(), b"1861-09-23")
CHARSET = b"ISO_IR 100"
NUMBER_OF_FRAMES = b"-1234567890"  # a valid 11-character IS, replaced by "1" + MARKER after writing
# The reader's DEBUG line when it dropped pydicom warnings during a read.
SUPPRESSED = "DEBUG hemorrhage_core.dicom.reader: suppressed"
POISON_ID = "ID_c0ffee000"  # the extra slice that the reader refuses
COMMON_ARGS = (
    "--backbone",
    "resnet18",
    "--epochs",
    "1",
    "--image-size",
    "32",
    "--input-size",
    "32",
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


def leaks(data: bytes | str) -> list[str]:
    """The markers found in ``data`` (case-insensitive), as text for an assertion message."""
    blob = (data.encode("utf-8", "replace") if isinstance(data, str) else data).lower()
    return [n.decode() for n in NEEDLES if n in blob]


def _patch(path: Path, old: bytes, new: bytes) -> None:
    """Replace header bytes in place; same length, so no element length changes."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1, f"{old!r} in {path.name}"
    path.write_bytes(data.replace(old, new))


def make_canary_set(root: Path) -> Path:
    """6 patients x 4 slices at 32 px with marker headers, plus one refused slice (labels included)."""
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    data = root / "data"
    write_dataset(
        data,
        patients=6,
        slices_per_patient=4,
        size=32,
        seed=0,
        workers=1,
        progress=False,
        identity_tags=IDENTITY_TAGS,
    )
    images = data / "stage_2_train"
    for path in images.glob("*.dcm"):
        _patch(path, CHARSET, MARKER.encode())
    write_ct_slice(
        images / f"{POISON_ID}.dcm",
        np.full((32, 32), 1024, dtype=np.int16),
        patient_id=f"{MARKER}PID99",
        study_uid=new_uid("canary/study"),
        series_uid=new_uid("canary/series"),
        sop_uid=new_uid("canary/sop"),
        z=0.0,
        instance_number=1,
        extra={
            **{k: v.replace("{patient}", "99") for k, v in IDENTITY_TAGS.items()},
            "NumberOfFrames": "-1234567890",
        },
    )
    _patch(images / f"{POISON_ID}.dcm", NUMBER_OF_FRAMES, b"1" + MARKER.encode())
    with open(data / "stage_2_train.csv", "a") as fh:
        fh.writelines(f"{POISON_ID}_{label},0\n" for label in LABELS)
    return data


def _env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always"}


def _start(*args: str) -> subprocess.Popen:
    """``python -m training -v ARGS`` (DEBUG logging), with stdout and stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "training", "-v", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, name: str, outputs: dict[str, str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    outputs[f"{name} stdout"], outputs[f"{name} stderr"] = out, err
    return proc.returncode, out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> SimpleNamespace:
    """synth -> train s1 -> train s2 -> (evaluate || predict); every command's output kept."""
    root = tmp_path_factory.mktemp("canary")
    data, runs = make_canary_set(root), root / "runs"
    outputs: dict[str, str] = {}
    codes: dict[str, int] = {}

    def train(stage: int, *extra: str) -> Path:
        proc = _start(
            "train", "--data", str(data), "--stage", str(stage), "--runs-dir", str(runs), *extra, *COMMON_ARGS
        )
        codes[f"train{stage}"], out = _finish(proc, f"train s{stage}", outputs)
        assert codes[f"train{stage}"] == 0, outputs[f"train s{stage} stderr"][-3000:]
        return Path(out.strip().splitlines()[-1])  # the run directory, by contract

    stage1 = train(1)
    stage2 = train(2, "--init-from", str(stage1))
    images = sorted((data / "stage_2_train").glob("*.dcm"))
    # evaluate and predict only read the run: run them side by side to save wall time.
    # --save: the saved evaluation (predictions.csv, metrics.json) is scanned for markers too.
    evaluate = _start("evaluate", "--run", str(stage2), "--data", str(data), "--json", "--save", "canary")
    predict = _start("predict", "--run", str(stage2), *map(str, images), "--json")
    codes["evaluate"], evaluate_out = _finish(evaluate, "evaluate", outputs)
    codes["predict"], predict_out = _finish(predict, "predict", outputs)
    return SimpleNamespace(
        root=root,
        data=data,
        runs=runs,
        stage1=stage1,
        stage2=stage2,
        images=images,
        good_images=[p for p in images if p.stem != POISON_ID],
        outputs=outputs,
        codes=codes,
        evaluation=json.loads(evaluate_out),
        predictions=json.loads(predict_out),
    )


# ------------------------------------------------------------------------------------------ controls


def test_control_the_inputs_carry_the_markers_and_pydicom_quotes_them(tmp_path):
    """Without these, a pass below would prove nothing: the files hold every marker, and pydicom's
    validation warnings repeat two of them verbatim."""
    import pydicom

    from hemorrhage_core.dicom import read_slice
    from hemorrhage_core.errors import DicomReadError

    data = make_canary_set(tmp_path)
    good = sorted((data / "stage_2_train").glob("ID_*.dcm"))[0]
    poison = data / "stage_2_train" / f"{POISON_ID}.dcm"
    for path in (good, poison):
        raw = path.read_bytes()
        for value in (*(v.replace("{patient}", "") for v in IDENTITY_TAGS.values()), MARKER):
            assert value.split("^")[0].encode() in raw
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        str(pydicom.dcmread(good).PatientName)
        pydicom.dcmread(poison).NumberOfFrames  # noqa: B018
    quoted = [str(w.message) for w in seen if MARKER in str(w.message)]
    assert any("Unknown encoding" in q for q in quoted), quoted
    assert any("Invalid value for VR IS" in q for q in quoted), quoted
    assert set(leaks(good.read_bytes())) == {MARKER.lower(), BIRTH_DATE}  # the search finds them
    # The project's reader: the charset marker leaves a slice usable, the IS marker refuses it.
    assert read_slice(good).hu.shape == (32, 32)
    with pytest.raises(DicomReadError):
        read_slice(poison)


# ------------------------------------------------------------------------------ command line, runs


def test_commands_succeed_and_the_refused_slice_is_skipped(pipeline):
    assert pipeline.codes["train1"] == pipeline.codes["train2"] == pipeline.codes["evaluate"] == 0
    assert pipeline.codes["predict"] != 0  # one input was refused (the exit code says so)
    for run in (pipeline.stage1, pipeline.stage2):
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "finished"
        assert info["data"]["skipped"] == [POISON_ID]
        assert info["data"]["n_patients_train"] + info["data"]["n_patients_val"] == 6
    assert pipeline.evaluation["n_images"] == 24 and pipeline.evaluation["skipped"] == [POISON_ID]
    rows = {Path(r["file"]).stem: r for r in pipeline.predictions}
    assert len(rows) == 25 and rows[POISON_ID]["error"] and rows[POISON_ID]["probabilities"] is None
    good = [r for stem, r in rows.items() if stem != POISON_ID]
    assert all(r["error"] is None and set(r["probabilities"]) == set(LABELS) for r in good)


def test_no_marker_in_any_file_under_the_runs_folder(pipeline):
    files = [p for p in pipeline.runs.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # Every kind of file a run writes is among those searched.
    for expected in (
        "run.json",
        "metrics.csv",
        "predictions.csv",
        "index.csv",
        "best.pt",
        "last.pt",
        "train.log",
        "split.csv",
        "thresholds.json",
        "metrics.json",  # the saved evaluation's
    ):
        assert expected in names, expected
    assert any(n.endswith(".png") for n in names)
    found = {str(p.relative_to(pipeline.runs)): leaks(p.read_bytes()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    # Patients in the run records are one-way hashes, not the marker ids.
    predictions = pd.read_csv(pipeline.stage2 / "predictions.csv")
    assert predictions["patient"].astype(str).str.fullmatch(r"[0-9a-f]{16}").all()
    # Paths too (a marker in a file or folder name would not show in the bytes).
    assert leaks("\n".join(str(p) for p in pipeline.runs.rglob("*"))) == []


def test_no_marker_in_any_command_output(pipeline):
    assert set(pipeline.outputs) == {
        f"{cmd} {stream}"
        for cmd in ("train s1", "train s2", "evaluate", "predict")
        for stream in ("stdout", "stderr")
    }
    # DEBUG logging was on (-v), and the reader did meet (and drop) pydicom's raw-valued warnings.
    for name in ("train s1", "evaluate", "predict"):
        assert SUPPRESSED in pipeline.outputs[f"{name} stderr"], name
    assert {name: leaks(text) for name, text in pipeline.outputs.items() if leaks(text)} == {}


# ---------------------------------------------------------------------------- dashboard, in process


def test_dashboard_upload_analysis_keeps_markers_out_of_results_logs_and_warnings(pipeline, caplog, tmp_path):
    """The functions behind the Predict panel: read_uploads -> PredictorCache -> analyse_uploads."""
    from hemorrhage_core.dashboard.predict_panel import read_uploads
    from hemorrhage_core.dashboard.predictors import PredictorCache, analyse_uploads
    from hemorrhage_core.runs import read_run

    caplog.set_level(logging.DEBUG)
    chosen = [*pipeline.good_images[:3], pipeline.data / "stage_2_train" / f"{POISON_ID}.dcm"]
    # read_uploads deletes what it reads, as Shiny's temporary files must be: give it copies.
    infos = []
    for i, path in enumerate(chosen):
        copy = tmp_path / f"upload{i}"
        shutil.copyfile(path, copy)
        infos.append({"name": path.name, "datapath": str(copy)})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        uploads, problems = read_uploads(infos, max_bytes=1 << 20, max_files=8)
        record = read_run(pipeline.stage2)
        predictor = PredictorCache().get(record.id, record.model_path)
        results = analyse_uploads(predictor, uploads, "any")
    assert problems == [] and not any(Path(i["datapath"]).exists() for i in infos)
    by_name = {r.name: r for r in results}
    assert by_name[f"{POISON_ID}.dcm"].error and not by_name[f"{POISON_ID}.dcm"].ok
    usable = [r for r in results if r.ok]
    assert len(usable) == 3 and all(set(r.probabilities) == set(LABELS) for r in usable)
    # The same numbers as the predict command: one Predictor behind both.
    for r in usable:
        row = next(x for x in pipeline.predictions if Path(x["file"]).name == r.name)
        assert r.probabilities == pytest.approx(row["probabilities"], abs=1e-5)
    texts = [
        *(
            f"{r.name} {r.error} {r.flags} {r.probabilities} {r.modality} {r.series} {r.z} {r!r}"
            for r in results
        ),
        *problems,
        *(str(w.message) for w in seen),
        *(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
    ]
    assert [t for t in texts if leaks(t)] == []
    assert any(SUPPRESSED in f"DEBUG {r.name}: {r.getMessage()}" for r in caplog.records)


# --------------------------------------------------------------------------- dashboard in a browser


@pytest.fixture(scope="module")
def canary_dashboard(pipeline):
    """The real app over the canary runs folder, its root logger at DEBUG (via a launcher module)."""
    shiny_run = pytest.importorskip("shiny.run")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed (make test-deps installs it)")
    launcher = pipeline.root / "canary_app.py"
    launcher.write_text(
        "import logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s: %(message)s')\n"
        "from app import app  # noqa: E402,F401  (app.py's own basicConfig is then a no-op)\n"
    )
    app = shiny_run.run_shiny_app(
        launcher,
        cwd=str(REPO),
        timeout_secs=120,
        env={
            "HEMORRHAGE_RUNS_DIR": str(pipeline.runs),
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(REPO),
            "PYTHONWARNINGS": "always",
        },
    )
    yield app
    app.close()


@pytest.mark.browser
def test_dashboard_page_and_server_log_carry_no_marker(page, canary_dashboard, pipeline):
    from playwright.sync_api import expect
    from shiny.playwright import controller

    uploads = [*pipeline.good_images[:2], pipeline.data / "stage_2_train" / f"{POISON_ID}.dcm"]
    page.goto(canary_dashboard.url)
    controller.PageNavbar(page, "panel").set("predict")
    controller.InputSelect(page, "predict-model").expect_selected(pipeline.stage2.name)
    controller.InputFile(page, "predict-files").set([str(p) for p in uploads])
    status = page.locator("#predict-status")
    expect(status).to_contain_text("2 slice(s) predicted", timeout=120_000)
    expect(status.locator(".alert-danger")).to_contain_text(f"{POISON_ID}.dcm")
    expect(page.locator("#predict-aligned_image img")).to_be_visible()
    texts = {"predict": page.locator("body").inner_text() + page.content()}
    # The runs table and one run's details (run.json, configuration, train.log tail).
    controller.PageNavbar(page, "panel").set("runs")
    table = page.locator("#runs-runs_grid")
    expect(table).to_contain_text(pipeline.stage2.name, timeout=60_000)
    table.locator("tr", has_text=pipeline.stage2.name).locator("td").first.click()
    expect(page.locator("#runs-details")).to_contain_text("train.log", timeout=60_000)
    texts["runs"] = page.locator("body").inner_text() + page.content()
    assert {panel: leaks(text) for panel, text in texts.items() if leaks(text)} == {}
    # Stop the server and read its whole output (wait_for returns once a stream is closed).
    canary_dashboard.close()
    canary_dashboard.proc.wait(timeout=60)
    for stream in (canary_dashboard.stdout, canary_dashboard.stderr):
        stream.wait_for(lambda line: False, timeout_secs=30)
    server_log = f"{canary_dashboard.stdout}{canary_dashboard.stderr}"
    assert SUPPRESSED in server_log  # DEBUG on, and the uploads' pydicom warnings were met and dropped
    assert "loading the model of run" in server_log  # the upload reached the shared Predictor
    assert leaks(server_log) == []
