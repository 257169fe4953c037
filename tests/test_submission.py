"""``predict --submission`` at scale: a folder in, six Kaggle rows per requested image in order, fallback
rows and a side file for what cannot be read, z-smoothing equal to evaluate's, an atomic file, and the
same bytes with a reading pool as without. Small synthetic data on CPU; nothing is timed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hemorrhage_core.labels import LABELS
from hemorrhage_core.submission import (
    RSNA_PREVALENCE,
    SubmissionWriter,
    failed_path,
    fallback_probabilities,
)
from training import cli, prediction

BAD = "ID_badbadbad"  # not a DICOM file at all


def _make_run(runs_dir: Path, files: list[Path]) -> Path:
    """A run with an untrained model whose batch-norm statistics come from ``files``: with the default
    statistics its activations vanish and every slice gets the same probabilities, which no smoothing
    could change."""
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.inference import Predictor
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep, to_tensor
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    model = build_model(ModelSpec("mobilenet_v3_small", 2, input_size=32, hidden=(16, 8)), weights="none")
    prep = SlicePrep(48)
    images = to_tensor(np.stack([Predictor(model, {"prep": prep}).prepare(f).image for f in files]))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the one batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    writer = RunWriter.create(runs_dir, backbone="mobilenet_v3_small", stage=2, config={"image_size": 48})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=prep)
    writer.finish()
    return writer.path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """Synthetic series spread over nested folders (plus one garbage file), and a tiny untrained run."""
    from hemorrhage_core.synthetic import write_dataset

    root = tmp_path_factory.mktemp("submission")
    write_dataset(root / "synth", patients=3, slices_per_patient=4, size=64, seed=0, workers=1, progress=False)
    files = sorted((root / "synth" / "stage_2_train").glob("*.dcm"))
    inputs = root / "inputs"
    for i, f in enumerate(files):  # half at the top, half two levels down: the folder is searched recursively
        dest = inputs / ("a/b" if i % 2 else "") / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    bad = root / "with_bad"
    shutil.copytree(inputs, bad)
    (bad / f"{BAD}.dcm").write_bytes(b"this is not a DICOM file" * 10)
    return SimpleNamespace(root=root, inputs=inputs, bad=bad, run=_make_run(root / "runs", files))


def _call(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"), key=str)


def _read(sub: Path) -> pd.DataFrame:
    return pd.read_csv(sub, dtype={"ID": str, "Label": float})


def _matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame["Label"].to_numpy().reshape(-1, len(LABELS))


def test_a_folder_gives_six_rows_per_image_in_order(setup, tmp_path, capsys):
    from hemorrhage_core.inference import Predictor

    sub = tmp_path / "submission.csv"
    code, out, err = _call(capsys, "predict", "--run", str(setup.run), str(setup.inputs), "--submission", str(sub))
    assert code == 0, err
    files = _files(setup.inputs)
    assert len(files) == 12 and any(f.parent != setup.inputs for f in files)
    frame = _read(sub)
    assert list(frame.columns) == ["ID", "Label"]
    assert frame["ID"].tolist() == [f"{f.stem}_{label}" for f in files for label in LABELS]
    predictor = Predictor.from_checkpoint(setup.run / "checkpoints" / "best.pt")
    expected = [[predictor.predict(f).probabilities[label] for label in LABELS] for f in files]
    np.testing.assert_allclose(_matrix(frame), expected, atol=1e-6)
    assert failed_path(sub).read_text() == "image_id,file,reason\n"  # nothing failed, and it says so
    assert all(f.name in out for f in files)
    assert "failed" not in err


def test_a_corrupt_file_gets_fallback_rows_a_side_file_line_and_exit_2(setup, tmp_path, capsys):
    sub = tmp_path / "out" / "sub.csv"
    missing = tmp_path / "ID_0000absent.dcm"
    code, out, err = _call(capsys, "predict", "--run", str(setup.run), str(setup.bad), str(missing),
                           "--submission", str(sub))
    assert code == 2
    frame = _read(sub)
    stems = [f.stem for f in _files(setup.bad)] + [missing.stem]
    assert frame["ID"].tolist() == [f"{s}_{label}" for s in stems for label in LABELS]
    values = dict(zip(frame["ID"], frame["Label"], strict=True))
    # the run has no validation predictions: RSNA's training prevalence, exactly
    for stem in (BAD, missing.stem):
        assert [values[f"{stem}_{label}"] for label in LABELS] == [RSNA_PREVALENCE[label] for label in LABELS]
    side = pd.read_csv(failed_path(sub), dtype=str)
    assert list(side.columns) == ["image_id", "file", "reason"]
    assert side["image_id"].tolist() == [BAD, missing.stem]
    assert side["file"].tolist() == [str(setup.bad / f"{BAD}.dcm"), str(missing)]
    assert side["reason"].str.len().min() > 0 and (side["reason"].iloc[1] == "no such file")
    assert f"failed: {setup.bad / f'{BAD}.dcm'}: " in err and f"failed: {missing}: no such file" in err
    assert "2 of 14 inputs could not be predicted" in err and str(failed_path(sub)) in err
    assert "Traceback" not in err


def test_the_fallback_is_the_runs_validation_prevalence_clipped_away_from_zero():
    frame = pd.DataFrame({f"true_{label}": [0, 1, 1, 0] for label in LABELS})
    frame["true_epidural"] = 0
    values, source = fallback_probabilities(frame)
    assert values["any"] == 0.5 and values["epidural"] == 1e-3
    assert "4 validation images" in source
    assert fallback_probabilities(None) == (RSNA_PREVALENCE, "RSNA 2019 stage-2 training prevalence")
    assert fallback_probabilities(frame.iloc[:0])[0] == RSNA_PREVALENCE


def test_smoothing_equals_evaluates_zsmooth_on_the_same_series(setup, tmp_path, capsys):
    from hemorrhage_core.inference import Predictor
    from hemorrhage_core.metrics import zsmooth

    plain, smooth = tmp_path / "plain.csv", tmp_path / "smooth.csv"
    for out, extra in ((plain, ()), (smooth, ("--smooth",))):
        code, _, err = _call(capsys, "predict", "--run", str(setup.run), str(setup.bad), "--submission", str(out),
                             *extra)
        assert code == 2, err
    raw, smoothed = _matrix(_read(plain)), _matrix(_read(smooth))
    assert _read(plain)["ID"].tolist() == _read(smooth)["ID"].tolist()
    files = _files(setup.bad)
    good = [i for i, f in enumerate(files) if f.stem != BAD]
    predictor = Predictor.from_checkpoint(setup.run / "checkpoints" / "best.pt")
    meta = [predictor.prepare(files[i]).meta for i in good]
    series = [f"{m['study_uid']}/{m['series_uid']}" for m in meta]
    assert len(set(series)) == 3  # three patients, one series each, four slices each
    expected = zsmooth(raw[good], series, [m["z"] for m in meta])
    np.testing.assert_allclose(smoothed[good], expected, rtol=0, atol=1e-15)
    assert np.abs(smoothed[good] - raw[good]).max() > 1e-6  # it did smooth something
    bad = [i for i, f in enumerate(files) if f.stem == BAD]
    np.testing.assert_array_equal(smoothed[bad], raw[bad])  # the fallback rows stay as they are


def test_an_interrupted_submission_leaves_the_previous_file_and_no_temporary_one(setup, tmp_path, capsys,
                                                                               monkeypatch):
    from hemorrhage_core.inference import Predictor

    sub = tmp_path / "sub.csv"
    sub.write_text("the previous submission\n")
    calls = []
    original = Predictor.predict_many

    def interrupted_on_the_third_chunk(self, sources, **kwargs):
        calls.append(len(sources))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, sources, **kwargs)

    monkeypatch.setattr(prediction, "CHUNK_IMAGES", 4)
    monkeypatch.setattr(Predictor, "predict_many", interrupted_on_the_third_chunk)
    code, _, err = _call(capsys, "predict", "--run", str(setup.run), str(setup.inputs), "--submission", str(sub))
    assert code == 130 and err.strip().endswith("interrupted")
    assert calls == [4, 4, 4]  # two chunks were written to the temporary file before the interruption
    assert sub.read_text() == "the previous submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]  # no side file, no temporary file


def test_a_failure_while_smoothing_writes_neither_file(tmp_path, monkeypatch):
    import hemorrhage_core.metrics as metrics

    def broken(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(metrics, "zsmooth", broken)
    with pytest.raises(MemoryError), SubmissionWriter(tmp_path / "s.csv", RSNA_PREVALENCE, smooth=True) as writer:
        writer.add("ID_1", [0.5] * 6, series="a", z=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [(), ("--smooth",)])
def test_two_reading_workers_give_the_same_bytes_as_one(setup, tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setattr(prediction, "CHUNK_IMAGES", 5)  # chunk and batch boundaries inside the set
    outputs = []
    for workers in ("1", "2"):
        sub = tmp_path / f"w{workers}.csv"
        code, out, _ = _call(capsys, "predict", "--run", str(setup.run), str(setup.bad), "--json", "--batch-size", "3",
                             "--workers", workers, "--submission", str(sub), *extra)
        assert code == 2
        outputs.append((out, sub.read_bytes(), failed_path(sub).read_bytes()))
    assert outputs[0] == outputs[1]
    rows = json.loads(outputs[0][0])
    assert len(rows) == 13 and sum(r["error"] is not None for r in rows) == 1


def test_the_writer_keeps_the_first_of_a_repeated_id_and_lists_an_empty_folder_without_rows(tmp_path):
    with SubmissionWriter(tmp_path / "s.csv", RSNA_PREVALENCE) as writer:
        assert writer.add("ID_1", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        assert not writer.add("ID_1", [0.9] * 6)
        assert not writer.add_failed("scans/empty", "folder holds no .dcm or .dicom files", None)
    frame = _read(tmp_path / "s.csv")
    assert frame["Label"].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and writer.n_duplicates == 1
    side = pd.read_csv(tmp_path / "s.failed.csv", dtype=str, keep_default_na=False)
    assert side.values.tolist() == [["", "scans/empty", "folder holds no .dcm or .dicom files"]]


def test_json_written_row_by_row_equals_json_dumps(capsys):
    from training.predict_cmd import _JsonList
    from training.prediction import PredictionRow

    rows = [PredictionRow("a.dcm", dict.fromkeys(LABELS, 0.25), None, ("odd",), dict.fromkeys(LABELS, 0.5)),
            PredictionRow("b.dcm", None, "not CT")]
    for items in (rows, []):
        printer = _JsonList(sys.stdout)
        for row in items:
            printer.add(row)
        printer.close()
        assert capsys.readouterr().out == json.dumps([r.to_dict() for r in items], indent=2) + "\n"
