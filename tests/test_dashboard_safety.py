"""Dashboard safety without a browser: upload cap below Shiny, sanitised errors, config, uploads, Predictors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hemorrhage_core.checkpoint import save_checkpoint
from hemorrhage_core.dashboard import config as dash_config
from hemorrhage_core.dashboard.predict_panel import read_uploads
from hemorrhage_core.dashboard.predictors import (
    PredictorCache,
    Upload,
    UploadResult,
    analyse_uploads,
    sort_by_position,
)
from hemorrhage_core.dashboard.safety import GENERIC_ERROR, UploadSizeLimit, user_message
from hemorrhage_core.dicom import new_uid, write_ct_slice
from hemorrhage_core.errors import CheckpointError, DicomReadError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.models import ModelSpec, build_model
from hemorrhage_core.preprocess import SlicePrep

REPO = Path(__file__).resolve().parent.parent
SECRET_NAME = "Canary^Dashboard"


# ------------------------------------------------------------------------------------ config
def run_async(coro):
    """Run a coroutine in its own thread: Playwright's sync API keeps an event loop running in the
    main thread once a browser test has run, and asyncio.run refuses to nest inside it."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_config_defaults_and_environment():
    default = dash_config.load_config({})
    assert default.runs_dir == Path("runs") and default.max_upload_bytes == 64 * 1024 * 1024
    custom = dash_config.load_config({"HEMORRHAGE_RUNS_DIR": "/data/runs", "HEMORRHAGE_MAX_UPLOAD_MB": "0.5"})
    assert custom.runs_dir == Path("/data/runs") and custom.max_upload_bytes == 512 * 1024
    for bad in ("zero", "0", "-3"):
        with pytest.raises(ValueError, match="HEMORRHAGE_MAX_UPLOAD_MB"):
            dash_config.load_config({"HEMORRHAGE_MAX_UPLOAD_MB": bad})


# ------------------------------------------------------------------------------ upload cap
async def _post(app, path: str, chunks: list[bytes]) -> tuple[bytes, list[dict]]:
    """Send one POST through ``app`` in chunks; return what the inner app read and the send messages."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await app(scope, receive, send)
    assert not pending, "the middleware must drain the whole request body"
    return received_body.pop(), sent


received_body: list[bytes] = []


async def recording_app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    received_body.append(body)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"OK"})


def test_upload_bodies_are_cut_after_the_cap_and_the_rest_is_drained():
    app = UploadSizeLimit(recording_app, max_bytes=10)
    path = "/session/abc123/upload/job42"
    body, sent = run_async(_post(app, path, [b"12345", b"67890", b"ABCDEFGHIJ", b"KLMNOP"]))
    assert body == b"1234567890A"  # cap + 1 byte: enough for the app to see the file is too large
    assert sent[0]["status"] == 200
    small, _ = run_async(_post(app, path, [b"1234", b"567890"]))
    assert small == b"1234567890"


def test_other_requests_pass_untouched():
    app = UploadSizeLimit(recording_app, max_bytes=4)
    body, _ = run_async(_post(app, "/session/abc/download/x", [b"0123456789"]))
    assert body == b"0123456789"
    with pytest.raises(ValueError):
        UploadSizeLimit(recording_app, max_bytes=0)


def test_read_uploads_deletes_every_file_and_refuses_oversized_ones(tmp_path):
    infos = []
    for name, size in (("a.dcm", 10), ("big.dcm", 100), ("empty.dcm", 0), ("c.dcm", 5)):
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        infos.append({"name": name, "size": size, "type": "", "datapath": str(path)})
    uploads, problems = read_uploads(infos, max_bytes=50, max_files=3)
    assert [u.name for u in uploads] == ["a.dcm"]
    assert problems[0].startswith("big.dcm: larger than the") and "upload limit" in problems[0]
    assert problems[1:] == ["empty.dcm: the file is empty.", "c.dcm: not read; at most 3 files at a time."]
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ sanitised errors
def test_user_message_passes_project_errors_and_hides_others(caplog):
    assert user_message(DicomReadError("not a DICOM file")) == "not a DICOM file"
    caplog.set_level(logging.INFO, logger="hemorrhage_core.dashboard")
    detail = f"/secret/path/{SECRET_NAME}.dcm"
    try:
        raise KeyError(detail)
    except KeyError as exc:
        text = user_message(exc, context="a test")
    assert text == GENERIC_ERROR
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "KeyError" in logged and "test_dashboard_safety.py" in logged
    assert SECRET_NAME not in logged and "/secret/path" not in logged


def test_app_module_assembles_with_the_cap_and_sanitised_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HEMORRHAGE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("HEMORRHAGE_MAX_UPLOAD_MB", "2")
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("app", None)
    app_module = importlib.import_module("app")
    try:
        assert isinstance(app_module.app, UploadSizeLimit)
        assert app_module.app.max_bytes == 2 * 1024 * 1024
        assert app_module.shiny_app.sanitize_errors is True
        assert app_module.INDEX.runs_dir == tmp_path
        assert [p[0] for p in app_module.PANELS] == [
            "runs",
            "metrics",
            "roc",
            "thresholds",
            "calibration",
            "stn",
            "compare",
            "predict",
            "worklist",
            "grid",
            "report",
        ]
        page = str(app_module.app_ui)
        assert dash_config.DISCLAIMER in page
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no remote asset in the page itself
    finally:
        sys.modules.pop("app", None)


# ------------------------------------------------------------------------------ predictors
def head_hu(n: int = 96, bleed: bool = True) -> np.ndarray:
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n - 0.5
    r = np.hypot(xx / 0.8, yy)
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[r < 0.42] = 1200.0
    hu[r < 0.37] = 35.0
    if bleed:
        hu[np.hypot(xx - 0.1, yy) < 0.06] = 75.0
    return hu


def dicom_bytes(tmp_path: Path, name: str, z: float, series: str = "s1") -> bytes:
    path = tmp_path / f"{name}.dcm"
    write_ct_slice(
        path,
        np.rint(head_hu() + 1024).astype(np.int16),
        patient_id="PID-CANARY",
        study_uid=new_uid("study"),
        series_uid=new_uid(series),
        sop_uid=new_uid(name),
        z=z,
        instance_number=1,
        extra={"PatientName": SECRET_NAME},
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", 2, input_size=64, hidden=(16, 8, 8))).eval()
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best.pt", model, prep=SlicePrep(64)
    )


def test_predictor_cache_loads_once_and_reloads_a_changed_model(tmp_path):
    loads = []
    cache = PredictorCache(loader=lambda path: loads.append(path) or object())
    model = tmp_path / "best.pt"
    model.write_bytes(b"v1")
    first = cache.get("run-1", model)
    assert cache.get("run-1", model) is first and len(loads) == 1
    os.utime(model, ns=(1, 1))
    assert cache.get("run-1", model) is not first and len(loads) == 2 and len(cache) == 1
    with pytest.raises(CheckpointError, match="no saved model"):
        cache.get("run-2", tmp_path / "absent.pt")


def test_analyse_uploads_predicts_each_slice_in_z_order_and_reports_bad_files(tmp_path, checkpoint):
    predictor = PredictorCache().get("run", checkpoint)
    uploads = [
        Upload("late.dcm", dicom_bytes(tmp_path, "late", z=20.0)),
        Upload("garbage.dcm", b"\x00not a dicom file" * 10),
        Upload("early.dcm", dicom_bytes(tmp_path, "early", z=5.0)),
    ]
    results = analyse_uploads(predictor, uploads, saliency_label="any")
    assert [r.name for r in results] == ["early.dcm", "late.dcm", "garbage.dcm"]
    good = results[0]
    assert list(good.probabilities) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in good.probabilities.values())
    assert good.aligned.dtype == np.uint8 and good.aligned.shape[0] == 3
    assert good.heatmap is not None and good.heatmap.shape == good.hu.shape  # overlays the slice
    assert good.hu.shape == (96, 96) and good.z == 5.0
    bad = results[2]
    assert not bad.ok and bad.error and "Traceback" not in bad.error and str(tmp_path) not in bad.error
    text = repr([(r.name, r.error, r.flags, r.modality) for r in results])
    assert SECRET_NAME not in text and "PID-CANARY" not in text


def test_sort_by_position_groups_series_then_z():
    def r(i, series, z):
        return UploadResult(index=i, name=str(i), series=series, z=z)

    failed = UploadResult(index=0, name="bad", error="no")
    ordered = sort_by_position(
        [failed, r(1, "b", 2.0), r(2, "a", 9.0), r(3, "b", 1.0), r(4, "a", None), r(5, "a", 3.0)]
    )
    assert [x.index for x in ordered] == [3, 1, 5, 2, 4, 0]


# ------------------------------------------------------------------------------ figures
def test_figure_output_serves_plotly_js_from_the_installed_package():
    from htmltools import TagList

    from hemorrhage_core.dashboard.figures import figure_output

    deps = {d.name: d for d in TagList(figure_output("roc")).get_dependencies()}
    assert set(deps) == {"plotly-js", "hemorrhage-plotly-binding"}
    for dep in deps.values():
        folder = Path(dep.source["subdir"])
        for script in dep.script:
            assert (folder / script["src"]).is_file()  # served by this app, never from a CDN


def test_render_figure_sends_escaped_plotly_json():
    import json

    import plotly.graph_objects as go

    from hemorrhage_core.dashboard.figures import PLOT_CONFIG, render_figure

    figure = go.Figure(go.Bar(x=[1, 2], y=[3, 4], name="</script><b>x"))
    payload = run_async(render_figure().transform(figure))
    assert payload["config"] == PLOT_CONFIG and PLOT_CONFIG["displaylogo"] is False
    assert "</script>" not in payload["figure"]
    data = json.loads(payload["figure"])["data"][0]
    assert data["name"] == "</script><b>x" and data["y"] == [3, 4]
