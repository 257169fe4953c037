"""The DICOM boundary: HU against pydicom's own modality LUT, RSNA quirks, refusals with reasons."""

from __future__ import annotations

import io
import logging
import os
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut

from hemorrhage_core.dicom import (
    TRANSFER_SYNTAXES,
    CtSlice,
    DicomRefusal,
    RefusalReason,
    SliceMeta,
    new_uid,
    read_header,
    read_slice,
    write_ct_slice,
)
from hemorrhage_core.dicom.reader import HU_RANGE
from hemorrhage_core.errors import DicomReadError

TEST_FILES_ROOT = Path(pydicom.data.__file__).parent / "test_files"
ALL_TEST_FILES = sorted(f for f in get_testdata_files() if os.path.isfile(f))
COLOUR_PHOTOMETRIC = {
    "RGB",
    "PALETTE COLOR",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
}


def _label(path: str) -> str:
    return os.path.relpath(path, TEST_FILES_ROOT)


def _header(path: str) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _classify(path: str) -> str:
    """What pydicom's header says a test file is: greyscale CT/MR slice, colour, multi-frame, ..."""
    ds = _header(path)
    if ds is None:
        return "not_dicom"
    if "Rows" not in ds:
        return "non_image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ds.get("NumberOfFrames")
        try:
            multi = frames not in (None, "") and int(frames) > 1
        except (TypeError, ValueError):
            multi = False
    if multi:
        return "multi_frame"
    if ds.get("SamplesPerPixel", 1) != 1 or ds.get("PhotometricInterpretation") in COLOUR_PHOTOMETRIC:
        return "colour"
    if ds.get("Modality") in ("CT", "MR") and ds.get("PhotometricInterpretation") in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        return "greyscale_ct_mr"
    return "other"


CLASSES = {path: _classify(path) for path in ALL_TEST_FILES}
GREYSCALE_CT_MR = [p for p, c in CLASSES.items() if c == "greyscale_ct_mr"]


def _write(path: Path, stored: np.ndarray, **overrides) -> Path:
    kwargs = dict(
        patient_id="PATIENT-0001",
        study_uid=new_uid("study"),
        series_uid=new_uid("series"),
        sop_uid=new_uid(f"sop:{path.name}"),
        z=12.5,
        instance_number=3,
    )
    kwargs.update(overrides)
    write_ct_slice(path, stored, **kwargs)
    return path


def _ramp(rows: int = 64, columns: int = 48, low: int = -1000, high: int = 2000) -> np.ndarray:
    return np.linspace(low, high, rows * columns).round().astype(np.int16).reshape(rows, columns)


# -------------------------------------------------------------------------------------------------
# pydicom's test files


def test_pydicom_test_files_include_enough_greyscale_ct_and_mr():
    names = {_label(p) for p in GREYSCALE_CT_MR}
    assert len(names) >= 20
    assert {
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
    } <= names


@pytest.mark.parametrize("path", GREYSCALE_CT_MR, ids=_label)
def test_greyscale_ct_mr_match_pydicom_modality_lut(path):
    ds = pydicom.dcmread(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception:
        # pydicom itself cannot decode it (truncated, or no decoder installed): so must we refuse.
        with pytest.raises(DicomReadError):
            read_slice(path)
        return
    rsna_quirk = ds.Modality == "CT" and ds.BitsStored == 12 and ds.PixelRepresentation == 0
    assert not (rsna_quirk and float(ds.get("RescaleIntercept", 0)) > -100), (
        "the RSNA fix would alter this file"
    )
    result = read_slice(path)
    assert result.hu.dtype == np.float32 and result.hu.ndim == 2
    np.testing.assert_array_equal(result.hu, reference)
    assert (result.meta.rows, result.meta.columns) == reference.shape
    assert result.meta.modality == ds.Modality
    assert result.meta.image_id == Path(path).stem


def test_encodings_of_one_image_give_the_same_hu():
    """Little/big endian, implicit VR, RLE, JPEG 2000 and JPEG-LS lossless versions of MR_small agree."""
    reference = read_slice(get_testdata_file("MR_small.dcm")).hu
    for name in (
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm",
    ):
        np.testing.assert_array_equal(read_slice(get_testdata_file(name)).hu, reference, err_msg=name)


@pytest.mark.parametrize(
    "path",
    [p for p, c in CLASSES.items() if c in ("colour", "multi_frame", "non_image", "not_dicom")],
    ids=_label,
)
def test_colour_multiframe_nonimage_and_non_dicom_files_are_refused(path):
    with pytest.raises(DicomReadError):
        read_slice(path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", RefusalReason.NOT_IMAGE),
        ("reportsi.dcm", RefusalReason.NOT_IMAGE),
        ("test-SR.dcm", RefusalReason.NOT_IMAGE),
        ("waveform_ecg.dcm", RefusalReason.NOT_IMAGE),
        ("liver_1frame.dcm", RefusalReason.NOT_IMAGE),
        ("rtdose_1frame.dcm", RefusalReason.NOT_IMAGE),
        ("SC_rgb_rle.dcm", RefusalReason.COLOUR),
        ("ExplVR_BigEnd.dcm", RefusalReason.COLOUR),
        ("examples_palette.dcm", RefusalReason.COLOUR),
        ("SC_rgb_rle_2frame.dcm", RefusalReason.MULTI_FRAME),
        ("examples_ybr_color.dcm", RefusalReason.MULTI_FRAME),
        ("MR_truncated.dcm", RefusalReason.TRUNCATED),
        ("README.txt", RefusalReason.NOT_DICOM),
        ("no_meta.dcm", RefusalReason.NOT_DICOM),
        # its JPEG 2000 codestream declares 1024 x 3.7e9 pixels: refused before any decoder allocates
        ("JPEG2000-embedded-sequence-delimiter.dcm", RefusalReason.SHAPE_MISMATCH),
    ],
)
def test_refusal_reasons_for_known_files(name, reason):
    path = get_testdata_file(name)
    with pytest.raises(DicomRefusal) as info:
        read_slice(path)
    assert info.value.reason == reason
    assert str(info.value)  # a sentence, not an empty error


def test_every_pydicom_test_file_reads_or_raises_only_dicom_read_error():
    outcomes = {"ok": 0, "refused": 0}
    for path in ALL_TEST_FILES:
        data = Path(path).read_bytes()
        for source in (path, data):
            for reader in (read_slice, read_header):
                try:
                    reader(source)
                    outcomes["ok"] += 1
                except DicomReadError:
                    outcomes["refused"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


def test_refusal_carries_declared_header_fields():
    with pytest.raises(DicomRefusal) as info:
        read_slice(get_testdata_file("SC_rgb_rle.dcm"))
    assert (info.value.modality, info.value.rows, info.value.columns) == ("OT", 100, 100)


# -------------------------------------------------------------------------------------------------
# files written by write_ct_slice


def test_written_slice_round_trips_hu_and_metadata(tmp_path):
    stored = _ramp()
    path = _write(tmp_path / "ID_0123abcde.dcm", stored, pixel_spacing=(0.5, 0.4), rescale_intercept=-1024.0)
    result = read_slice(path)
    assert isinstance(result, CtSlice)
    np.testing.assert_array_equal(result.hu, stored.astype(np.float32) - 1024.0)
    assert result.meta == SliceMeta(
        image_id="ID_0123abcde",
        patient_id="PATIENT-0001",
        study_uid=new_uid("study"),
        series_uid=new_uid("series"),
        z=12.5,
        pixel_spacing=(0.5, 0.4),
        modality="CT",
        rows=64,
        columns=48,
        window_center=40.0,
        window_width=80.0,
    )
    assert read_header(path) == result.meta
    assert read_slice(path.read_bytes(), image_id="given").meta.image_id == "given"
    assert read_slice(path.read_bytes()).meta.image_id == ""


def test_non_unit_slope_matches_float64_reference(tmp_path):
    stored = _ramp(low=0, high=4000)
    path = _write(tmp_path / "slope.dcm", stored, rescale_slope=0.5, rescale_intercept=-1000.25)
    expected = (stored.astype(np.float64) * 0.5 - 1000.25).astype(np.float32)
    np.testing.assert_array_equal(read_slice(path).hu, expected)


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_every_written_transfer_syntax_decodes_to_the_same_hu(tmp_path, syntax):
    stored = _ramp()
    path = _write(tmp_path / f"{syntax}.dcm", stored, transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert ds.SOPInstanceUID == new_uid(f"sop:{path.name}")  # compression kept the given UID
    np.testing.assert_array_equal(read_slice(path).hu, stored.astype(np.float32) - 1024.0)


def test_written_file_is_a_complete_ct_image(tmp_path):
    path = _write(
        tmp_path / "full.dcm", _ramp(), extra={"PatientName": "Doe^Jane", "InstitutionName": "General"}
    )
    ds = pydicom.dcmread(path)
    assert ds.preamble is not None and ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.SOPClassUID.name == "CT Image Storage"
    assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert str(ds.PatientName) == "Doe^Jane" and ds.InstitutionName == "General"
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.ImagePositionPatient[2]) == 12.5 and ds.InstanceNumber == 3
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_new_uid_is_deterministic_and_valid():
    assert new_uid("patient-7") == new_uid("patient-7") != new_uid("patient-8")
    assert pydicom.uid.UID(new_uid("x")).is_valid


def test_writer_rejects_values_outside_bits_stored(tmp_path):
    with pytest.raises(ValueError):
        _write(tmp_path / "bad.dcm", np.full((4, 4), 5000, np.int16), bits_stored=12)
    assert not list(tmp_path.iterdir())


def _rsna_reference(stored: np.ndarray, slope: float = 1.0) -> np.ndarray:
    """rsna-notes.md, by hand: add 1000, subtract 4096 from values >= 4096, intercept -1000."""
    fixed = stored.astype(np.int64) + 1000
    fixed = np.where(fixed >= 4096, fixed - 4096, fixed)
    return (fixed * slope - 1000).astype(np.float32)


def test_rsna_12bit_fix(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(32, 32)).astype(np.uint16)
    stored[0, :4] = [0, 3095, 3096, 4095]  # both sides of the wrap point
    path = _write(
        tmp_path / "quirk.dcm", stored, bits_stored=12, pixel_representation=0, rescale_intercept=0.0
    )
    hu = read_slice(path).hu
    np.testing.assert_array_equal(hu, _rsna_reference(stored))
    assert hu[0, :4].tolist() == [0.0, 3095.0, -1000.0, -1.0]


@pytest.mark.parametrize(
    "overrides",
    [
        {"rescale_intercept": -1024.0},  # intercept <= -100: a normal file
        {"rescale_intercept": -100.0},  # the boundary is strict
        {"extra": {"Modality": "MR"}},  # CT only
        {"bits_stored": 16},
    ],
    ids=["intercept-1024", "intercept-100", "MR", "bits16"],
)
def test_rsna_fix_applies_only_to_its_tag_combination(tmp_path, overrides):
    stored = np.array([[0, 100, 3000, 4095]], dtype=np.uint16).repeat(4, axis=0)
    kwargs = {"bits_stored": 12, "pixel_representation": 0, "rescale_intercept": 0.0, **overrides}
    path = _write(tmp_path / "plain.dcm", stored, **kwargs)
    expected = stored.astype(np.float32) + np.float32(kwargs["rescale_intercept"])
    np.testing.assert_array_equal(read_slice(path).hu, expected)


def test_multi_valued_window_and_rescale_tags_use_the_first_value(tmp_path):
    stored = _ramp()
    path = _write(
        tmp_path / "multi.dcm",
        stored,
        window_center=[36, 600],
        window_width=[80, 2800],
        extra={"RescaleIntercept": ["-1024", "0"]},
    )
    assert pydicom.dcmread(path).WindowCenter == [36, 600]  # really multi-valued on disk
    result = read_slice(path)
    assert (result.meta.window_center, result.meta.window_width) == (36.0, 80.0)
    np.testing.assert_array_equal(result.hu, stored.astype(np.float32) - 1024.0)


def test_monochrome1_is_inverted_within_the_stored_range(tmp_path):
    stored = _ramp()
    path = _write(tmp_path / "mono1.dcm", stored, extra={"PhotometricInterpretation": "MONOCHROME1"})
    # signed 16-bit: inverted stored value = -1 - s (maps [-32768, 32767] onto itself, reversed)
    expected = (-1 - stored.astype(np.float32)) - 1024.0
    np.testing.assert_array_equal(read_slice(path).hu, expected)


def test_monochrome1_unsigned_12_bit(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 60
    path = _write(
        tmp_path / "mono1u.dcm",
        stored,
        bits_stored=12,
        pixel_representation=0,
        rescale_intercept=-1024.0,
        extra={"PhotometricInterpretation": "MONOCHROME1"},
    )
    np.testing.assert_array_equal(read_slice(path).hu, (4095 - stored.astype(np.float32)) - 1024.0)


# -------------------------------------------------------------------------------------------------
# rescale, HU bound and frame count


def _write_with(path: Path, stored: np.ndarray, **overrides) -> Path:
    with warnings.catch_warnings():  # pydicom warns that NaN / inf are not valid DS values
        warnings.simplefilter("ignore")
        return _write(path, stored, **overrides)


@pytest.mark.parametrize("slope", ["0", "0.0", "-0", "NaN", "inf", "-inf", "1e400"])
def test_a_slope_zero_or_not_finite_is_refused(tmp_path, slope):
    path = _write_with(tmp_path / "slope.dcm", _ramp(), extra={"RescaleSlope": slope})
    refusal = _refusal(path)
    assert refusal.reason == RefusalReason.BAD_RESCALE
    assert "slope zero or not finite" in str(refusal)
    assert read_header(path).rows == 64  # the header scan does not read the rescale


@pytest.mark.parametrize("intercept", ["NaN", "inf", "-1e400"])
def test_an_intercept_that_is_not_finite_is_refused(tmp_path, intercept):
    path = _write_with(tmp_path / "intercept.dcm", _ramp(), extra={"RescaleIntercept": intercept})
    refusal = _refusal(path)
    assert refusal.reason == RefusalReason.BAD_RESCALE and "not finite" in str(refusal)


@pytest.mark.parametrize(
    ("stored", "slope", "intercept"),
    [
        (np.full((4, 4), 2024, np.int16), 1000.0, -1024.0),  # HU up to 2 million
        (np.full((4, 4), 0, np.int16), 1.0, 1e6),
        (np.full((4, 4), -32768, np.int16), 1.0, -32769.0),  # one below the bound
        (np.full((4, 4), 65535, np.uint16), 1.0, 2.0),  # one above it
        (np.full((4, 4), 30000, np.int16), 1e300, 0.0),  # overflows float32 to infinity
    ],
    ids=["slope-1000", "intercept-1e6", "below", "above", "overflow"],
)
def test_hu_outside_the_bound_are_refused_naming_the_bound(tmp_path, stored, slope, intercept):
    representation = int(stored.dtype.kind == "i")
    path = _write(
        tmp_path / "range.dcm", stored, rescale_slope=slope, rescale_intercept=intercept,
        pixel_representation=representation,
    )  # fmt: skip
    refusal = _refusal(path)
    assert refusal.reason == RefusalReason.HU_OUT_OF_RANGE
    low, high = HU_RANGE
    assert f"outside the [{low:.0f}, {high:.0f}] HU" in str(refusal)


# What real scanners write; none may be refused by the HU bound.
REAL_CT_ENCODINGS = {
    # name: (stored values, slope, intercept, bits stored, pixel representation)
    "gantry-padding-3024": (np.array([[-2000, 0, 1024, 4095]], np.int16), 1.0, -1024.0, 16, 1),
    "int16-min-padding": (np.array([[-32768, -1000, 0, 3071]], np.int16), 1.0, -1024.0, 16, 1),
    "intercept-32768-edge": (np.array([[-32768, 0, 32767, 1]], np.int16), 1.0, -32768.0, 16, 1),
    "uint16-full-range": (np.array([[0, 1024, 40000, 65535]], np.uint16), 1.0, -1024.0, 16, 0),
    "uint16-max-at-the-bound": (np.array([[0, 65535, 1, 2]], np.uint16), 1.0, 1.0, 16, 0),
    "extended-scale-slope-10": (np.array([[0, 1024, 2048, 4095]], np.uint16), 10.0, -10240.0, 12, 0),
    "12bit-standard": (np.array([[0, 24, 1064, 4095]], np.uint16), 1.0, -1024.0, 12, 0),
    "fractional-slope": (np.array([[-3000, 0, 3000, 32767]], np.int16), 0.5, -1000.25, 16, 1),
}


@pytest.mark.parametrize("name", sorted(REAL_CT_ENCODINGS))
def test_real_ct_encodings_are_never_refused_by_the_hu_bound(tmp_path, name):
    stored, slope, intercept, bits, representation = REAL_CT_ENCODINGS[name]
    stored = stored.repeat(4, axis=0)
    path = _write(
        tmp_path / f"{name}.dcm", stored, rescale_slope=slope, rescale_intercept=intercept,
        bits_stored=bits, pixel_representation=representation,
    )  # fmt: skip
    expected = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    hu = read_slice(path).hu
    np.testing.assert_array_equal(hu, expected)
    assert HU_RANGE[0] <= hu.min() and hu.max() <= HU_RANGE[1]


def test_a_rescale_that_could_leave_the_bound_is_checked_on_the_actual_values(tmp_path):
    # slope 4 on signed 16-bit data could reach +-131072, but these values stay near head HU
    stored = np.array([[-250, 0, 10, 400]], np.int16).repeat(4, axis=0)
    path = _write(tmp_path / "slope4.dcm", stored, rescale_slope=4.0, rescale_intercept=0.0)
    np.testing.assert_array_equal(read_slice(path).hu, stored.astype(np.float32) * 4)


@pytest.mark.parametrize("frames", ["0", "-1"])
def test_a_frame_count_other_than_1_is_refused_from_the_header(tmp_path, frames):
    path = _write(tmp_path / "frames.dcm", _ramp(), extra={"NumberOfFrames": frames})
    for read in (read_slice, read_header):
        with pytest.raises(DicomRefusal) as info:
            read(path)
        assert info.value.reason == RefusalReason.MALFORMED
        assert "a frame count other than 1" in str(info.value)


def test_number_of_frames_1_is_a_single_frame(tmp_path):
    path = _write(tmp_path / "one.dcm", _ramp(), extra={"NumberOfFrames": "1"})
    np.testing.assert_array_equal(read_slice(path).hu, _ramp().astype(np.float32) - 1024)


# -------------------------------------------------------------------------------------------------
# refusals on crafted files


def _refusal(source) -> DicomRefusal:
    with pytest.raises(DicomRefusal) as info:
        read_slice(source)
    return info.value


def test_declared_size_over_4096_is_refused_before_decoding(tmp_path, monkeypatch):
    # 8 x 8 pixels on disk, 5000 x 5000 declared: decoding would say "truncated", so the reason
    # proves the size was checked first; and no decoder may even be asked for.
    path = _write(tmp_path / "huge.dcm", _ramp(8, 8), extra={"Rows": 5000, "Columns": 5000})
    monkeypatch.setattr(
        "hemorrhage_core.dicom.reader.get_decoder",
        lambda *_: pytest.fail("a decoder was requested for an oversized image"),
    )
    assert _refusal(path).reason == RefusalReason.TOO_LARGE
    with pytest.raises(DicomRefusal) as info:
        read_header(path)
    assert info.value.reason == RefusalReason.TOO_LARGE


def test_4096_square_is_accepted_by_the_header_check(tmp_path):
    path = _write(tmp_path / "edge.dcm", _ramp(8, 8), extra={"Rows": 4096, "Columns": 4096})
    assert read_header(path).rows == 4096
    assert _refusal(path).reason == RefusalReason.TRUNCATED  # the pixels really are missing


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"Rows": 0}, RefusalReason.EMPTY_IMAGE),
        ({"Columns": 0}, RefusalReason.EMPTY_IMAGE),
        ({"BitsAllocated": 32}, RefusalReason.UNSUPPORTED_BITS),
        ({"BitsStored": 17}, RefusalReason.UNSUPPORTED_BITS),
        ({"PixelRepresentation": 2}, RefusalReason.UNSUPPORTED_BITS),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, RefusalReason.COLOUR),
        ({"NumberOfFrames": 2}, RefusalReason.MULTI_FRAME),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.481.5"}, RefusalReason.NOT_IMAGE),
        ({"PhotometricInterpretation": "WHATEVER"}, RefusalReason.MALFORMED),
        ({"Columns": 40}, RefusalReason.TRUNCATED),
    ],
)
def test_header_refusals(tmp_path, extra, reason):
    path = _write(tmp_path / "bad.dcm", _ramp(32, 32), extra=extra)
    assert _refusal(path).reason == reason


def test_rle_shape_disagreeing_with_rows_columns_is_refused(tmp_path):
    # RLE decoders trust Rows/Columns: segments longer than declared must not pass as a smaller slice.
    path = _write(tmp_path / "rle.dcm", _ramp(32, 32), transfer_syntax="rle")
    ds = pydicom.dcmread(path)
    ds.Rows = 16
    ds.save_as(path, enforce_file_format=True)
    assert _refusal(path).reason == RefusalReason.SHAPE_MISMATCH


@pytest.mark.parametrize(
    ("name", "rows"),
    [("MR_small_jp2klossless.dcm", 32), ("JPGExtended.dcm", 512)],
)
def test_codestream_size_disagreeing_with_rows_is_refused_before_decoding(name, rows, monkeypatch):
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Rows = rows
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    monkeypatch.setattr(
        "pydicom.dataset.Dataset.pixel_array",
        property(lambda self: pytest.fail("decoded despite a size mismatch")),
    )
    assert _refusal(buffer.getvalue()).reason == RefusalReason.SHAPE_MISMATCH


def test_missing_pixel_data_refused_but_header_readable(tmp_path):
    data = _write(tmp_path / "full.dcm", _ramp()).read_bytes()
    cut = data[: data.rindex(b"\xe0\x7f\x10\x00")]  # everything before the PixelData element
    assert _refusal(cut).reason == RefusalReason.NO_PIXEL_DATA
    assert read_header(cut).rows == 64  # the header scan never needs pixel data


def test_truncated_pixel_data_is_refused(tmp_path):
    data = _write(tmp_path / "full.dcm", _ramp()).read_bytes()
    assert _refusal(data[:-100]).reason == RefusalReason.TRUNCATED


def test_truncated_jpeg2000_is_refused(tmp_path):
    data = _write(tmp_path / "j2k.dcm", _ramp(), transfer_syntax="j2k_lossless").read_bytes()
    with pytest.raises(DicomReadError):
        read_slice(data[: len(data) - len(data) // 3])


def test_deflate_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    path = _write(tmp_path / "deflated.dcm", _ramp(), transfer_syntax="deflated_le")
    assert read_slice(path).hu.shape == (64, 48)
    from hemorrhage_core.dicom import reader

    monkeypatch.setattr(reader, "LIMITS", reader.ReadLimits(max_inflated_bytes=1000))
    assert _refusal(path).reason == RefusalReason.TOO_LARGE


def test_file_size_limit(tmp_path, monkeypatch):
    from hemorrhage_core.dicom import reader

    path = _write(tmp_path / "a.dcm", _ramp())
    monkeypatch.setattr(reader, "LIMITS", reader.ReadLimits(max_file_bytes=1024))
    assert _refusal(path).reason == RefusalReason.TOO_LARGE
    assert _refusal(path.read_bytes()).reason == RefusalReason.TOO_LARGE


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.dcm", RefusalReason.UNREADABLE),
        (lambda d: d, RefusalReason.UNREADABLE),
        (lambda d: (d / "empty.dcm", (d / "empty.dcm").write_bytes(b""))[0], RefusalReason.NOT_DICOM),
        (lambda d: (d / "text.dcm", (d / "text.dcm").write_text("hello " * 100))[0], RefusalReason.NOT_DICOM),
    ],
    ids=["missing", "directory", "empty", "text"],
)
def test_unusable_paths(tmp_path, make, reason):
    assert _refusal(make(tmp_path)).reason == reason


def test_wrong_source_type_is_a_type_error():
    with pytest.raises(TypeError):
        read_slice(12345)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# identifiers and pydicom's warnings


MARKERS = ("Zyxwv^Canary", "PID-CANARY-93", "CANARYHOSP")


def _canary_file(tmp_path: Path) -> bytes:
    path = _write(
        tmp_path / "canary.dcm",
        _ramp(),
        patient_id=MARKERS[1],
        extra={"PatientName": MARKERS[0], "InstitutionName": MARKERS[2], "NumberOfFrames": "1234567"},
    )
    # an invalid IS value, so that pydicom's validation warning quotes a raw header value
    return path.read_bytes().replace(b"1234567", b"9CANARY")


def test_messages_warnings_and_logs_never_carry_identifiers(tmp_path, caplog):
    data = _canary_file(tmp_path)
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        pydicom.dcmread(io.BytesIO(data)).NumberOfFrames  # noqa: B018
    assert any("9CANARY" in str(w.message) for w in direct), "control: pydicom does warn with the raw value"

    caplog.set_level(logging.DEBUG)
    texts = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for source in (data, data[:-10], data[: len(data) // 2]):
            for reader in (read_slice, read_header):
                with pytest.raises(DicomReadError) as info:
                    reader(source)
                texts.append("".join(traceback.format_exception(info.value)))  # message and chain
    texts += [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    for marker in MARKERS + ("9CANARY",):
        assert not any(marker in text for text in texts), marker


def test_meta_repr_hides_patient_id(tmp_path):
    meta = read_header(_write(tmp_path / "a.dcm", _ramp(), patient_id=MARKERS[1]))
    assert meta.patient_id == MARKERS[1]
    assert MARKERS[1] not in repr(meta)
    assert "patient" not in repr(meta).lower()
    assert set(meta.to_dict()) == set(SliceMeta.__dataclass_fields__)
