"""``predict_series`` with a 2.5D model: the whole series fetched first and predicted in one call, so no
slice loses its neighbours at a batch boundary; a 2D model still fetched and predicted a batch at a time.
An in-process client stands in for the PACS (``predict_series`` only calls ``fetch_instance``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import write_rsna_set
from train_fixtures import context_model

from hemorrhage_core.checkpoint import save_checkpoint
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.errors import PacsError, PacsUnavailableError
from hemorrhage_core.inference import NO_NEIGHBOURS_FLAG, Predictor
from hemorrhage_core.labels import LABELS
from hemorrhage_core.models import ModelSpec
from hemorrhage_core.pacs.series import CT_IMAGE_STORAGE, InstanceRef, SeriesAssessment, predict_series
from hemorrhage_core.preprocess import SlicePrep

SIZE = 48
MISSING = "1.2.3.404"


class FakeClient:
    """Serves instances from memory; ``MISSING`` is refused as a server refuses an absent instance."""

    url = "http://pacs.invalid"

    def __init__(self, instances: dict[str, bytes], unavailable: bool = False) -> None:
        self.instances, self.unavailable = instances, unavailable
        self.fetched: list[str] = []

    def fetch_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        if self.unavailable:
            raise PacsUnavailableError("the server went away")
        self.fetched.append(sop_uid)
        if sop_uid not in self.instances:
            raise PacsError(f"instance {sop_uid} was not found")
        return self.instances[sop_uid]


class Recording:
    """The real Predictor, recording the size of each ``predict_many`` call and when it came."""

    def __init__(self, predictor: Predictor, client: FakeClient) -> None:
        self.predictor, self.client = predictor, client
        self.context, self.batch_size = predictor.context, predictor.batch_size
        self.calls: list[tuple[int, int]] = []  # (slices in the call, instances fetched by then)

    def predict_many(self, sources, *, batch_size=None):
        sources = list(sources)
        self.calls.append((len(sources), len(self.client.fetched)))
        return self.predictor.predict_many(sources, batch_size=batch_size)


def _predictor(folder: Path, context: int) -> Predictor:
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", 2, input_size=SIZE, hidden=(16, 8, 8), context=context)
    path = save_checkpoint(folder / "m.pt", context_model(spec), prep=SlicePrep(SIZE, context=context))
    return Predictor.from_checkpoint(path, batch_size=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One series of five slices (bytes by SOP UID) and its assessment, one absent instance among them."""
    root = tmp_path_factory.mktemp("series")
    write_rsna_set(root, n_patients=1, slices_per_patient=5, size=40)
    paths = sorted((root / "stage_2_train").glob("*.dcm"))
    data = {p.stem: p.read_bytes() for p in paths}  # the file's stem stands for its SOP Instance UID
    slices = {p.stem: read_slice(p) for p in paths}
    refs = sorted((InstanceRef(uid, CT_IMAGE_STORAGE, s.meta.z, None) for uid, s in slices.items()),
                  key=lambda r: r.z)
    refs.insert(2, InstanceRef(MISSING, CT_IMAGE_STORAGE, None, None))
    meta = next(iter(slices.values())).meta
    series = SeriesAssessment(meta.study_uid, meta.series_uid, "CT", None, None, tuple(refs), None)
    return series, data


def test_a_2_5d_model_sees_the_whole_series_in_one_call(tmp_path, study):
    series, data = study
    client = FakeClient(data)
    predictor = Recording(_predictor(tmp_path, context=1), client)
    seen: list[tuple[int, int]] = []
    result = predict_series(client, predictor, series, batch_size=2, progress=lambda *a: seen.append(a))

    assert predictor.calls == [(5, 6)]  # one call, after all six instances were asked for
    assert seen == [(6, 6)]
    assert [s.sop_instance_uid for s in result.slices] == [r.sop_instance_uid for r in series.instances]
    missing = result.slices[2]
    assert missing.probabilities is None and missing.error == f"instance {MISSING} was not found"
    predicted = [s for s in result.slices if s.error is None]
    # Batches of two would have left the fifth slice alone in its batch, read without neighbours.
    assert not any(w.startswith("no_neighbours") for s in predicted for w in s.warnings)
    ordered = [data[r.sop_instance_uid] for r in series.instances if r.sop_instance_uid != MISSING]
    expected = predictor.predictor.predict_many(ordered, batch_size=2)
    for got, want in zip(predicted, expected, strict=True):
        assert NO_NEIGHBOURS_FLAG not in want.flags
        assert got.probabilities == pytest.approx({k: float(want.probabilities[k]) for k in LABELS}, abs=1e-6)


def test_a_2d_model_is_still_fetched_and_predicted_a_batch_at_a_time(tmp_path, study):
    series, data = study
    client = FakeClient(data)
    predictor = Recording(_predictor(tmp_path, context=0), client)
    seen: list[tuple[int, int]] = []
    result = predict_series(client, predictor, series, batch_size=2, progress=lambda *a: seen.append(a))

    # Instances 1-2, 3 (4 is absent) and 5-6: each batch predicted as soon as it is fetched.
    assert predictor.calls == [(2, 2), (1, 4), (2, 6)]
    assert seen == [(2, 6), (4, 6), (6, 6)]
    assert result.slices[2].error == f"instance {MISSING} was not found"
    for ref, got in zip(series.instances, result.slices, strict=True):
        if ref.sop_instance_uid == MISSING:
            continue
        want = predictor.predictor.predict(data[ref.sop_instance_uid])
        assert got.probabilities == pytest.approx({k: float(want.probabilities[k]) for k in LABELS}, abs=1e-5)
        assert not any(w.startswith("no_neighbours") for w in got.warnings)


def test_a_server_going_away_stops_a_2_5d_series_before_any_prediction(tmp_path, study):
    series, data = study
    client = FakeClient(data, unavailable=True)
    predictor = Recording(_predictor(tmp_path, context=1), client)
    with pytest.raises(PacsUnavailableError, match="went away"):
        predict_series(client, predictor, series)
    assert predictor.calls == []
