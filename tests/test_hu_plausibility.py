"""HU plausibility end to end: a slice whose HU cannot be a head CT is flagged, never predicted silently.

Slices written by the project's writer with a sign-flipped rescale and with RescaleIntercept dropped
(16-bit signed, and 12-bit unsigned raw values, which also pass through the RSNA 12-bit fix) are read
with the expected HU, keep their probabilities, and carry the Predictor's flags to ``predict --json``,
to ``predict``'s table and stderr, and to the dashboard's Predict panel as visible warnings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from htmltools import TagList

from hemorrhage_core.dashboard.predict_panel import PredictBatch, batch_notices, slice_label
from hemorrhage_core.dashboard.predictors import PredictorCache, Upload, analyse_uploads
from hemorrhage_core.dicom import new_uid, read_slice, write_ct_slice
from hemorrhage_core.inference import hu_flags
from hemorrhage_core.labels import LABELS
from training import cli

SIZE = 48


def _head_hu() -> np.ndarray:
    """An axial head in integer HU: air border, a bone ring, brain, a small bleed."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    hu = np.full((SIZE, SIZE), -1000, np.int32)
    hu[r < 18] = 1200
    hu[r < 15] = 35
    hu[np.hypot(yy - 5, xx + 4) < 3] = 75
    return hu


def _write(path: Path, stored: np.ndarray, *, drop_intercept: bool = False, **kwargs) -> Path:
    write_ct_slice(
        path,
        stored,
        patient_id="HU-TEST",
        study_uid=new_uid("hu-study"),
        series_uid=new_uid("hu-series"),
        sop_uid=new_uid(f"hu-{path.stem}"),
        z=0.0,
        instance_number=1,
        **kwargs,
    )
    if drop_intercept:
        ds = pydicom.dcmread(path)
        del ds.RescaleIntercept
        ds.save_as(path, enforce_file_format=True)
    return path


# name -> (expected flag codes, expected HU from the phantom's)
EXPECTED = {
    "normal": ([], lambda hu: hu),
    "sign_flipped": (["inverted"], lambda hu: -hu),
    "no_intercept_16bit": (["no_air"], lambda hu: hu + 1024),
    # unsigned 12-bit raw values without an intercept look like the RSNA quirk: fixed, then still no air
    "no_intercept_12bit": (["no_air"], lambda hu: np.mod(hu + 1024 + 1000, 4096) - 1000),
}


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hu")
    hu = _head_hu()
    signed = (hu + 1024).astype(np.int16)
    return {
        "normal": _write(folder / "normal.dcm", signed),
        "sign_flipped": _write(
            folder / "sign_flipped.dcm", signed, rescale_slope=-1.0, rescale_intercept=1024.0
        ),
        "no_intercept_16bit": _write(folder / "no_intercept_16bit.dcm", signed, drop_intercept=True),
        "no_intercept_12bit": _write(
            folder / "no_intercept_12bit.dcm",
            (hu + 1024).astype(np.uint16),
            bits_stored=12,
            pixel_representation=0,
            drop_intercept=True,
        ),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with a tiny untrained stage-2 model: predict needs a model, not a good one."""
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v3_small", stage=2, input_size=32, hidden=(16, 8))
    writer = RunWriter.create(tmp_path_factory.mktemp("runs"), backbone=spec.backbone, stage=2, config={})
    save_checkpoint(
        writer.checkpoint_path("best"),
        build_model(spec, weights="none"),
        prep=SlicePrep(32),
    )
    writer.finish()
    return writer.path


def _codes(flags: list[str]) -> list[str]:
    return [f.split(":")[0] for f in flags]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reader_gives_the_implausible_hu_and_the_check_flags_it(slices, name):
    codes, expected_hu = EXPECTED[name]
    hu = read_slice(slices[name]).hu
    np.testing.assert_array_equal(hu, expected_hu(_head_hu()).astype(np.float32))
    assert _codes(hu_flags(hu)) == codes


def test_predict_json_keeps_probabilities_and_carries_the_flags(slices, run_dir, capsys):
    files = [str(slices[name]) for name in EXPECTED]
    code = cli.main(["predict", "--run", str(run_dir), *files, "--json"])
    out, err = capsys.readouterr()
    assert code == 0  # flagged slices are predicted, not failed
    rows = json.loads(out)
    assert [r["file"] for r in rows] == files
    for name, row in zip(EXPECTED, rows, strict=True):
        assert row["error"] is None and list(row["probabilities"]) == list(LABELS)
        assert _codes(row["flags"]) == EXPECTED[name][0]
        assert row["flags"] == hu_flags(read_slice(slices[name]).hu)  # the Predictor's own words
    assert "warning: 3 of 4 predicted inputs do not look like a head CT slice" in err


def test_predict_table_shows_the_flags_beside_the_probabilities(slices, run_dir, capsys):
    code = cli.main(["predict", "--run", str(run_dir), str(slices["normal"]), str(slices["sign_flipped"])])
    out, err = capsys.readouterr()
    assert code == 0
    header, normal, flipped = out.strip().splitlines()
    assert header.split("\t")[-1] == "warnings"
    assert len(normal.split("\t")) == 1 + len(LABELS)  # no warning cell
    assert flipped.split("\t")[-1] == " | ".join(hu_flags(read_slice(slices["sign_flipped"]).hu))
    assert flipped.split("\t")[-1].startswith("inverted:")
    assert "1 of 2 predicted inputs do not look like a head CT slice" in err


def test_dashboard_shows_a_visible_warning_for_each_flagged_slice(slices, run_dir):
    predictor = PredictorCache().get("hu-run", run_dir / "checkpoints" / "best.pt")
    uploads = [Upload(f"{name}.dcm", slices[name].read_bytes()) for name in EXPECTED]
    results = {
        r.name.removesuffix(".dcm"): r for r in analyse_uploads(predictor, uploads, saliency_label=None)
    }
    for name, (codes, _) in EXPECTED.items():
        assert results[name].ok and _codes(results[name].flags) == codes
        assert len(results[name].probabilities) == len(LABELS)  # predicted, and flagged
    batch = PredictBatch("hu-run", results=list(results.values()))

    shown = results["sign_flipped"]
    html = TagList(*batch_notices(batch, shown)).get_html_string()
    warning = (
        '<div class="alert alert-warning panel-message" role="status">sign_flipped.dcm: does not look like'
    )
    assert warning in html
    assert "inverted: the image border" in html
    # the other flagged slices are named even while another slice is shown
    assert "2 other slice(s) look unlike a head CT slice" in html
    assert "no_intercept_16bit.dcm, no_intercept_12bit.dcm" in html

    html = TagList(*batch_notices(batch, results["normal"])).get_html_string()
    assert "does not look like" not in html  # the shown slice is fine
    assert "3 other slice(s) look unlike a head CT slice" in html

    assert slice_label(0, 4, results["no_intercept_16bit"]).endswith("⚠ not like a head CT")
    assert "⚠" not in slice_label(1, 4, results["normal"])
