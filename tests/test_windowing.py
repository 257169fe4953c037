"""Window presets, the channel stack and the shared slice preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hemorrhage_core.preprocess import prepare_slice, to_tensor
from hemorrhage_core.windowing import DEFAULT_STACK, PRESETS, Window, WindowStack, preset


def test_presets_match_the_rsna_notes():
    assert {n: (w.center, w.width) for n, w in PRESETS.items()} == {
        "brain": (40.0, 80.0),
        "subdural": (80.0, 200.0),
        "soft_tissue": (40.0, 380.0),
        "bone": (600.0, 2800.0),
    }
    assert DEFAULT_STACK.names == ("brain", "subdural", "bone")


def test_window_maps_edges_and_centre():
    brain = PRESETS["brain"]
    out = brain.apply(np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_unknown_preset_and_bad_width_are_refused():
    with pytest.raises(ValueError, match="known: brain"):
        preset("lung")
    with pytest.raises(ValueError):
        Window("x", 0.0, 0.0)


def test_stack_round_trips_through_its_list_form():
    stack = WindowStack.from_list(["brain", {"name": "custom", "center": 10, "width": 50}])
    assert WindowStack.from_list(stack.to_list()) == stack
    assert stack.key() != DEFAULT_STACK.key()


@pytest.mark.parametrize("kind", ["integer", "fractional", "nan"])
def test_uint8_paths_agree_with_the_float_reference(kind):
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 400.0, (37, 41)).astype(np.float32)
    if kind == "integer":
        hu = np.rint(hu)
    if kind == "nan":
        hu[3, 4] = np.nan
    reference = np.floor(DEFAULT_STACK.apply(np.nan_to_num(hu, nan=-np.inf)) * 255.0 + 0.5)
    planar = DEFAULT_STACK.apply_uint8(hu)
    rgba = DEFAULT_STACK.apply_uint8_rgba(hu)
    assert np.array_equal(np.moveaxis(rgba[..., :3], -1, 0), planar)
    assert not rgba[..., 3].any()
    # float32 rounding may move a value sitting exactly on a half level by one; NaN reads as -inf: 0
    assert np.abs(planar.astype(int) - reference).max() <= 1
    if kind == "nan":
        assert not planar[:, 3, 4].any()


def test_prepare_slice_matches_windowing_then_antialiased_resize():
    rng = np.random.default_rng(1)
    hu = np.rint(rng.normal(30.0, 300.0, (96, 96))).astype(np.float32)
    out = prepare_slice(hu, 48)
    assert out.shape == (3, 48, 48) and out.dtype == np.uint8
    planar = torch.from_numpy(DEFAULT_STACK.apply_uint8(hu)).float().unsqueeze(0)
    reference = F.interpolate(planar, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    assert np.abs(out.astype(int) - reference[0].round().numpy().astype(int)).max() <= 1
    # same size: windowing only
    assert np.array_equal(prepare_slice(hu, 96), DEFAULT_STACK.apply_uint8(hu))


def test_to_tensor_scales_to_unit_range():
    t = to_tensor(np.array([[[0, 255]]], dtype=np.uint8))
    assert t.dtype == torch.float32 and t.tolist() == [[[0.0, 1.0]]]
