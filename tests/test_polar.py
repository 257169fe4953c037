"""Polar input (``polar: true``, ``polar_overlap``): the config, a run and its stage 2, the Predictor and the dashboard's note."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train_fixtures import tiny_config, write_tiny_set

from hemorrhage_core.checkpoint import load_checkpoint
from hemorrhage_core.dashboard.common import (
    polar_caption,
    run_is_polar,
    run_polar_fold,
    run_polar_midline,
    run_polar_overlap,
    run_polar_seam,
    run_polar_trace,
)
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.inference import Predictor
from hemorrhage_core.preprocess import find_skull_ring
from hemorrhage_core.runs import RunSummary
from training.config import ConfigError, TrainConfig


def test_config_refuses_a_polar_that_is_not_a_boolean():
    with pytest.raises(ConfigError, match="polar"):
        TrainConfig(polar="yes")
    with pytest.raises(ConfigError, match="polar"):
        TrainConfig(polar=1)
    assert TrainConfig().polar is False  # the recipes read Cartesian slices unless told
    for bad in ("yes", 1):
        with pytest.raises(ConfigError, match="crop_stretch"):
            TrainConfig(crop_stretch=bad)
        with pytest.raises(ConfigError, match="polar_trace"):
            TrainConfig(polar_trace=bad)
    for bad in (-0.1, 0.3, True, "0.1"):
        with pytest.raises(ConfigError, match="polar_overlap"):
            TrainConfig(polar=True, polar_overlap=bad)
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ConfigError, match="polar_fold"):
            TrainConfig(polar=True, polar_fold=bad)
    with pytest.raises(ConfigError, match="polar_fold.*whole rows"):
        TrainConfig(polar=True, polar_fold=3, image_size=128)
    assert TrainConfig(polar_fold=3, image_size=128).polar_fold == 3  # without polar nothing is folded
    for bad in (-0.01, 0.6, True, "0.02"):
        with pytest.raises(ConfigError, match="crop_margin"):
            TrainConfig(crop_margin=bad)
    assert TrainConfig().crop_margin == 0.08  # the margin the crop had before it could be set
    for bad in ("left", "", None, 1):
        with pytest.raises(ConfigError, match="polar_seam"):
            TrainConfig(polar=True, polar_seam=bad)
    assert TrainConfig().polar_seam == "back"  # where the seam was before it could be moved
    for bad in (0.5, 2.6, float("nan"), True, "1.5", None):
        with pytest.raises(ConfigError, match="polar_midline"):
            TrainConfig(polar=True, polar_midline=bad)
    assert TrainConfig().polar_midline == 1.0  # columns evenly spaced, as before the option


def test_a_polar_run_trains_stage2_follows_it_and_the_predictor_reads_polar(tmp_path):
    from training.trainer import fit

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=6, slices_per_patient=4)
    stage1 = fit(tiny_config(data, tmp_path / "runs", polar=True, polar_overlap=0.125, crop_stretch=True,
                              polar_trace=True, polar_fold=2, crop_margin=0.03, polar_seam="front",
                              polar_midline=1.5, image_size=48))
    stage2 = fit(tiny_config(data, tmp_path / "runs", stage=2, init_from=str(stage1), input_size=None))
    path = next(stage2.glob("checkpoints/best*.pt"))
    ckpt = load_checkpoint(path)
    assert ckpt.prep.polar and ckpt.config["polar"] is True  # stage 2 inherits it from stage 1
    assert ckpt.prep.polar_overlap == ckpt.config["polar_overlap"] == 0.125  # and the overlap
    assert ckpt.prep.crop_stretch and ckpt.config["crop_stretch"] is True  # and the stretched crop
    assert ckpt.prep.polar_trace and ckpt.config["polar_trace"] is True  # and the traced frame
    assert ckpt.prep.polar_fold == ckpt.config["polar_fold"] == 2  # and the folded panels
    assert ckpt.prep.crop_margin == ckpt.config["crop_margin"] == 0.03  # and the crop's margin
    assert ckpt.prep.polar_seam == ckpt.config["polar_seam"] == "front"  # and the seam's place
    assert ckpt.prep.polar_midline == ckpt.config["polar_midline"] == 1.5  # and the midline's columns
    assert ckpt.prep.key().endswith("-crop0.03m0.4s-polar0.125-trace-fold2-seamfront-mid1.5")
    predictor = Predictor.from_checkpoint(path)
    file = next((data / "stage_2_train").glob("*.dcm"))
    hu = read_slice(file).hu
    prepared = predictor.prepare(file)
    np.testing.assert_array_equal(prepared.image, ckpt.prep(hu))
    assert prepared.geometry == ckpt.prep.geometry(hu.shape, find_skull_ring(hu)) and prepared.geometry.polar
    assert prepared.geometry.polar_fold == 2 and prepared.geometry.polar_seam == "front"
    assert prepared.geometry.polar_midline == 1.5
    result = predictor.predict(file, saliency_label="any")
    assert result.heatmap is not None and result.heatmap.shape == hu.shape  # back on the slice


def test_the_dashboard_knows_a_polar_run_and_its_overlap_from_its_config():
    def summary(config):
        return RunSummary(id="r", path=Path("r"), status="finished", kind="train", config=config)

    assert run_is_polar(summary({"polar": True}))
    assert not run_is_polar(summary({"polar": False})) and not run_is_polar(summary({}))
    assert not run_is_polar(summary(None)) and not run_is_polar(None)
    # the caption says so when the back of the head is repeated at the edges
    assert run_polar_overlap(summary({"polar": True, "polar_overlap": 0.125})) == 0.125
    assert run_polar_overlap(summary({"polar": True})) == 0.0 and run_polar_overlap(None) == 0.0
    assert "from the back;" in polar_caption(0.0) and "repeated" not in polar_caption(0.0)
    assert "from the back, with the back of the head repeated at both edges;" in polar_caption(0.125)
    assert "inner edge is one straight row" in polar_caption(0.125, traced=True)
    assert "straight" not in polar_caption(0.125)
    assert run_polar_trace(summary({"polar": True, "polar_trace": True}))
    assert not run_polar_trace(summary({"polar": True})) and not run_polar_trace(None)
    # and when the turn is cut into panels (runs from before polar_fold read as one)
    assert run_polar_fold(summary({"polar": True, "polar_fold": 2})) == 2
    assert run_polar_fold(summary({"polar": True})) == 1 and run_polar_fold(None) == 1
    assert run_polar_fold(summary({"polar_fold": True})) == 1
    folded = polar_caption(0.125, traced=True, fold=2)
    assert folded.startswith("polar input in 2 panels, one above the other") and "straight row" in folded
    assert "repeating a little past both its ends" in folded and "panels" not in polar_caption(0.125)
    # and where the seam is (runs from before polar_seam read the back)
    assert run_polar_seam(summary({"polar": True, "polar_seam": "front"})) == "front"
    assert run_polar_seam(summary({"polar": True})) == "back" and run_polar_seam(None) == "back"
    assert "from the front, with the front of the head repeated at both edges;" in polar_caption(0.125, seam="front")
    assert "from the front of the head round the image's right side" in polar_caption(0.0, fold=2, seam="front")
    assert "from the back of the head round the image's left side" in polar_caption(0.0, fold=2)
    # and when the columns lie closer at the midline (runs from before polar_midline: evenly spaced)
    assert run_polar_midline(summary({"polar": True, "polar_midline": 1.5})) == 1.5
    assert run_polar_midline(summary({"polar": True})) == 1.0 and run_polar_midline(None) == 1.0
    assert run_polar_midline(summary({"polar_midline": True})) == 1.0
    assert ("straight row, the columns 1.5 times as close together at the front and back midlines as on average;"
            in polar_caption(0.125, traced=True, midline=1.5))
    assert "midlines" not in polar_caption(0.125, traced=True)
