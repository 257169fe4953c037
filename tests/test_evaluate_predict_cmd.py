"""``python -m training evaluate`` and ``predict`` end to end on real DICOM files and a real (untrained,
tiny) model saved as a run directory: output contracts, references computed with the Predictor and
scikit-learn directly, refusals and exit codes, and no patient header text in any output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from hemorrhage_core.labels import LABEL_WEIGHTS, LABELS, SUBTYPES
from training import cli

CANARY_NAME = "Canary^Zebulon7731"
CANARY_ID = "PIDCANARY5521"
SIZE = 64
# image index -> the subtypes present; epidural never occurs (its AUC must be null).
LESIONS = [(), ("subdural",), (), ("intraparenchymal",), ("subdural", "subarachnoid"), (),
           ("intraventricular",), (), ("intraparenchymal",), (), ("subarachnoid",), ()]
SLICES_PER_PATIENT = 3


def _head_hu(rng: np.random.Generator, subtypes: tuple[str, ...]) -> np.ndarray:
    """A crude axial head: air, a bone ring, brain, and a bright blob per subtype."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2
    r = np.hypot(yy, xx)
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[r < 28] = 1000.0
    hu[r < 24] = 35.0 + rng.normal(0, 4, (SIZE, SIZE))[r < 24]
    centres = {"intraparenchymal": (8, 6), "intraventricular": (0, 0), "subarachnoid": (-10, 8),
               "subdural": (0, -19), "epidural": (-18, 0)}
    for name in subtypes:
        cy, cx = centres[name]
        hu[np.hypot(yy - cy, xx - cx) < 4] = 75.0
    return hu


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    root = tmp_path_factory.mktemp("data")
    images = root / "stage_2_train"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for i, subtypes in enumerate(LESIONS):
        patient = i // SLICES_PER_PATIENT
        image_id = f"ID_{i:09x}"
        write_ct_slice(
            images / f"{image_id}.dcm",
            np.rint(_head_hu(rng, subtypes) + 1024).astype(np.int16),
            patient_id=f"{CANARY_ID}{patient}",
            study_uid=new_uid(f"study{patient}"),
            series_uid=new_uid(f"series{patient}"),
            sop_uid=new_uid(image_id),
            z=float(5 * (i % SLICES_PER_PATIENT)),
            instance_number=i % SLICES_PER_PATIENT + 1,
            extra={"PatientName": CANARY_NAME, "InstitutionName": "Canary General"},
        )
        six = [int(name in subtypes) for name in SUBTYPES]
        truth[image_id] = six + [int(any(six))]
    # Listed in the CSV but unusable: a garbage file (header refused) and a file cut short.
    garbage, truncated = "ID_0000000fa", "ID_0000000fb"
    (images / f"{garbage}.dcm").write_bytes(b"this is not a DICOM file at all" * 20)
    good = (images / "ID_000000000.dcm").read_bytes()
    write_ct_slice(
        images / f"{truncated}.dcm", np.zeros((SIZE, SIZE), np.int16), patient_id="X", study_uid=new_uid("s"),
        series_uid=new_uid("se"), sop_uid=new_uid("t"), z=0.0, instance_number=1,
    )
    data = (images / f"{truncated}.dcm").read_bytes()
    (images / f"{truncated}.dcm").write_bytes(data[: len(data) - SIZE * SIZE])
    for image_id in (garbage, truncated):
        truth[image_id] = [0] * 6
    for image_id, six in truth.items():
        rows += [(f"{image_id}_{label}", v) for label, v in zip(LABELS, six, strict=True)]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "stage_2_train.csv", index=False)
    # Inputs for predict: an MR slice (refused), garbage, and a good copy elsewhere.
    extra = tmp_path_factory.mktemp("inputs")
    write_ct_slice(
        extra / "ID_mr0000001.dcm", np.rint(_head_hu(rng, ()) + 1024).astype(np.int16), patient_id=CANARY_ID,
        study_uid=new_uid("mr"), series_uid=new_uid("mr1"), sop_uid=new_uid("mr2"), z=0.0, instance_number=1,
        extra={"Modality": "MR", "PatientName": CANARY_NAME},
    )
    (extra / "ID_copy00001.dcm").write_bytes(good)
    return {"root": root, "truth": truth, "skipped": sorted([garbage, truncated]), "extra": extra}


def _make_run(runs_dir: Path, stage: int, seed: int) -> Path:
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(seed)
    spec = ModelSpec(backbone="mobilenet_v3_small", stage=stage, input_size=32, hidden=(16,) if stage == 1 else (16, 8))
    model = build_model(spec, weights="none")
    writer = RunWriter.create(runs_dir, backbone=spec.backbone, stage=stage, config={"image_size": 48})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=SlicePrep(48), config={"seed": seed})
    writer.finish()
    return writer.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    runs_dir = tmp_path_factory.mktemp("runs")
    return {1: _make_run(runs_dir, 1, 0), 2: _make_run(runs_dir, 2, 1)}


def _reference(run_dir: Path, files: list[Path]) -> np.ndarray:
    from hemorrhage_core.inference import Predictor

    predictor = Predictor.from_checkpoint(run_dir / "checkpoints" / "best.pt")
    predictions = [predictor.predict(f).probabilities for f in files]
    return np.array([[probs[label] for label in LABELS] for probs in predictions])


def _call(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ evaluate
def _with_validation(run: Path, dest: Path, truth: dict) -> Path:
    """A copy of ``run`` with a validation predictions.csv (random probabilities) to calibrate on."""
    import shutil

    copy = Path(shutil.copytree(run, dest))
    rng = np.random.default_rng(0)
    rows = []
    for i, (image_id, six) in enumerate(sorted(truth.items())):
        row = {"image_id": image_id, "patient": f"h{i // 3}", "series": f"s{i // 3}", "z": float(i % 3)}
        row.update({f"true_{label}": v for label, v in zip(LABELS, six, strict=True)})
        row.update({f"prob_{label}": float(rng.uniform(0.05, 0.95)) for label in LABELS})
        rows.append(row)
    pd.DataFrame(rows).to_csv(copy / "predictions.csv", index=False)
    return copy


def test_evaluate_save_calibrate_writes_the_evaluation_it_prints(dataset, runs, capsys, tmp_path):
    from hemorrhage_core.calibration import Calibration
    from hemorrhage_core.evaluations import load_evaluation

    run = _with_validation(runs[2], tmp_path / "run", dataset["truth"])
    code, out, err = _call(capsys, "evaluate", "--run", str(run), "--data", str(dataset["root"]), "--json",
                           "--save", "external", "--calibrate", "--batch-size", "4", "--workers", "1")
    assert code == 0, err
    result = json.loads(out)
    saved = json.loads((run / "evaluations" / "external" / "metrics.json").read_text())
    assert saved == result
    calibration = Calibration.from_dict(json.loads((run / "calibration.json").read_text()))
    assert result["calibration"]["applied"] is True
    assert result["calibration"]["temperatures"] == calibration.temperatures
    assert set(result["calibration"]["before"]) == {"brier", "ece", "weighted_log_loss"}
    # The saved probabilities are the model's, calibrated with the stored temperatures.
    data = load_evaluation(run, "external")
    files = [dataset["root"] / "stage_2_train" / f"{i}.dcm" for i in data.predictions["image_id"]]
    raw = _reference(run, files)
    saved_probs = data.predictions[[f"prob_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(saved_probs, calibration.apply(raw), atol=1e-5)
    np.testing.assert_allclose(data.raw()[[f"prob_{label}" for label in LABELS]].to_numpy(), raw, atol=1e-5)
    for key in ("brier", "ece", "threshold", "sensitivity", "specificity", "ppv", "npv", "average_precision"):
        assert set(result[key]) == set(LABELS) and set(result["study"][key]) == set(LABELS)
    assert result["n_studies"] == data.predictions["series"].nunique()


def test_evaluate_split_test_refuses_a_run_without_a_test_set(dataset, runs, capsys):
    code, out, err = _call(capsys, "evaluate", "--run", str(runs[2]), "--data", str(dataset["root"]),
                           "--split", "test", "--workers", "1")
    assert code == 2 and out == "" and "held out no test set" in err


def test_evaluate_refuses_an_evaluation_name_that_is_not_a_folder_name(dataset, runs, capsys):
    code, _, err = _call(capsys, "evaluate", "--run", str(runs[2]), "--data", str(dataset["root"]),
                         "--save", "../../etc", "--workers", "1")
    assert code == 2 and "evaluation name" in err
    assert not (runs[2] / "evaluations").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_evaluate_json_matches_reference(stage, dataset, runs, capsys, tmp_path):
    import shutil

    run = Path(shutil.copytree(runs[stage], tmp_path / "run"))  # --save writes into the run
    code, out, err = _call(capsys, "evaluate", "--run", str(run), "--data", str(dataset["root"]),
                           "--json", "--batch-size", "4", "--workers", "1", "--save", "reference")
    assert code == 0, err
    result = json.loads(out)
    assert {"n_images", "skipped", "auc", "weighted_log_loss", "accuracy"} <= set(result)
    good = [i for i in dataset["truth"] if i not in dataset["skipped"]]
    assert result["n_images"] == len(good) == len(LESIONS)
    assert result["skipped"] == dataset["skipped"]
    y = np.array([dataset["truth"][i] for i in good])
    # Batches of 4 give the Predictor's one-at-a-time probabilities, each on its own slice, to float32
    # rounding (in float32 the batch changes the last bits, enough to reorder this untrained model's
    # near-equal outputs); the metrics are then checked on the probabilities evaluate scored.
    saved = pd.read_csv(run / "evaluations" / "reference" / "predictions.csv").set_index("image_id")
    p = saved.loc[good, [f"prob_{label}" for label in LABELS]].to_numpy(dtype=np.float64)
    one_by_one = _reference(run, [dataset["root"] / "stage_2_train" / f"{i}.dcm" for i in good])
    np.testing.assert_allclose(p, one_by_one, rtol=0, atol=1e-5)
    assert list(result["auc"]) == list(LABELS)
    assert result["auc"]["epidural"] is None  # no positives in this set
    for j, label in enumerate(LABELS[1:], start=1):
        assert result["auc"][label] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-9)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    losses = -(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean(axis=0)
    assert result["weighted_log_loss"] == pytest.approx(np.dot(LABEL_WEIGHTS, losses) / sum(LABEL_WEIGHTS), rel=1e-6)
    if stage == 1:
        classes = np.concatenate([1 - p[:, 5:6], p[:, :5]], axis=1).argmax(axis=1)
        target = np.array([0 if not row[:5].any() else (row[:5].argmax() + 1 if row[:5].sum() == 1 else -1) for row in y])
        keep = target >= 0
        assert result["accuracy"] == pytest.approx(np.mean(classes[keep] == target[keep]))
        assert result["accuracy_kind"] == "stage1"
    else:
        assert result["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    assert result["stage"] == stage and set(result["zsmoothed"]) == {"auc", "auc_mean", "weighted_log_loss"}
    assert CANARY_NAME not in out + err and CANARY_ID not in out + err


def test_evaluate_table_output(dataset, runs, capsys):
    code, out, _ = _call(capsys, "evaluate", "--run", str(runs[2]), "--data", str(dataset["root"]))
    assert code == 0
    assert "weighted log loss" in out and "ID_0000000fa" in out
    assert all(label in out for label in LABELS)


def test_the_along_z_line_says_what_each_number_counts():
    from training.evaluate_cmd import along_z_line

    z = {"label": "any", "n_series": 164, "rising": 163, "separated": 154, "auc_mean": 0.98712, "gap_mean": 0.87301}
    assert along_z_line(z) == (
        "along z (any): 163 of 164 series with and without blood rise on their bleed slices, 154 separate them; "
        "mean within-series AUC 0.987, mean gap 0.873 (bleed slices' mean any minus the others')")
    assert along_z_line({**z, "n_series": 0, "rising": 0, "separated": 0, "auc_mean": None, "gap_mean": None}) is None
    from training.evaluate_cmd import along_z_subtypes_line

    none = {"n_series": 0, "rising": 0, "separated": 0, "auc_mean": None, "gap_mean": None}
    by_type = {"epidural": {**z, "label": "epidural", "n_series": 40, "rising": 38, "auc_mean": 0.9312},
               "subdural": {**none, "label": "subdural"}}
    assert along_z_subtypes_line(by_type) == (
        "along z by subtype, series whose own type's slices score higher (mean within-series AUC): "
        "epidural 38 of 40 (AUC 0.931)")
    assert along_z_subtypes_line({"subdural": {**none, "label": "subdural"}}) is None


def test_evaluate_refuses_unusable_run_or_data(dataset, runs, tmp_path, capsys):
    code, out, err = _call(capsys, "evaluate", "--run", str(tmp_path), "--data", str(dataset["root"]), "--json")
    assert code == 2 and out == "" and "run.json" in err and "Traceback" not in err
    code, out, err = _call(capsys, "evaluate", "--run", str(runs[2]), "--data", str(tmp_path / "nowhere"), "--json")
    assert code == 2 and out == "" and "not found" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((runs[2] / "run.json").read_text())
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "best.pt").write_bytes(b"\x80\x04not a checkpoint")
    code, out, err = _call(capsys, "evaluate", "--run", str(broken), "--data", str(dataset["root"]))
    assert code == 2 and out == "" and "Traceback" not in err


# ------------------------------------------------------------------------------------------- predict
def test_predict_json_order_errors_and_exit_code(dataset, runs, capsys):
    root = dataset["root"] / "stage_2_train"
    inputs = [root / "ID_000000001.dcm", root / "ID_0000000fa.dcm", dataset["extra"] / "ID_mr0000001.dcm",
              root / "ID_000000004.dcm", dataset["root"] / "missing.dcm"]
    code, out, err = _call(capsys, "predict", "--run", str(runs[2]), *map(str, inputs), "--json")
    assert code == 2
    result = json.loads(out)
    assert [r["file"] for r in result] == list(map(str, inputs))
    assert all(set(r) >= {"file", "probabilities", "error"} for r in result)
    ok = [r for r in result if r["error"] is None]
    assert [r["file"] for r in ok] == [str(inputs[0]), str(inputs[3])]
    ref = _reference(runs[2], [inputs[0], inputs[3]])
    for row, expected in zip(ok, ref, strict=True):
        assert list(row["probabilities"]) == list(LABELS)
        assert [row["probabilities"][label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-6)
    for bad in (1, 2, 4):
        assert result[bad]["probabilities"] is None and result[bad]["error"]
    assert "MR" in result[2]["error"] and "CT" in result[2]["error"]
    assert "Traceback" not in err and CANARY_NAME not in out + err and CANARY_ID not in out + err


def test_predict_all_good_exits_zero_and_writes_submission(dataset, runs, tmp_path, capsys):
    root = dataset["root"] / "stage_2_train"
    files = [root / "ID_000000002.dcm", root / "ID_000000003.dcm"]
    out_csv = tmp_path / "submission.csv"
    code, out, err = _call(capsys, "predict", "--run", str(runs[1]), *map(str, files), "--submission", str(out_csv))
    assert code == 0, err
    sub = pd.read_csv(out_csv)
    assert list(sub.columns) == ["ID", "Label"]
    assert sub["ID"].tolist() == [f"{f.stem}_{label}" for f in files for label in LABELS]
    ref = _reference(runs[1], files)
    assert sub["Label"].to_numpy() == pytest.approx(ref.ravel(), abs=1e-9)
    assert "ID_000000002" in out  # the table names each file


def test_predict_expands_folders(dataset, runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = _call(capsys, "predict", "--run", str(runs[2]), str(dataset["extra"]), str(empty), "--json")
    result = json.loads(out)
    names = [Path(r["file"]).name for r in result]
    assert names == ["ID_copy00001.dcm", "ID_mr0000001.dcm", "empty"]
    assert result[0]["error"] is None and result[1]["error"] and "no .dcm" in result[2]["error"]
    assert code == 2
    sub = tmp_path / "s.csv"
    _call(capsys, "predict", "--run", str(runs[2]), str(dataset["extra"]), "--submission", str(sub))
    ids = pd.read_csv(sub)["ID"]
    # every requested image has its six rows, the refused MR slice with the fallback values
    assert ids.tolist() == [f"{stem}_{label}" for stem in ("ID_copy00001", "ID_mr0000001") for label in LABELS]
    assert all(math.isfinite(v) for v in pd.read_csv(sub)["Label"])


def test_predict_refuses_unusable_run(tmp_path, dataset, capsys):
    code, out, err = _call(capsys, "predict", "--run", str(tmp_path), str(dataset["extra"]), "--json")
    assert code == 2 and out == "" and "cannot use run" in err


# ------------------------------------------------------------------------- with a run made by `train`
@pytest.mark.slow
def test_commands_on_a_trained_run_agree_with_its_predictions_csv(dataset, tmp_path, capsys):
    """The trainer's validation probabilities (Dataset path) and predict's (Predictor path) agree."""
    code, out, err = _call(
        capsys, "train", "--data", str(dataset["root"]), "--backbone", "mobilenet_v3_small", "--stage", "1",
        "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--input-size", "32", "--weights", "none",
        "--val-fraction", "0.34", "--runs-dir", str(tmp_path), "--workers", "0", "--no-progress",
    )
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    val = pd.read_csv(run_dir / "predictions.csv")
    files = [dataset["root"] / "stage_2_train" / f"{i}.dcm" for i in val["image_id"]]
    code, out, err = _call(capsys, "predict", "--run", str(run_dir), *map(str, files), "--json")
    assert code == 0, err
    got = np.array([[row["probabilities"][label] for label in LABELS] for row in json.loads(out)])
    assert got == pytest.approx(val[[f"prob_{label}" for label in LABELS]].to_numpy(), abs=1e-4)
    code, out, err = _call(capsys, "evaluate", "--run", str(run_dir), "--data", str(dataset["root"]), "--json")
    assert code == 0, err
    assert json.loads(out)["n_images"] == len(LESIONS)
    leaked = [p for p in run_dir.rglob("*")
              if p.is_file() and any(marker.encode() in p.read_bytes() for marker in (CANARY_NAME, CANARY_ID))]
    assert leaked == []
