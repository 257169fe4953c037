"""The Predict panel with a 2.5D model: uploads read with their uploaded neighbours, the note on slices read
without them, the whole-series help; a 2D model's uploads predicted exactly as ``predict`` does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_rsna_set
from htmltools import TagList
from train_fixtures import context_model

from hemorrhage_core.checkpoint import save_checkpoint
from hemorrhage_core.dashboard.predict_panel import (
    PredictBatch,
    batch_notices,
    context_help,
    context_notice,
    run_context,
    slice_label,
)
from hemorrhage_core.dashboard.predictors import (
    NO_NEIGHBOURS,
    PredictorCache,
    Upload,
    UploadResult,
    analyse_uploads,
)
from hemorrhage_core.dashboard.safety import GENERIC_ERROR
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.inference import NO_NEIGHBOURS_FLAG, Predictor
from hemorrhage_core.labels import LABELS
from hemorrhage_core.models import ModelSpec
from hemorrhage_core.preprocess import SlicePrep
from hemorrhage_core.runs import RunSummary

SIZE = 48
GARBAGE = Upload("garbage.dcm", b"\x00not a dicom file" * 10)


def _predictor(folder: Path, context: int) -> Predictor:
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", 2, input_size=SIZE, hidden=(16, 8, 8), context=context)
    path = save_checkpoint(folder / "best.pt", context_model(spec), prep=SlicePrep(SIZE, context=context))
    return PredictorCache().get(f"context-{context}", path)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return _predictor(tmp_path_factory.mktemp("ckpt25d"), context=1)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[list[Path]]:
    """Two series of four slices each, every series' files in z order."""
    root = tmp_path_factory.mktemp("rsna")
    write_rsna_set(root, n_patients=2, slices_per_patient=4, size=40)
    by_series: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted((root / "stage_2_train").glob("*.dcm")):
        meta = read_slice(path).meta
        by_series.setdefault(meta.series_uid, []).append((meta.z, path))
    return [[p for _, p in sorted(files)] for files in by_series.values()]


def _uploads(paths: list[Path]) -> list[Upload]:
    return [Upload(p.name, p.read_bytes()) for p in paths]


def test_the_no_neighbours_code_is_the_predictors_flag():
    assert NO_NEIGHBOURS_FLAG.startswith(NO_NEIGHBOURS)
    result = UploadResult(index=0, name="a.dcm", flags=["no_bone: x", NO_NEIGHBOURS_FLAG])
    assert result.without_neighbours and result.input_flags == ["no_bone: x"]


def test_whole_series_are_read_with_their_neighbours_and_a_broken_file_is_its_message(predictor, series):
    files = [p for group in series for p in group]
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)  # upload order is not z order
    uploads = _uploads(shuffled)
    uploads.insert(3, GARBAGE)
    seen: list[tuple[int, int]] = []
    results = analyse_uploads(predictor, uploads, "any", progress=lambda done, total: seen.append((done, total)))

    assert [r.name for r in results if not r.ok] == ["garbage.dcm"]
    assert results[-1].error and "Traceback" not in results[-1].error
    usable = [r for r in results if r.ok]
    assert len(usable) == len(files)
    assert not any(r.without_neighbours for r in usable)
    reference = dict(zip((p.name for p in files), predictor.predict_many(files), strict=True))
    for r in usable:
        assert NO_NEIGHBOURS_FLAG not in reference[r.name].flags
        assert r.raw_probabilities == pytest.approx(reference[r.name].raw_probabilities, abs=1e-5)
        assert r.image.shape == (3, SIZE, SIZE)  # the centre slice, for display
        assert r.heatmap is not None
    # Alone, a slice reads differently: the series' neighbours were used.
    alone = predictor.predict(str(files[1]))
    assert alone.raw_probabilities != pytest.approx(reference[files[1].name].raw_probabilities, abs=1e-5)
    # progress: the garbage file as it failed to decode, then slice by slice
    assert seen == [(k, 9) for k in range(1, 10)]  # the garbage file first, then slice by slice
    batch = PredictBatch("run", results, context=1)
    assert context_notice(batch, usable[0]) is None
    assert "read without neighbours" not in TagList(*batch_notices(batch, usable[0])).get_html_string()


def test_a_slice_uploaded_alone_is_flagged_and_the_panel_says_so(predictor, series):
    lone, whole = series[0][2], series[1]
    results = analyse_uploads(predictor, _uploads([lone, *whole]), "any")
    by_name = {r.name: r for r in results}
    assert all(r.ok for r in results)
    flagged = by_name[lone.name]
    assert flagged.without_neighbours and NO_NEIGHBOURS_FLAG in flagged.flags
    assert NO_NEIGHBOURS_FLAG not in flagged.input_flags  # not a "not like a head CT" flag
    assert flagged.raw_probabilities == pytest.approx(predictor.predict(str(lone)).raw_probabilities, abs=1e-6)
    assert not any(by_name[p.name].without_neighbours for p in whole)

    batch = PredictBatch("run", results, context=1)
    html = TagList(*batch_notices(batch, flagged)).get_html_string()
    assert "reads each slice with its 1 neighbour on each side in the series" in html
    assert "upload the whole series (all its slices) for its full reading" in html
    assert f"the slice shown ({lone.name})" in html
    assert "does not look like a head CT slice, check it before trusting the prediction. no_neighbours" not in html
    other = by_name[whole[0].name]
    html = TagList(*batch_notices(batch, other)).get_html_string()
    assert "1 slice(s), not the one shown" in html
    assert slice_label(0, 5, flagged).endswith(" · read without neighbours")
    assert "read without neighbours" not in slice_label(1, 5, other)
    # A 2D model's batch never carries the note, whatever its flags.
    assert context_notice(PredictBatch("run", results, context=0), flagged) is None


def test_the_upload_help_asks_for_the_whole_series_only_for_a_2_5d_run(tmp_path):
    def summary(config):
        return RunSummary(id="r", path=tmp_path, status="finished", config=config)

    assert run_context(summary({"context": 2})) == 2
    assert run_context(summary({"context": 0})) == 0
    assert run_context(summary({})) == 0  # a run from before 2.5D
    assert run_context(summary({"context": True})) == 0
    assert run_context(None) == 0
    assert context_help(0) is None
    assert context_help(2) == (
        "This model reads each slice with its 2 neighbours on each side in the series: "
        "upload the whole series (all its slices)."
    )


def test_a_series_whose_call_breaks_is_predicted_slice_by_slice(predictor, series):
    files = series[0]

    class BreaksOnTheSeries:
        """The real Predictor, except that a call with several slices fails unexpectedly."""

        context = predictor.context

        def predict_slices(self, slices, *, saliency_label=None, progress=None):
            if len(slices) > 1:
                raise RuntimeError("out of memory")
            return predictor.predict_slices(slices, saliency_label=saliency_label, progress=progress)

    results = analyse_uploads(BreaksOnTheSeries(), _uploads(files), None)
    assert all(r.ok for r in results) and all(r.without_neighbours for r in results)
    for r, path in zip(results, files, strict=True):
        assert r.raw_probabilities == pytest.approx(predictor.predict(str(path)).raw_probabilities, abs=1e-6)

    class Refuses:
        context = 1

        def predict_slices(self, slices, *, saliency_label=None, progress=None):
            raise RuntimeError("broken model")

    results = analyse_uploads(Refuses(), [*_uploads(files[:2]), GARBAGE], None)  # never raises
    assert [r.error for r in results[:2]] == [GENERIC_ERROR] * 2
    assert results[2].name == "garbage.dcm" and results[2].error not in (None, GENERIC_ERROR)


def test_a_2d_model_predicts_each_upload_as_predict_does(tmp_path, series):
    predictor2d = _predictor(tmp_path, context=0)
    files = series[0]
    seen: list[tuple[int, int]] = []
    results = analyse_uploads(predictor2d, [*_uploads(files), GARBAGE], "any", progress=lambda *a: seen.append(a))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # the garbage file first, then slice by slice
    assert results[-1].name == "garbage.dcm" and not results[-1].ok
    for r, path in zip(results[:-1], files, strict=True):
        expected = predictor2d.predict(read_slice(path.read_bytes(), image_id="x"), saliency_label="any")
        assert r.raw_probabilities == {k: float(v) for k, v in expected.raw_probabilities.items()}
        assert np.array_equal(r.heatmap, expected.heatmap)
        assert not r.without_neighbours
        assert list(r.probabilities) == list(LABELS)
