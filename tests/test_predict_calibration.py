"""A run's calibration applied where probabilities leave the model: the Predictor, ``predict`` (with the
raw values beside the calibrated ones), the dashboard's predictor cache and its series verdict; a
damaged calibration.json refuses the run in one line; ``evaluate`` still calibrates raw values once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import write_dicom_series
from train_fixtures import write_tiny_set

from hemorrhage_core.calibration import Calibration
from hemorrhage_core.dashboard.predictors import PredictorCache, UploadResult, series_verdict
from hemorrhage_core.evaluations import CALIBRATION_JSON, EvaluationError, load_evaluation, read_calibration
from hemorrhage_core.inference import Predictor
from hemorrhage_core.labels import LABELS, consistent_labels
from hemorrhage_core.preprocess import SlicePrep
from training import cli

# Far from 1 so that calibrated and raw values differ visibly; one label left alone.
TEMPERATURES = {"epidural": 2.5, "intraparenchymal": 0.6, "intraventricular": 1.0, "subarachnoid": 3.0,
                "subdural": 0.8, "any": 1.7}


def _calibration() -> Calibration:
    nll = dict.fromkeys(LABELS, 0.5)
    return Calibration(dict(TEMPERATURES), n_images=12, nll_before=nll, nll_after=nll)


def _make_run(runs_dir: Path) -> Path:
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    model = build_model(ModelSpec("mobilenet_v3_small", 2, input_size=32, hidden=(16, 8)), weights="none")
    writer = RunWriter.create(runs_dir, backbone="mobilenet_v3_small", stage=2, config={"image_size": 48})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=SlicePrep(48))
    writer.finish()
    return writer.path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("calibrated")
    plain = _make_run(root / "runs")
    calibrated = Path(shutil.copytree(plain, root / "runs" / (plain.name[:-4] + "cal0")))
    (calibrated / CALIBRATION_JSON).write_text(json.dumps(_calibration().to_dict()))
    files = write_dicom_series(root / "series", n=4)
    return SimpleNamespace(root=root, plain=plain, calibrated=calibrated, files=files)


def _raw(setup) -> np.ndarray:
    predictor = Predictor.from_checkpoint(setup.plain / "checkpoints" / "best.pt")
    return np.array([[p.raw_probabilities[label] for label in LABELS] for p in map(predictor.predict, setup.files)])


def _call(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- Predictor
def test_predictor_applies_its_calibration_and_keeps_the_raw_values(setup):
    calibration = _calibration()
    raw = _raw(setup)
    predictor = Predictor.from_checkpoint(setup.plain / "checkpoints" / "best.pt", calibration=calibration)
    results = predictor.predict_many(setup.files)
    got = np.array([[r.probabilities[label] for label in LABELS] for r in results])
    kept = np.array([[r.raw_probabilities[label] for label in LABELS] for r in results])
    np.testing.assert_allclose(got, consistent_labels(calibration.apply(raw)), atol=1e-6)
    np.testing.assert_allclose(kept, raw, atol=1e-6)
    assert all(r.calibrated for r in results)
    # Temperature 1 leaves intraventricular as it was; the others move.
    j = LABELS.index("intraventricular")
    np.testing.assert_allclose(got[:, j], raw[:, j], atol=1e-9)
    assert np.abs(got - raw).max() > 1e-3
    one = predictor.predict(setup.files[0], saliency_label="any")  # the Grad-CAM path calibrates too
    np.testing.assert_allclose([one.probabilities[label] for label in LABELS], got[0], atol=1e-6)


def test_with_calibration_shares_the_model_and_leaves_the_original_alone(setup):
    plain = Predictor.from_checkpoint(setup.plain / "checkpoints" / "best.pt")
    calibrated = plain.with_calibration(_calibration())
    assert calibrated.model is plain.model and plain.calibration is None
    before = plain.predict(setup.files[1])
    after = calibrated.predict(setup.files[1])
    assert not before.calibrated
    assert before.probabilities == pytest.approx(dict(zip(LABELS, consistent_labels(
        [before.raw_probabilities[label] for label in LABELS]), strict=True)), abs=1e-12)
    assert after.raw_probabilities == pytest.approx(before.raw_probabilities, abs=1e-7)
    assert plain.with_calibration(None) is plain


# --------------------------------------------------------------------------------------- predict
def test_predict_json_gives_calibrated_and_raw_values(setup, capsys, tmp_path):
    raw = _raw(setup)
    submission = tmp_path / "sub.csv"
    code, out, err = _call(capsys, "predict", "--run", str(setup.calibrated), *map(str, setup.files), "--json",
                           "--submission", str(submission))
    assert code == 0, err
    rows = json.loads(out)
    assert all({"file", "probabilities", "error", "flags"} <= set(row) for row in rows)
    expected = consistent_labels(_calibration().apply(raw))
    for row, want, model in zip(rows, expected, raw, strict=True):
        assert row["calibrated"] is True and row["error"] is None
        assert list(row["probabilities"]) == list(LABELS)
        assert [row["probabilities"][label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-6)
        assert [row["raw_probabilities"][label] for label in LABELS] == pytest.approx(model.tolist(), abs=1e-6)
    assert "calibrated" in err
    # The submission carries what the table and "probabilities" show: the calibrated values.
    assert pd.read_csv(submission)["Label"].to_numpy() == pytest.approx(expected.ravel(), abs=1e-6)


def test_predict_on_an_uncalibrated_run_reports_the_raw_values_with_any_made_consistent(setup, capsys):
    code, out, _ = _call(capsys, "predict", "--run", str(setup.plain), str(setup.files[0]), "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["calibrated"] is False
    want = consistent_labels([row["raw_probabilities"][label] for label in LABELS])
    assert [row["probabilities"][label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-12)


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"method": "temperature", "temperatures": ', "not valid JSON"),
        (json.dumps({**_calibration().to_dict(), "temperatures": {**TEMPERATURES, "any": -1.0}}), "must be > 0"),
        (json.dumps({**_calibration().to_dict(), "method": "isotonic"}), "unknown calibration method"),
    ],
    ids=["truncated", "negative-temperature", "unknown-method"],
)
def test_a_damaged_calibration_refuses_the_run_in_one_line(setup, tmp_path, capsys, content, reason):
    run = Path(shutil.copytree(setup.plain, tmp_path / setup.plain.name))
    (run / CALIBRATION_JSON).write_text(content)
    code, out, err = _call(capsys, "predict", "--run", str(run), str(setup.files[0]), "--json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot use run {run}: calibration.json is damaged") and reason in err


# -------------------------------------------------------------------------------------- evaluate
def test_evaluate_calibrates_the_models_raw_probabilities_once(setup, tmp_path, capsys):
    """With calibration.json already there, evaluate's Predictor must still give raw values: the saved
    probabilities are calibrated once, not twice."""
    data = tmp_path / "data"
    labels = write_tiny_set(data, n_patients=3, slices_per_patient=3, size=32)
    run = Path(shutil.copytree(setup.calibrated, tmp_path / setup.calibrated.name))
    code, _, err = _call(capsys, "evaluate", "--run", str(run), "--data", str(data), "--save", "ext",
                         "--json", "--batch-size", "4", "--workers", "1")
    assert code == 0, err
    saved = load_evaluation(run, "ext")
    files = [data / "stage_2_train" / f"{i}.dcm" for i in saved.predictions["image_id"]]
    model = Predictor.from_checkpoint(run / "checkpoints" / "best.pt")
    raw = np.array([[model.predict(f).raw_probabilities[label] for label in LABELS] for f in files])
    probs = saved.predictions[[f"prob_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(probs, _calibration().apply(raw), atol=1e-5)
    assert len(saved.predictions) == len(labels)


# ------------------------------------------------------------------------------------- dashboard
def test_dashboard_cache_applies_the_runs_calibration_and_refuses_a_damaged_one(setup, tmp_path):
    from hemorrhage_core.dashboard.predict_panel import PredictRequest, _run_request
    from hemorrhage_core.dashboard.predictors import Upload

    run = Path(shutil.copytree(setup.calibrated, tmp_path / setup.calibrated.name))
    model_path = run / "checkpoints" / "best.pt"
    cache = PredictorCache()
    predictor = cache.get(run.name, model_path, run)
    assert predictor.calibration == read_calibration(run)
    assert cache.get(run.name, model_path).calibration is None  # without the run folder: the bare model
    assert cache.get(run.name, model_path, run).model is predictor.model and len(cache) == 1  # loaded once

    uploads = tuple(Upload(p.name, p.read_bytes()) for p in setup.files)
    ctx = SimpleNamespace(predictors=cache)
    batch = _run_request(ctx, PredictRequest(run.name, "a run", model_path, uploads, "any", run))
    assert batch.error is None and batch.calibrated
    raw = _raw(setup)
    by_name = {r.name: r for r in batch.results}
    for path, want, model in zip(setup.files, consistent_labels(_calibration().apply(raw)), raw, strict=True):
        result = by_name[path.name]
        assert [result.probabilities[label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-6)
        assert [result.raw_probabilities[label] for label in LABELS] == pytest.approx(model.tolist(), abs=1e-6)
    # No validation predictions in this run: every threshold is the default.
    assert batch.thresholds["study"] == dict.fromkeys(LABELS, 0.5)

    (run / CALIBRATION_JSON).write_text("{not json")
    batch = _run_request(ctx, PredictRequest(run.name, "a run", model_path, uploads, "any", run))
    assert batch.results == [] and batch.error.startswith("The model cannot be loaded: ")
    assert f"run {run.name}: calibration.json is damaged" in batch.error and str(tmp_path) not in batch.error
    with pytest.raises(EvaluationError):
        cache.get(run.name, model_path, run)
    (run / CALIBRATION_JSON).unlink()  # mended by removal: the bare model again, not reloaded
    assert cache.get(run.name, model_path, run) is cache.get(run.name, model_path)


def _result(i: int, name: str, z: float | None, probs: dict[str, float]) -> UploadResult:
    return UploadResult(index=i, name=name, z=z, series="s", probabilities=probs)


def test_series_verdict_takes_each_labels_maximum_and_its_slice():
    rng = np.random.default_rng(0)
    table = rng.uniform(0.0, 0.9, (5, len(LABELS)))
    table[3, LABELS.index("any")] = 0.95
    table[1, LABELS.index("subdural")] = table[4, LABELS.index("subdural")] = 0.93  # a tie: the first wins
    group = [_result(i, f"f{i}.dcm", 5.0 * i, dict(zip(LABELS, row, strict=True))) for i, row in enumerate(table)]
    thresholds = dict.fromkeys(LABELS, 0.9)
    verdict = series_verdict(group, thresholds)
    assert verdict.n_slices == 5 and [v.label for v in verdict.labels] == list(LABELS)
    for v in verdict.labels:
        j = LABELS.index(v.label)
        assert v.probability == table[:, j].max()
        assert v.slice_position == int(np.argmax(table[:, j])) + 1
        assert v.slice_name == f"f{v.slice_position - 1}.dcm" and v.z == 5.0 * (v.slice_position - 1)
        assert v.above == (v.probability >= 0.9)
    by_label = {v.label: v for v in verdict.labels}
    assert by_label["any"].slice_position == 4 and by_label["any"].above
    assert by_label["subdural"].slice_position == 2
    # At the threshold counts as above (p >= t, the rule the thresholds were chosen with).
    at = series_verdict(group[:1], {label: float(table[0, j]) for j, label in enumerate(LABELS)})
    assert all(v.above for v in at.labels)
    assert all(v.above is None and v.threshold is None for v in series_verdict(group, None).labels)
    failed = UploadResult(index=9, name="bad.dcm", error="not DICOM")
    assert series_verdict([*group, failed], thresholds).n_slices == 5
    with pytest.raises(ValueError):
        series_verdict([failed], thresholds)
