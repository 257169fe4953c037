"""SlicePrep: the head crop, its round trip through the cache and checkpoints, and the not-a-head flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from hemorrhage_core.checkpoint import load_checkpoint, save_checkpoint
from hemorrhage_core.data import SliceCache, SliceDataset, build_index
from hemorrhage_core.data.augment import AugmentConfig, SliceAugment
from hemorrhage_core.dicom import read_slice
from hemorrhage_core.inference import Predictor, head_flags
from hemorrhage_core.models import ModelSpec, build_model
from hemorrhage_core.preprocess import (
    AIR_HU,
    InputGeometry,
    SlicePrep,
    crop_box,
    find_skull_ring,
    head_square,
    inner_table,
    polar_slice,
    prepare_slice,
)
from hemorrhage_core.synthetic.dataset import write_dataset
from hemorrhage_core.windowing import DEFAULT_STACK

SIZE = 64


def _head(size: int = 256, centre=(150.0, 100.0), radius: float = 60.0) -> np.ndarray:
    """A round head off the image centre: air, a 6 px skull, brain at 35 HU."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = np.hypot(yy - centre[0], xx - centre[1])
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < radius] = 1200.0
    hu[r < radius - 6] = 35.0
    return hu


def test_the_skull_ring_is_found_around_the_brain_and_its_box_holds_the_skull():
    hu = _head()
    ring = find_skull_ring(hu)
    assert ring is not None
    # The box of the skull (radius 60 around (150, 100)), to the low-resolution copy's step (2 px).
    assert abs(ring.top - 90) <= 2 and abs(ring.bottom - 210) <= 2
    assert abs(ring.left - 40) <= 2 and abs(ring.right - 160) <= 2
    assert ring.enclosed_hu == pytest.approx(35.0, abs=1.0)
    assert ring.enclosed_fraction == pytest.approx(np.pi * 54**2 / 256**2, rel=0.1)


def test_no_ring_on_air_a_solid_block_or_a_broken_arc():
    assert find_skull_ring(np.full((128, 128), -1000.0, np.float32)) is None
    block = np.full((128, 128), -1000.0, np.float32)
    block[30:90, 30:90] = 1200.0  # bone with nothing inside
    assert find_skull_ring(block) is None
    arc = _head(128, (64.0, 64.0), 40.0)
    arc[:, 64:] = np.minimum(arc[:, 64:], 35.0)  # half the skull gone: the ring is open
    assert find_skull_ring(arc) is None


def test_the_crop_centres_the_head_and_fills_the_input():
    hu = _head()
    plain = SlicePrep(SIZE, DEFAULT_STACK)(hu)
    cropped = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True)(hu)
    assert plain.shape == cropped.shape == (3, SIZE, SIZE) and cropped.dtype == np.uint8
    bone_plain, bone_crop = plain[2] > 128, cropped[2] > 128
    rows = np.flatnonzero(bone_crop.any(axis=1))
    cols = np.flatnonzero(bone_crop.any(axis=0))
    # centred: the skull's box sits in the middle, within a pixel or two
    assert abs((rows[0] + rows[-1]) / 2 - (SIZE - 1) / 2) <= 2
    assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 2
    # fills it: 1 / (1 + 2 * margin) of the side, against 120/256 without the crop
    assert (rows[-1] - rows[0] + 1) / SIZE == pytest.approx(1 / 1.16, abs=0.04)
    assert bone_crop.sum() > 3 * bone_plain.sum()
    # The two ways in are one preprocessing: the ring found inside, or its geometry passed in.
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125)
    ring = find_skull_ring(hu)
    expected = prep(hu)
    assert np.array_equal(prep.apply_at(hu, prep.geometry(hu.shape, ring)), expected)
    assert not np.array_equal(prep.apply_at(hu, prep.geometry(hu.shape, None)), expected)  # uncropped differs


def test_a_slice_without_a_ring_is_used_whole_and_no_crop_is_the_old_preprocessing():
    block = np.full((96, 96), -1000.0, np.float32)
    block[10:20, 10:20] = 1200.0
    np.testing.assert_array_equal(SlicePrep(SIZE, head_crop=True)(block), prepare_slice(block, SIZE))
    hu = _head()
    np.testing.assert_array_equal(SlicePrep(SIZE)(hu), prepare_slice(hu, SIZE, DEFAULT_STACK))


def test_a_crop_past_the_edge_is_filled_with_air_and_small_rings_zoom_at_most_to_min_side():
    hu = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = crop_box(hu, -1, 2, 3, 3)
    assert out[0].tolist() == [AIR_HU] * 3
    assert out[1:, :2].tolist() == [[2.0, 3.0], [6.0, 7.0]] and (out[:, 2] == AIR_HU).all()
    small = find_skull_ring(_head(256, (128.0, 128.0), 40.0))  # 80 px across: 93 px with the margins
    assert small is not None
    top, left, side = head_square(small, (256, 256), margin=0.08, min_side=0.4)
    assert side == round(0.4 * 256)
    assert abs(top + side / 2 - 128) <= 2 and abs(left + side / 2 - 128) <= 2


def test_what_lies_on_the_input_grid_maps_back_onto_the_slice_where_it_came_from():
    """The bone channel of a cropped input, mapped back, is the slice's skull: a Grad-CAM heatmap on
    the input's grid lands on the anatomy it was computed from, not stretched over the whole slice."""
    hu = _head()  # skull radius 60 around (150, 100) of 256 px: off centre, so a stretch would miss it
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True)
    ring = find_skull_ring(hu)
    geometry = prep.geometry(hu.shape, ring)
    top, left, side = head_square(ring, hu.shape, prep.crop_margin, prep.crop_min_side)
    assert geometry.box == (top, left, side, side)
    back = geometry.to_slice(prep(hu)[2] / 255.0)
    assert back.shape == hu.shape and back.dtype == np.float32
    skull = (hu > 1000.0) & ~np.isin(np.arange(256), [0, 255])[None, :]
    top, left, side, _ = geometry.box
    inside = np.zeros(hu.shape, dtype=bool)
    inside[max(top, 0) : top + side, max(left, 0) : left + side] = True
    assert float(back[~inside].max()) == 0.0  # nothing beyond the crop
    # the bone came back on the skull (its 6 px are under 3 on the input, so resampling blurs them),
    # where the same map stretched over the whole slice misses it
    # (the bone window shows brain at 0.30)
    brain = (hu < 100.0) & (hu > 0.0)
    assert float(back[skull].mean() - back[brain].mean()) > 0.25
    stretched = InputGeometry(hu.shape, None).to_slice(prep(hu)[2] / 255.0)
    assert abs(float(stretched[skull].mean() - stretched[brain].mean())) < 0.05
    # the whole slice, resized: a map of ones covers it
    whole = SlicePrep(SIZE, DEFAULT_STACK).geometry((200, 120), ring)
    assert whole == InputGeometry((200, 120), None)
    np.testing.assert_allclose(whole.to_slice(np.ones((SIZE, SIZE), np.float32)), 1.0, atol=1e-6)


def test_a_crop_past_the_slice_edge_maps_back_without_what_lay_beyond_it():
    geometry = InputGeometry((40, 50), (-10, 30, 40, 40))  # rows -10..30, columns 30..70 of a 40 x 50 slice
    values = np.zeros((8, 8), np.float32)
    values[4, 2] = 1.0  # input pixel (4, 2) of 8: slice rows -10 + 20..25, columns 30 + 10..15
    back = geometry.to_slice(values)
    assert back.shape == (40, 50)
    peak = np.unravel_index(int(np.argmax(back)), back.shape)
    assert peak in {(12, 42), (12, 43), (13, 42), (13, 43)}  # the block's centre, 22.5 and 42.5
    assert float(back[:, :30].max()) == 0.0
    with pytest.raises(ValueError, match="2-D map"):
        geometry.to_slice(np.zeros((1, 8, 8), np.float32))


def _lens(hu: np.ndarray, centre, radius: float, angle: float, hu_value: float = 75.0) -> np.ndarray:
    """A blob of blood just inside the skull at ``angle`` (radians, screen: 0 right, +pi/2 down)."""
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]].astype(np.float32)
    cy, cx = centre[0] + (radius - 12.0) * np.sin(angle), centre[1] + (radius - 12.0) * np.cos(angle)
    out = hu.copy()
    out[np.hypot(yy - cy, xx - cx) < 5.0] = hu_value
    return out


def test_polar_input_unrolls_the_skull_into_a_band_and_places_blood_by_its_angle():
    hu = _head(256, (128.0, 128.0), 60.0)
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True)
    image = prep(hu)
    assert image.shape == (3, SIZE, SIZE) and image.dtype == np.uint8
    bone = image[2] > 128
    # a round skull is a band of rows, the same at every angle
    rows = [np.flatnonzero(bone[:, c]) for c in range(SIZE)]
    assert all(len(r) > 0 for r in rows)
    assert max(r[0] for r in rows) - min(r[0] for r in rows) <= 1
    # blood under the skull at angle a lies in column (a - pi/2) / 2pi of the width, below the brain
    for angle, column in ((np.pi / 2 + 0.3, 0.3 / (2 * np.pi) * SIZE), (np.pi, SIZE / 4), (0.0, 3 * SIZE / 4)):
        bled = prep(_lens(hu, (128.0, 128.0), 60.0, angle))
        blood = (bled[0].astype(int) - image[0].astype(int)) > 40  # brain window: blood brighter than brain
        cols, rws = np.flatnonzero(blood.any(axis=0)), np.flatnonzero(blood.any(axis=1))
        assert abs(cols.mean() - (column - 0.5)) <= 1.5
        assert rws.min() > SIZE / 2  # near the skull, far from the centre
    # the polar frame itself: air beyond the slice, the slice's centre along the top row
    frame = polar_slice(hu, 16)
    assert frame.shape == (16, 64) and np.allclose(frame[0], 35.0)


def test_polar_input_maps_back_onto_the_slice_and_mirrors_with_the_head():
    hu = _lens(_head(256, (128.0, 128.0), 60.0), (128.0, 128.0), 60.0, np.pi)  # blood on the left
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True)
    geometry = prep.geometry(hu.shape, find_skull_ring(hu))
    assert geometry.polar and geometry.box is not None
    back = geometry.to_slice(prep(hu)[0] / 255.0)  # the brain window, through polar and back
    blood = np.abs(hu - 75.0) < 1.0
    brain = np.abs(hu - 35.0) < 1.0
    # brain window: blood 0.94, brain 0.44; resampling twice blurs the 10 px blob's edge
    assert float(back[blood].mean() - back[brain].mean()) > 0.3
    windowed = np.clip(hu / 80.0, 0.0, 1.0)
    inside = back > 0
    assert float(np.corrcoef(back[inside], windowed[inside])[0, 1]) > 0.9
    top, left, side, _ = geometry.box
    yy, xx = np.mgrid[:256, :256]
    beyond = np.hypot(yy - (top + (side - 1) / 2), xx - (left + (side - 1) / 2)) > side / 2 + 1
    assert float(back[beyond].max()) == 0.0  # nothing beyond the circle the polar input sampled
    # a left-right flip of the input (the training augmentation) is the mirrored head (without the crop,
    # whose box the ring search finds to its low-resolution copy's step, so a mirror may shift it a pixel)
    whole = SlicePrep(SIZE, DEFAULT_STACK, polar=True)
    np.testing.assert_array_equal(whole(np.fliplr(hu).copy()), whole(hu)[:, :, ::-1])


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) of each run of True in a 1-D array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_polar_overlap_shows_blood_across_the_seam_whole_and_maps_back():
    hu = _head(256, (128.0, 128.0), 60.0)
    back_lens = _lens(hu, (128.0, 128.0), 60.0, np.pi / 2)  # blood at the back of the head, on the seam
    plain = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True)
    overlap = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125)

    def blood_columns(prep: SlicePrep) -> np.ndarray:
        return ((prep(back_lens)[0].astype(int) - prep(hu)[0].astype(int)) > 40).any(axis=0)

    # without the overlap the seam cuts the blob in two: one piece at each edge of the image
    assert [(a == 0, b == SIZE - 1) for a, b in _runs(blood_columns(plain))] == [(True, False), (False, True)]
    # with it the blob is whole twice, at turns 0 and 1 of the 1.25 the image spans: columns 1/10, 9/10
    runs = _runs(blood_columns(overlap))
    assert len(runs) == 2 and runs[0][0] > 0 and runs[1][1] < SIZE - 1
    for (a, b), turn in zip(runs, (0.0, 1.0), strict=True):
        assert abs((a + b) / 2 - ((turn + 0.125) / 1.25 * SIZE - 0.5)) <= 1.5
    # the round trip reads the middle turn and lands on the blood; the flip is still the mirrored head
    geometry = overlap.geometry(back_lens.shape, find_skull_ring(back_lens))
    assert geometry.polar_overlap == 0.125
    back = geometry.to_slice(overlap(back_lens)[0] / 255.0)
    assert float(back[np.abs(back_lens - 75.0) < 1.0].mean() - back[np.abs(back_lens - 35.0) < 1.0].mean()) > 0.3
    whole = SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_overlap=0.125)
    # (to one grey level: the mirrored columns' angles, pi/2 + 2 pi t and pi/2 + 2 pi (1 - t), round apart)
    flipped, mirrored = whole(np.fliplr(back_lens).copy()).astype(int), whole(back_lens)[:, :, ::-1].astype(int)
    assert int(np.abs(flipped - mirrored).max()) <= 1
    # the frame spans 1.25 turns, 64 of its 80 columns a turn: columns 0-7 and 64-71 share their angles
    frame = polar_slice(back_lens, 20, overlap=0.125)
    assert frame.shape == (20, 80)
    np.testing.assert_allclose(frame[:, :8], frame[:, 64:72], atol=1e-2)
    assert float(np.abs(frame[:, :8] - frame[:, 8:16]).max()) > 1.0  # (where the next columns differ)
    with pytest.raises(ValueError, match="polar_overlap"):
        SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_overlap=0.3)
    assert SlicePrep(SIZE, DEFAULT_STACK, polar_overlap=0.125).polar_overlap == 0.0  # nothing without polar


def test_a_folded_polar_image_holds_the_turn_in_two_panels_and_maps_back():
    hu = _head(256, (128.0, 128.0), 60.0)
    plain = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125)
    folded = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125, polar_fold=2)
    image = folded(hu)
    assert image.shape == (3, SIZE, SIZE) and folded.key() == plain.key() + "-fold2"
    # each panel is the plain image's frame at half the rows: the skull a band at the same share of them
    half = SIZE // 2
    for panel in (image[2, :half], image[2, half:]):
        first = np.array([np.flatnonzero(panel[:, c] > 128)[0] for c in range(SIZE)])
        assert int(np.ptp(first)) <= 1
        assert abs(first.mean() / half - _inner_rows(plain(hu))[0] / SIZE) < 0.05
    # panel 0 holds turns -1/8 to 5/8 from the back, panel 1 turns 3/8 to 9/8: blood on the left
    # (turn 1/4) is in the top panel, on the right (turn 3/4) in the bottom one, both mid-width
    for angle, top in ((np.pi, True), (0.0, False)):
        bled = _lens(hu, (128.0, 128.0), 60.0, angle)
        blood = (folded(bled)[0].astype(int) - image[0].astype(int)) > 40
        rows, cols = np.flatnonzero(blood.any(axis=1)), np.flatnonzero(blood.any(axis=0))
        assert (rows.max() < half) == top and (rows.min() >= half) == (not top)
        assert rows.min() % half > half / 2  # near the skull, far from the centre
        assert abs(cols.mean() - (SIZE / 2 - 0.5)) <= 1.5
        # the round trip reads each angle from its own panel and lands on the blood
        geometry = folded.geometry(bled.shape, find_skull_ring(bled))
        assert geometry.polar_fold == 2
        back = geometry.to_slice(folded(bled)[0] / 255.0)
        assert float(back[np.abs(bled - 75.0) < 1.0].mean() - back[np.abs(bled - 35.0) < 1.0].mean()) > 0.3
        windowed, inside = np.clip(bled / 80.0, 0.0, 1.0), back > 0
        assert float(np.corrcoef(back[inside], windowed[inside])[0, 1]) > 0.9
    # the frame: 48 columns over 3/4 of a turn, so panel 1's columns 0-15 are panel 0's 32-47
    frame = polar_slice(_lens(hu, (128.0, 128.0), 60.0, np.pi / 2), 12, overlap=0.125, fold=2)
    assert frame.shape == (12, 48)
    np.testing.assert_allclose(frame[:6, 32:48], frame[6:, :16], atol=1e-2)
    np.testing.assert_allclose(frame[[0, 6]], 35.0, atol=1e-3)  # each panel starts at the centre
    # one panel is the unfolded frame
    np.testing.assert_array_equal(polar_slice(hu, 12, 0.125, fold=1), polar_slice(hu, 12, 0.125))
    # the training flip of a folded image (each panel mirrored, their order reversed) is the mirrored head
    # (to one grey level, as unfolded), and a flip that kept the panels' order would not be
    whole = SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_overlap=0.125, polar_fold=2)
    bled = _lens(hu, (128.0, 128.0), 60.0, np.pi)
    flip = SliceAugment(AugmentConfig(hflip_p=1.0, affine_p=0.0, brightness=0.0, contrast=0.0), panels=2)
    flipped = (flip(torch.from_numpy(whole(bled)).float() / 255.0) * 255.0).round().int().numpy()
    mirrored = whole(np.fliplr(bled).copy()).astype(int)
    assert int(np.abs(flipped - mirrored).max()) <= 1
    assert int(np.abs(whole(bled)[:, :, ::-1].astype(int) - mirrored).max()) > 40
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match="polar_fold"):
            SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_fold=bad)
    with pytest.raises(ValueError, match="polar_fold 3 needs an image_size"):
        SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_fold=3)
    assert SlicePrep(SIZE, DEFAULT_STACK, polar_fold=2) == SlicePrep(SIZE, DEFAULT_STACK)  # nothing without polar
    assert SlicePrep.from_dict(folded.to_dict()) == folded
    assert SlicePrep.from_dict({k: v for k, v in plain.to_dict().items() if k != "polar_fold"}) == plain


def _assert_round_trip_as_sharp(prep: SlicePrep, reference: SlicePrep, hu: np.ndarray) -> None:
    """Through ``prep``'s polar input and back the slice lands on its blood (correlation with the windowed
    slice > 0.9), with the blood's contrast within 0.03 of ``reference``'s round trip."""
    def through(p: SlicePrep) -> np.ndarray:
        return p.geometry(hu.shape, find_skull_ring(hu)).to_slice(p(hu)[0] / 255.0)

    def contrast(values: np.ndarray) -> float:
        return float(values[np.abs(hu - 75.0) < 1.0].mean() - values[np.abs(hu - 35.0) < 1.0].mean())

    back = through(prep)
    windowed, inside = np.clip(hu / 80.0, 0.0, 1.0), back > 0
    assert float(np.corrcoef(back[inside], windowed[inside])[0, 1]) > 0.9
    assert contrast(back) > 0.25 and abs(contrast(back) - contrast(through(reference))) < 0.03


def _flip_mismatch(prep: SlicePrep, hu: np.ndarray) -> int:
    """The largest grey-level difference between the input of the mirrored slice and the input flipped."""
    return int(np.abs(prep(np.fliplr(hu).copy()).astype(int) - prep(hu)[:, :, ::-1].astype(int)).max())


def test_a_polar_seam_at_the_front_turns_the_frame_by_half_a_turn_and_maps_back():
    hu = _head(256, (128.0, 128.0), 60.0)
    back_lens = _lens(hu, (128.0, 128.0), 60.0, np.pi / 2)  # blood at the back of the head
    # without overlap the front-seam frame is the back-seam frame turned by half its columns
    frame = polar_slice(back_lens, 20)
    np.testing.assert_allclose(polar_slice(back_lens, 20, seam="front"), np.roll(frame, -40, axis=1), atol=1e-3)
    np.testing.assert_array_equal(polar_slice(back_lens, 20, seam="back"), frame)  # the default
    front = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125, polar_seam="front")
    plain = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125)
    assert front.key() == plain.key() + "-seamfront"
    # blood at the back, which the back seam shows twice near the edges, is once whole mid-width
    blood = ((front(back_lens)[0].astype(int) - front(hu)[0].astype(int)) > 40).any(axis=0)
    runs = _runs(blood)
    assert len(runs) == 1 and abs(sum(runs[0]) / 2 - (SIZE / 2 - 0.5)) <= 1.5
    # and blood at the front sits at the edges, at turns 0 and 1 of the 1.25 the image spans
    front_lens = _lens(hu, (128.0, 128.0), 60.0, -np.pi / 2)
    runs = _runs(((front(front_lens)[0].astype(int) - front(hu)[0].astype(int)) > 40).any(axis=0))
    assert len(runs) == 2
    for (a, b), turn in zip(runs, (0.0, 1.0), strict=True):
        assert abs((a + b) / 2 - ((turn + 0.125) / 1.25 * SIZE - 0.5)) <= 1.5
    # the round trip reads the middle turn and lands on the blood
    assert front.geometry(back_lens.shape, find_skull_ring(back_lens)).polar_seam == "front"
    _assert_round_trip_as_sharp(front, plain, back_lens)  # as the back seam's, which reads it near the edges
    # the training flip (columns reversed) is still the head mirrored left to right
    whole = SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_overlap=0.125, polar_seam="front")
    assert _flip_mismatch(whole, _lens(hu, (128.0, 128.0), 60.0, np.pi * 0.8)) <= 1
    for bad in ("left", "Front", None, 1):
        with pytest.raises(ValueError, match="polar_seam"):
            SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_seam=bad)
    assert SlicePrep(SIZE, DEFAULT_STACK, polar_seam="front") == SlicePrep(SIZE, DEFAULT_STACK)  # nothing without polar
    assert SlicePrep.from_dict(front.to_dict()) == front
    assert SlicePrep.from_dict({k: v for k, v in plain.to_dict().items() if k != "polar_seam"}) == plain


def _radial_line(hu: np.ndarray, centre, angle: float, half_width: float = 1.5) -> np.ndarray:
    """A line of blood-dense tissue along the radius at ``angle`` (a thickened falx when on the midline)."""
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = np.abs(-dx * np.sin(angle) + dy * np.cos(angle))
    out = hu.copy()
    out[(across <= half_width) & (along > 10.0) & (along < 52.0)] = 75.0
    return out


def test_polar_midline_spreads_the_midline_over_more_columns_and_maps_back():
    from hemorrhage_core.preprocess import _midline_columns

    hu = _head(256, (128.0, 128.0), 60.0)
    centre = (128.0, 128.0)

    def columns_wide(line_angle: float, midline: float) -> float:
        """The line's width in columns at 40 px from the centre: its blood summed across one row."""
        frame = polar_slice(_radial_line(hu, centre, line_angle), 64, midline=midline)  # 64 rows, 256 columns
        return float(np.clip((frame[int(40 / 128 * 64)] - 35.0) / 40.0, 0.0, None).sum())

    # at the back and front midlines the columns are 1.5 times as close, at the sides 0.78 times
    for angle in (np.pi / 2, -np.pi / 2):
        assert columns_wide(angle, 1.5) / columns_wide(angle, 1.0) == pytest.approx(1.5, abs=0.08)
    assert columns_wide(0.0, 1.5) / columns_wide(0.0, 1.0) == pytest.approx(0.775, abs=0.05)
    np.testing.assert_array_equal(polar_slice(hu, 20, midline=1.0), polar_slice(hu, 20))  # the default
    # blood at any angle lies in the column the map gives (a quarter turn from the seam stays a quarter)
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_midline=1.5)
    image = prep(hu)
    for angle in (np.pi / 2 + 0.3, np.pi, np.pi / 2 + 2.2):
        blood = ((prep(_lens(hu, centre, 60.0, angle))[0].astype(int) - image[0].astype(int)) > 40).any(axis=0)
        column = float(_midline_columns(np.array((angle - np.pi / 2) / (2 * np.pi)), 1.5)) * SIZE
        assert abs(np.flatnonzero(blood).mean() - (column - 0.5)) <= 1.5
    # the round trip lands on the blood, as sharply as with evenly spaced columns
    lens = _lens(hu, centre, 60.0, np.pi / 2 + 0.4)
    dense = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125, polar_midline=1.5)
    even = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_overlap=0.125)
    assert dense.key() == even.key() + "-mid1.5"
    assert dense.geometry(lens.shape, find_skull_ring(lens)).polar_midline == 1.5
    _assert_round_trip_as_sharp(dense, even, lens)
    # the spacing is the same on both sides of the midline, so the training flip is still the mirrored head
    whole = SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_overlap=0.125, polar_midline=1.5)
    assert _flip_mismatch(whole, _lens(hu, centre, 60.0, np.pi * 0.8)) <= 1
    for bad in (0.9, 2.6, float("nan"), True, "1.5", None):
        with pytest.raises(ValueError, match="polar_midline"):
            SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_midline=bad)
    assert SlicePrep(SIZE, DEFAULT_STACK, polar_midline=2.0) == SlicePrep(SIZE, DEFAULT_STACK)  # nothing without polar
    assert SlicePrep.from_dict(dense.to_dict()) == dense
    assert SlicePrep.from_dict({k: v for k, v in even.to_dict().items() if k != "polar_midline"}) == even


def _oval_head(size: int = 256, centre=(128.0, 128.0), radii=(84.0, 60.0)) -> np.ndarray:
    """A head longer than it is wide (as heads are: about 1.2 front to back on the phantoms): air, a
    6 px skull, brain at 35 HU."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = np.hypot((yy - centre[0]) / radii[0], (xx - centre[1]) / radii[1])
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < 1.0] = 1200.0
    hu[r < 1.0 - 6.0 / max(radii)] = 35.0
    return hu


def test_a_stretched_crop_makes_an_oval_skull_one_row_in_polar_and_maps_back():
    hu = _oval_head()
    ring = find_skull_ring(hu)
    square = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True)
    stretched = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, crop_stretch=True)

    def skull_rows(prep: SlicePrep) -> np.ndarray:
        bone = prep(hu)[2] > 128
        return np.array([np.flatnonzero(bone[:, c])[0] for c in range(SIZE)])

    # the square crop's circle cuts the oval at 60 and 84 px: the inner table waves over a fifth of the
    # rows; the ring's own box, widened by the margin on each axis, makes it one row at every angle
    assert int(np.ptp(skull_rows(square))) >= SIZE // 5
    assert int(np.ptp(skull_rows(stretched))) <= 1
    top, left, height, width = stretched.geometry(hu.shape, ring).box
    assert (height, width) == (round((ring.bottom - ring.top) * 1.16), round((ring.right - ring.left) * 1.16))
    assert abs(top + height / 2 - 128) <= 2 and abs(left + width / 2 - 128) <= 2
    # blood at the long axis' end comes back where it was, and nothing beyond the ellipse sampled
    bled = _lens(hu, (128.0, 128.0), 84.0, np.pi / 2)
    geometry = stretched.geometry(bled.shape, find_skull_ring(bled))
    assert geometry.ellipse and geometry.box == (top, left, height, width)
    back = geometry.to_slice(stretched(bled)[0] / 255.0)
    assert float(back[np.abs(bled - 75.0) < 1.0].mean() - back[np.abs(bled - 35.0) < 1.0].mean()) > 0.3
    yy, xx = np.mgrid[:256, :256]
    beyond = np.hypot((yy - (top + (height - 1) / 2)) / (height / 2), (xx - (left + (width - 1) / 2)) / (width / 2)) > 1.02
    assert float(back[beyond].max()) == 0.0
    # without polar it is the box resized to the square; without the crop it means nothing
    flat = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, crop_stretch=True)
    np.testing.assert_array_equal(flat(hu), prepare_slice(crop_box(hu, top, left, height, width), SIZE))
    assert SlicePrep(SIZE, DEFAULT_STACK, crop_stretch=True) == SlicePrep(SIZE, DEFAULT_STACK)


def _egg_head(size: int = 256, tilt: float = 0.5) -> np.ndarray:
    """A head no box straightens: egg-shaped (wider at the back), turned by ``tilt`` radians in the
    slice, a 7 px skull, brain at 35 HU, a calcified choroid plexus (bone density) inside it."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy - 128.0, xx - 128.0
    along = dy * np.cos(tilt) - dx * np.sin(tilt)  # the head's front-back axis, + to the back
    across = dy * np.sin(tilt) + dx * np.cos(tilt)
    half_width = 62.0 + 8.0 * np.clip(along / 90.0, -1.0, 1.0)  # egg: 54 px at the front, 70 at the back
    r = np.hypot(along / 90.0, across / half_width)
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < 1.0] = 1200.0
    hu[r < 1.0 - 7.0 / 70.0] = 35.0
    hu[np.hypot(dy - 10.0, dx - 12.0) < 3.0] = 900.0  # the choroid plexus: no ray may stop there
    return hu


def _inner_rows(image: np.ndarray) -> np.ndarray:
    """The first bone row past the middle of a polar image, column by column (the inner table)."""
    bone = image[2] > 128
    half = image.shape[1] // 2
    return np.array([half + np.flatnonzero(bone[half:, c])[0] for c in range(image.shape[2])])


def test_a_traced_polar_frame_lays_the_inner_table_on_one_row_and_maps_back():
    hu = _egg_head()
    ring = find_skull_ring(hu)
    stretched = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, crop_stretch=True)
    traced = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, crop_stretch=True, polar_trace=True)
    # the tilted egg waves over a tenth of the rows even in the stretched box; traced, one row
    assert int(np.ptp(_inner_rows(stretched(hu)))) >= SIZE // 10
    assert int(np.ptp(_inner_rows(traced(hu)))) <= 1
    # the square crop's frame is traced as well, and the trace is of the table, not of the plexus
    square = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_trace=True)
    assert int(np.ptp(_inner_rows(square(hu)))) <= 1
    geometry = traced.geometry(hu.shape, ring)
    assert geometry.trace is not None and geometry.trace[0] == 1.0 and len(geometry.trace) == 13
    assert geometry.box == stretched.geometry(hu.shape, ring).box  # the crop is the same
    # blood at the egg's wide back comes back where it was, and nothing beyond the traced frame
    bled = _lens(hu, (128.0, 128.0), 88.0, np.pi / 2 + 0.5)
    geometry = traced.geometry(bled.shape, find_skull_ring(bled))
    back = geometry.to_slice(traced(bled)[0] / 255.0)
    assert float(back[np.abs(bled - 75.0) < 1.0].mean() - back[np.abs(bled - 35.0) < 1.0].mean()) > 0.3
    assert float(back[hu < -500.0].mean()) < 0.05  # air around the head stays (nearly) empty
    # without a cavity to read there is no trace, and the frame is the plain one
    bare = type(ring)(ring.top, ring.left, ring.bottom, ring.right, ring.enclosed_fraction, ring.enclosed_hu)
    assert bare == ring and inner_table(bare, geometry.box, True) is None
    np.testing.assert_array_equal(traced.apply_at(hu, traced.geometry(hu.shape, bare)), stretched(hu))
    # without polar or without the crop it means nothing
    assert SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar_trace=True) == SlicePrep(SIZE, DEFAULT_STACK, head_crop=True)
    assert SlicePrep(SIZE, DEFAULT_STACK, polar=True, polar_trace=True) == SlicePrep(SIZE, DEFAULT_STACK, polar=True)


def test_a_trace_follows_a_round_skull_as_a_circle():
    hu = _head(256, (128.0, 128.0), 60.0)
    ring = find_skull_ring(hu)
    prep = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True, polar_trace=True)
    trace = prep.geometry(hu.shape, ring).trace
    # a circle about the crop's centre: every harmonic near zero (the search copy's pixel staircase
    # leaves under 1%), so the image is the plain frame's but for edges moved by part of a row
    assert trace is not None and max(abs(c) for c in trace[1:]) < 0.01
    plain = SlicePrep(SIZE, DEFAULT_STACK, head_crop=True, polar=True)
    assert float(np.abs(prep(hu).astype(int) - plain(hu).astype(int)).mean()) < 1.0
    assert int(np.abs(_inner_rows(prep(hu)) - _inner_rows(plain(hu))).max()) <= 1


def test_slice_prep_round_trips_and_names_its_crop():
    prep = SlicePrep(96, DEFAULT_STACK, head_crop=True, crop_margin=0.1)
    assert SlicePrep.from_dict(prep.to_dict()) == prep
    polar = SlicePrep(96, DEFAULT_STACK, head_crop=True, crop_margin=0.1, polar=True)
    assert SlicePrep.from_dict(polar.to_dict()) == polar and polar.key() == prep.key() + "-polar"
    older = {k: v for k, v in polar.to_dict().items() if k != "polar"}
    assert SlicePrep.from_dict(older) == prep  # a checkpoint from before the option was not polar
    seamless = SlicePrep(96, DEFAULT_STACK, head_crop=True, crop_margin=0.1, polar=True, polar_overlap=0.125)
    assert SlicePrep.from_dict(seamless.to_dict()) == seamless and seamless.key() == prep.key() + "-polar0.125"
    older = {k: v for k, v in seamless.to_dict().items() if k != "polar_overlap"}
    assert SlicePrep.from_dict(older) == polar  # a polar checkpoint from before the overlap had none
    oval = SlicePrep(96, DEFAULT_STACK, head_crop=True, crop_margin=0.1, polar=True, crop_stretch=True)
    assert SlicePrep.from_dict(oval.to_dict()) == oval and oval.key() == prep.key() + "s-polar"
    older = {k: v for k, v in oval.to_dict().items() if k != "crop_stretch"}
    assert SlicePrep.from_dict(older) == polar  # a checkpoint from before the stretch cropped squares
    traced = SlicePrep(96, DEFAULT_STACK, head_crop=True, crop_margin=0.1, polar=True, crop_stretch=True, polar_trace=True)
    assert SlicePrep.from_dict(traced.to_dict()) == traced and traced.key() == oval.key() + "-trace"
    older = {k: v for k, v in traced.to_dict().items() if k != "polar_trace"}
    assert SlicePrep.from_dict(older) == oval  # a checkpoint from before the trace had none
    assert prep.to_dict()["version"] >= 3
    assert prep.key() != SlicePrep(96, DEFAULT_STACK).key()
    # a mapping from before the crop (image_size and windows only) means no crop
    assert SlicePrep.from_dict({"image_size": 96, "windows": DEFAULT_STACK.to_list()}) == SlicePrep(96)
    with pytest.raises(ValueError, match="crop_margin"):
        SlicePrep(96, crop_margin=-0.1)


def test_phantom_slices_all_have_a_ring_and_the_cache_serves_the_cropped_slices(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, patients=2, slices_per_patient=4, size=128, seed=3, workers=1, progress=False)
    index = build_index(data, workers=1, progress=False).table
    for rel in index["path"]:
        ring = find_skull_ring(read_slice(data / rel).hu)
        assert ring is not None and 0.0 < ring.enclosed_hu < 100.0
    prep = SlicePrep(SIZE, head_crop=True)
    cache = SliceCache.build(index, data, prep=prep, workers=1, progress=False)
    plain = SliceCache.build(index, data, prep=SlicePrep(SIZE), workers=1, progress=False)
    assert cache.directory != plain.directory and cache.prep == prep
    assert not np.array_equal(cache.array, plain.array)
    cached = SliceDataset(index, data, stage=2, prep=prep, cache=cache)
    uncached = SliceDataset(index, data, stage=2, prep=prep)
    for i in range(len(index)):
        torch.testing.assert_close(cached[i][0], uncached[i][0], rtol=0, atol=0)
    with pytest.raises(Exception, match="cache holds"):
        SliceDataset(index, data, stage=2, prep=prep, cache=plain)


def test_the_checkpoint_carries_the_prep_and_the_predictor_applies_it(tmp_path):
    spec = ModelSpec(backbone="mobilenet_v3_small", stage=2, input_size=32, hidden=(16, 8))
    model = build_model(spec, weights="none")
    prep = SlicePrep(48, head_crop=True)
    path = save_checkpoint(tmp_path / "m.pt", model, prep=prep)
    ckpt = load_checkpoint(path)
    assert ckpt.prep == prep and ckpt.meta()["prep"] == prep.to_dict()
    data = tmp_path / "data"
    write_dataset(data, patients=1, slices_per_patient=2, size=128, seed=4, workers=1, progress=False)
    file = next((data / "stage_2_train").glob("*.dcm"))
    predictor = Predictor.from_checkpoint(path)
    assert predictor.prep == prep
    np.testing.assert_array_equal(predictor.prepare(file).image, prep(read_slice(file).hu))
    # a traced polar frame travels the same way, and the Predictor finds the phantom's trace
    traced = SlicePrep(48, head_crop=True, polar=True, crop_stretch=True, polar_trace=True)
    predictor = Predictor.from_checkpoint(save_checkpoint(tmp_path / "t.pt", model, prep=traced))
    prepared, hu = predictor.prepare(file), read_slice(file).hu
    assert predictor.prep == traced and prepared.geometry.trace is not None
    np.testing.assert_array_equal(prepared.image, traced(hu))
    # an older checkpoint (no prep entry) loads as the uncropped preprocessing it was trained with
    raw = torch.load(path, weights_only=True)
    del raw["prep"]
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").prep == SlicePrep(48)


def test_non_head_ct_is_flagged_and_a_phantom_head_is_not(tmp_path):
    body = read_slice(get_testdata_file("CT_small.dcm")).hu  # pydicom's CT: a body slice with a vertebra
    body_ring = find_skull_ring(body) is not None
    assert [f.split(":")[0] for f in head_flags("", body_ring)] == ["no_skull_ring"]
    head = read_slice(get_testdata_file("693_J2KI.dcm")).hu  # a real head CT with a large bleed
    head_ring = find_skull_ring(head) is not None
    assert head_flags("", head_ring) == []
    assert head_flags("head", head_ring) == [] and head_flags("BRAIN", head_ring) == []
    assert [f.split(":")[0] for f in head_flags("CHEST", head_ring)] == ["not_head"]
    assert head_flags("", None) == []


def test_subtypes_are_lowered_to_any_and_nothing_else_moves():
    from hemorrhage_core.labels import LABELS, consistent_labels

    raw = np.array([
        [0.95, 0.1, 0.0, 0.2, 0.3, 0.05],  # epidural 0.95 with any 0.05: every subtype above 0.05 drops to it
        [0.1, 0.2, 0.1, 0.1, 0.1, 0.7],  # any already above every subtype: unchanged
    ])
    out = consistent_labels(raw)
    j = LABELS.index("any")
    assert out[0].tolist() == [0.05, 0.05, 0.0, 0.05, 0.05, 0.05]
    assert out[1].tolist() == raw[1].tolist()
    assert out[:, j].tolist() == raw[:, j].tolist()  # any is never moved
    assert (np.delete(out, j, axis=1) <= out[:, [j]]).all()
    assert raw[0, 0] == 0.95  # a copy: the input is left alone
    assert consistent_labels(raw[0]).tolist() == out[0].tolist()  # one row works too
