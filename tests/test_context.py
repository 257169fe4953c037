"""2.5D input (SlicePrep.context): neighbour stacks in preprocessing, the Dataset, the model, checkpoints,
the Predictor, predict_rows and training."""

from __future__ import annotations

import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import write_rsna_set
from train_fixtures import context_model, tiny_config, write_tiny_set

from hemorrhage_core.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from hemorrhage_core.data import SliceCache, SliceDataset, build_index
from hemorrhage_core.data.neighbours import context_ids
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.errors import CheckpointError
from hemorrhage_core.inference import NO_NEIGHBOURS_FLAG, Predictor
from hemorrhage_core.models import ModelSpec, build_model, get_backbone, stage2_from_stage1
from hemorrhage_core.models.backbones import build_trunk, widen_input
from hemorrhage_core.preprocess import SlicePrep, centre_channels, context_positions, stack_context, to_tensor
from training.config import ConfigError, TrainConfig
from training.prediction import predict_rows, series_chunks

SIZE = 48


# ------------------------------------------------------------------------------ preprocessing
def test_context_positions_repeat_the_series_ends():
    assert context_positions(4, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert context_positions(3, 2).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    assert context_positions(1, 1).tolist() == [[0, 0, 0]]
    assert context_positions(0, 1).shape == (0, 3)


def test_stack_and_centre_channels():
    slices = [np.full((3, 4, 4), v, dtype=np.uint8) for v in (1, 2, 3)]
    stack = stack_context(slices)
    assert stack.shape == (9, 4, 4)
    assert stack[:, 0, 0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert centre_channels(stack, 3)[:, 0, 0].tolist() == [2, 2, 2]
    assert centre_channels(torch.from_numpy(stack)[None], 3).shape == (1, 3, 4, 4)
    assert centre_channels(slices[0], 3) is slices[0]
    with pytest.raises(ValueError, match="odd number"):
        centre_channels(np.zeros((6, 4, 4)), 3)


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True, "1"])
def test_slice_prep_refuses_a_bad_context(bad):
    with pytest.raises((ValueError, TypeError)):
        SlicePrep(64, context=bad)


def test_slice_prep_context_travels_but_does_not_key_the_cache():
    prep = SlicePrep(64, head_crop=True, context=2)
    assert (prep.slices, prep.channels, prep.input_channels) == (5, 3, 15)
    assert prep.key() == SlicePrep(64, head_crop=True).key()  # one cache serves every context
    assert SlicePrep.from_dict(prep.to_dict()) == prep
    old = {k: v for k, v in prep.to_dict().items() if k != "context"}  # a checkpoint from before 2.5D
    assert SlicePrep.from_dict(old).context == 0
    assert prep.per_slice() == SlicePrep(64, head_crop=True)


def test_context_ids_follow_slice_rank_within_each_series():
    rows = pd.DataFrame({
        "image_id": ["a2", "a0", "a1", "b0", "b1", "c0"],
        "series_uid": ["A", "A", "A", "B", "B", None],
        "slice_rank": [2, 0, 1, 0, 1, 0],
    })
    ids = context_ids(rows, 1)
    assert ids["a0"] == ("a0", "a0", "a1")
    assert ids["a1"] == ("a0", "a1", "a2")
    assert ids["a2"] == ("a1", "a2", "a2")
    assert ids["b0"] == ("b0", "b0", "b1")  # never a slice of another series
    assert ids["c0"] == ("c0", "c0", "c0")  # no series: stands alone
    assert context_ids(rows, 0)["a1"] == ("a1",)
    without = context_ids(rows.drop(columns=["slice_rank"]), 1)
    assert without["a1"] == ("a1", "a1", "a1")


# ------------------------------------------------------------------------------ model
@pytest.mark.parametrize("backbone", ["resnet18", "vgg16_bn", "inception_v3"])
def test_widened_trunk_starts_as_the_original_whatever_the_neighbours(backbone):
    torch.manual_seed(0)
    trunk, _ = build_trunk(get_backbone(backbone))
    wide = copy.deepcopy(trunk)
    widen_input(wide, 3)
    trunk.eval().double()
    wide.eval().double()
    x = torch.rand(2, 3, 80, 80, dtype=torch.float64)
    neighbours = torch.rand(2, 3, 80, 80, dtype=torch.float64)
    expected, got = trunk(x), wide(torch.cat([neighbours, x, 1.0 - neighbours], dim=1))
    # The neighbours' kernels start at zero: equal up to float64 summation order.
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * max(expected.abs().max().item(), 1.0))


def test_a_context_model_takes_the_stack_and_shows_its_centre_slice():
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", 1, input_size=SIZE, context=1)).eval()
    assert model.in_channels == 9
    assert model.normalise.mean.numel() == 9
    x = torch.rand(2, 9, SIZE, SIZE)
    out = model.forward_extras(x)
    assert out.logits.shape == (2, 6)
    aligned, _ = model.align(x)
    assert torch.equal(out.aligned, aligned[:, 3:6])  # the centre slice of the aligned stack
    model2 = stage2_from_stage1(model)
    assert model2.spec.context == 1 and model2.in_channels == 9
    assert torch.equal(model2.backbone.body[0].weight, model.backbone.body[0].weight)


def test_checkpoint_keeps_the_context_and_refuses_a_mismatch(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", 2, input_size=SIZE, context=1)).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, prep=SlicePrep(SIZE, context=1))
    ckpt = load_checkpoint(path)
    assert ckpt.prep.context == 1 and ckpt.spec.context == 1
    loaded, _ = model_from_checkpoint(path)
    x = torch.rand(1, 9, SIZE, SIZE)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="neighbours"):
        save_checkpoint(tmp_path / "bad.pt", model, prep=SlicePrep(SIZE))


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    write_rsna_set(root, n_patients=3, slices_per_patient=4, size=40)  # z runs backwards to the file order
    return root, build_index(root, progress=False).table


def test_dataset_stacks_neighbours_in_z_order_cached_and_uncached(rsna, tmp_path):
    root, table = rsna
    prep = SlicePrep(SIZE, context=1)
    cache = SliceCache.build(table, root, prep=prep, cache_dir=tmp_path, progress=False, workers=1)
    assert cache.prep.context == 0  # entries are single slices
    cached = SliceDataset(table, root, stage=2, prep=prep, cache=cache)
    plain = SliceDataset(table, root, stage=2, prep=prep)
    by_id = {r.image_id: r for r in table.itertuples()}
    for i in range(len(plain)):
        image_id = str(plain.image_ids[i])
        stack = plain.prepared(i)
        assert stack.shape == (9, SIZE, SIZE)
        assert np.array_equal(stack, cached.prepared(list(cached.image_ids).index(image_id)))
        row = by_id[image_id]
        series = table[table["series_uid"] == row.series_uid].sort_values("slice_rank")
        ranks = np.clip(np.array([row.slice_rank - 1, row.slice_rank, row.slice_rank + 1]), 0, len(series) - 1)
        want = [SlicePrep(SIZE)(read_slice(root / series.iloc[r]["path"]).hu) for r in ranks]
        assert np.array_equal(stack, stack_context(want))


def test_stage1_keeps_dropped_slices_as_neighbours(rsna):
    root, table = rsna
    ds = SliceDataset(table, root, stage=1, prep=SlicePrep(SIZE, context=1))
    dropped = set(table["image_id"]) - set(ds.image_ids)  # slices with two subtypes
    assert dropped
    assert any(set(stack) & dropped for stack in ds.context_ids)


# ------------------------------------------------------------------------------ Predictor
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model = context_model(ModelSpec("resnet18", 2, input_size=SIZE, hidden=(16, 8, 8), context=1))
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", model, prep=SlicePrep(SIZE, context=1))
    return Predictor.from_checkpoint(path, batch_size=3)


def test_predictor_reads_a_series_as_the_dataset_does(predictor, rsna):
    root, table = rsna
    files = [str(root / p) for p in table["path"]]
    results = predictor.predict_many(files)
    ds = SliceDataset(table, root, stage=2, prep=predictor.prep)
    with torch.inference_mode():
        expected = torch.sigmoid(predictor.model(torch.stack([to_tensor(ds.prepared(i)) for i in range(len(ds))])))
    for i, result in enumerate(results):
        assert NO_NEIGHBOURS_FLAG not in result.flags
        assert result.image.shape == (3, SIZE, SIZE)  # the slice itself, for display
        got = list(result.raw_probabilities.values())
        assert np.allclose(got, expected[i].numpy(), atol=2e-2)  # bf16 on CPUs that have it


def test_one_slice_is_flagged_and_its_neighbours_can_be_given(predictor, rsna):
    root, table = rsna
    series = table[table["series_uid"] == table["series_uid"].iloc[0]].sort_values("slice_rank")
    files = [str(root / p) for p in series["path"]]
    alone = predictor.predict(files[1])
    assert NO_NEIGHBOURS_FLAG in alone.flags
    with_neighbours = predictor.predict(files[1], neighbours=[files[0], files[2], files[3]])
    assert NO_NEIGHBOURS_FLAG not in with_neighbours.flags
    in_series = predictor.predict_slices(files)[1]
    assert with_neighbours.raw_probabilities == in_series.raw_probabilities
    assert with_neighbours.raw_probabilities != alone.raw_probabilities


def test_predict_rows_keeps_input_order_and_whole_series(predictor, rsna):
    root, table = rsna
    files = [str(root / p) for p in table["path"]]
    random.Random(0).shuffle(files)
    entries = [(f, None) for f in files] + [("missing.dcm", "no such file")]
    rows = list(predict_rows(predictor, entries))
    assert [r.file for r in rows] == [f for f, _ in entries]
    assert rows[-1].error == "no such file"
    reference = {f: p.raw_probabilities for f, p in zip(files, predictor.predict_many(files), strict=True)}
    for row in rows[:-1]:
        assert row.raw_probabilities == pytest.approx(reference[row.file], abs=1e-6)
        assert not any(flag.startswith("no_neighbours") for flag in row.flags)
    chunks = series_chunks(entries[:-1], chunk_images=2)
    series_of = dict(zip((str(root / p) for p in table["path"]), table["series_uid"], strict=True))
    for chunk in chunks:
        assert len(chunk) == 4 and len({series_of[files[k]] for k in chunk}) == 1  # whole series, no more


# ------------------------------------------------------------------------------ training
def test_config_refuses_a_bad_context():
    with pytest.raises(ConfigError, match="context"):
        TrainConfig(context=5)
    with pytest.raises(ConfigError, match="context"):
        TrainConfig(context=True)


def test_a_context_run_trains_and_stage2_follows_it(tmp_path):
    from training.trainer import fit

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=6, slices_per_patient=4)
    stage1 = fit(tiny_config(data, tmp_path / "runs", context=1))
    stage2 = fit(tiny_config(data, tmp_path / "runs", stage=2, init_from=str(stage1), input_size=None))
    ckpt = load_checkpoint(next((stage2).glob("checkpoints/best*.pt")))
    assert ckpt.prep.context == 1 and ckpt.spec.context == 1
    assert ckpt.config["context"] == 1
