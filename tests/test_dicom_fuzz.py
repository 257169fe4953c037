"""Property tests: whatever the bytes, the reader returns a consistent slice or raises DicomReadError.

Random bytes, and real written slices (several transfer syntaxes, JPEG Lossless, JPEG Extended 12-bit
and JPEG-LS among them) mutated by bit flips, truncation, insertions, overwrites and edits of the header
values the reader trusts (Rows, Columns, bit depths, declared lengths, rescale, frame count). Any other
exception type fails the property, and so does an accepted slice whose HU are not finite or leave
``HU_RANGE``. A few crafted nasty files (deep nesting, many tiny elements, huge declared lengths) are
kept as explicit regression cases.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless

from hemorrhage_core.dicom import (
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

FUZZ_SETTINGS = settings(
    max_examples=120,
    deadline=None,  # no timing assertions: a shared 2-core machine is noisy
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WRITTEN_SYNTAXES = ("explicit_le", "explicit_be", "rle", "j2k_lossless", "deflated_le")
# Re-encoded from the explicit-VR seed here: the writer does not produce these.
JPEG_SYNTAXES = ("jpeg_lossless", "jpeg_12bit", "jpeg_ls")
SYNTAXES = WRITTEN_SYNTAXES + JPEG_SYNTAXES
PREAMBLE = b"\x00" * 128 + b"DICM"


def _slice_bytes(directory: Path, syntax: str) -> bytes:
    rng = np.random.default_rng(1)
    stored = rng.integers(-1024, 2000, size=(32, 32)).astype(np.int16)
    path = directory / f"{syntax}.dcm"
    write_ct_slice(
        path,
        stored,
        patient_id="FUZZ",
        study_uid=new_uid("fuzz-study"),
        series_uid=new_uid("fuzz-series"),
        sop_uid=new_uid(f"fuzz-{syntax}"),
        z=0.0,
        instance_number=1,
        window_center=[40, 80],
        window_width=[80, 200],
        transfer_syntax=syntax,
    )
    return path.read_bytes()


def _rewritten(data: bytes, edit) -> bytes:
    """``data`` read by pydicom, changed by ``edit(ds)``, written again (explicit VR little endian)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    with warnings.catch_warnings():  # pydicom warns about the invalid DS / IS values some edits write
        warnings.simplefilter("ignore")
        edit(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _jpeg_seed(explicit_le: bytes, syntax: str) -> bytes:
    """The explicit-VR seed's pixels re-encoded as JPEG Lossless SV1, 12-bit JPEG Extended or JPEG-LS."""

    def edit(ds: pydicom.Dataset) -> None:
        stored = ds.pixel_array
        if syntax == "jpeg_ls":
            ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
            return
        if syntax == "jpeg_lossless":
            codestream = imagecodecs.jpeg8_encode(stored.view(np.uint16), lossless=True, bitspersample=16)
            uid = JPEGLosslessSV1
        else:  # unsigned 12-bit, as lossy 12-bit CT is stored
            unsigned = (stored.astype(np.int32) + 1024).astype(np.uint16)
            codestream, uid = (
                imagecodecs.jpeg8_encode(unsigned, level=90, bitspersample=12),
                JPEGExtended12Bit,
            )
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, "-2048"
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid

    return _rewritten(explicit_le, edit)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("fuzz-seeds")
    written = {syntax: _slice_bytes(directory, syntax) for syntax in WRITTEN_SYNTAXES}
    jpeg = {syntax: _jpeg_seed(written["explicit_le"], syntax) for syntax in JPEG_SYNTAXES}
    plain = read_slice(written["explicit_le"]).hu
    np.testing.assert_array_equal(read_slice(jpeg["jpeg_lossless"]).hu, plain)  # the seeds are valid slices
    np.testing.assert_array_equal(read_slice(jpeg["jpeg_ls"]).hu, plain)
    assert np.abs(read_slice(jpeg["jpeg_12bit"]).hu - plain).max() < 64  # lossy (quality 90) on noise
    return written | jpeg


def _assert_only_dicom_read_error(data: bytes) -> None:
    """The property: a consistent result, or DicomReadError. Anything else propagates and fails."""
    try:
        result = read_slice(data)
    except DicomReadError as exc:
        assert str(exc)
    else:
        assert isinstance(result, CtSlice)
        assert result.hu.dtype == np.float32 and result.hu.ndim == 2
        assert result.hu.shape == (result.meta.rows, result.meta.columns)
        assert 0 < result.meta.rows <= 4096 and 0 < result.meta.columns <= 4096
        # an accepted slice always has finite HU within the stated bound
        assert np.isfinite(result.hu).all()
        assert HU_RANGE[0] <= result.hu.min() and result.hu.max() <= HU_RANGE[1]
    try:
        meta = read_header(data)
    except DicomReadError:
        pass
    else:
        assert isinstance(meta, SliceMeta)
        assert 0 < meta.rows <= 4096 and 0 < meta.columns <= 4096


# -------------------------------------------------------------------------------------------------
# random bytes


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _assert_only_dicom_read_error(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_behind_a_valid_preamble(data):
    _assert_only_dicom_read_error(PREAMBLE + data)


# -------------------------------------------------------------------------------------------------
# mutated real slices

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 256)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, position, *args in mutations:
        if not buf:
            break
        at = position % len(buf)
        if kind == "flip":
            buf[at] ^= 1 << args[0]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = args[0]
        elif kind == "overwrite":
            buf[at : at + len(args[0])] = args[0]
        elif kind == "delete":
            del buf[at : at + args[0]]
    return bytes(buf)


@FUZZ_SETTINGS
@given(syntax=st.sampled_from(SYNTAXES), mutations=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_slices(seeds, syntax, mutations):
    _assert_only_dicom_read_error(_mutate(seeds[syntax], mutations))


# Header values the reader relies on, as (group, element) of US elements in the explicit-VR files.
_US_TAGS = {
    "SamplesPerPixel": (0x0028, 0x0002),
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101),
    "HighBit": (0x0028, 0x0102),
    "PixelRepresentation": (0x0028, 0x0103),
}
_INTERESTING_US = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 64, 4095, 4096, 4097, 32768, 65535]
_INTERESTING_LENGTHS = [0, 1, 2, 3, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF]


def _set_us(data: bytes, endian: str, tag: tuple[int, int], value: int) -> bytes:
    key = struct.pack(f"{endian}HH", *tag) + b"US"
    at = data.find(key)
    assert at > 0, f"tag {tag} not found"
    return data[: at + 8] + struct.pack(f"{endian}H", value) + data[at + 10 :]


def _set_pixel_data_length(data: bytes, endian: str, length: int) -> bytes:
    key = struct.pack(f"{endian}HH", 0x7FE0, 0x0010)
    at = data.rfind(key)
    assert at > 0
    return data[: at + 8] + struct.pack(f"{endian}I", length) + data[at + 12 :]


@FUZZ_SETTINGS
@given(
    syntax=st.sampled_from(("explicit_le", "explicit_be", "rle", "j2k_lossless") + JPEG_SYNTAXES),
    edits=st.dictionaries(st.sampled_from(sorted(_US_TAGS)), st.sampled_from(_INTERESTING_US), min_size=1),
    pixel_length=st.none() | st.sampled_from(_INTERESTING_LENGTHS),
)
# Regression: pylibjpeg-rle panicked (pyo3 PanicException, not an Exception) on Rows below the encoded size.
@example(syntax="rle", edits={"Rows": 16}, pixel_length=None)
@example(syntax="rle", edits={"Rows": 4096, "Columns": 4096}, pixel_length=None)
@example(syntax="j2k_lossless", edits={"Rows": 16, "Columns": 64}, pixel_length=None)
@example(syntax="explicit_le", edits={"Rows": 4097}, pixel_length=0xFFFFFFF0)
def test_edited_header_values(seeds, syntax, edits, pixel_length):
    endian = ">" if syntax == "explicit_be" else "<"
    data = seeds[syntax]
    for keyword, value in edits.items():
        data = _set_us(data, endian, _US_TAGS[keyword], value)
    if pixel_length is not None:
        data = _set_pixel_data_length(data, endian, pixel_length)
    _assert_only_dicom_read_error(data)


# Rescale and frame-count values that a real archive can hold, sensible or not.
_RESCALE_VALUES = [
    "0", "-0", "0.0", "1", "-1", "10", "1000", "1e-30", "1e30", "1e400", "-1e400",
    "NaN", "nan", "inf", "-inf", "Infinity", "-1024", "-10240", "-65536", "65536", "1e9", "",
]  # fmt: skip
_FRAME_VALUES = ["0", "-1", "1", "2", "", "1.5"]


def _is_zero_or_not_finite(text: str | None) -> bool:
    value = float(text) if text else 1.0
    return value == 0 or not math.isfinite(value)


@FUZZ_SETTINGS
@given(
    syntax=st.sampled_from(("explicit_le", "rle", "jpeg_lossless", "jpeg_12bit", "jpeg_ls")),
    slope=st.none() | st.sampled_from(_RESCALE_VALUES),
    intercept=st.none() | st.sampled_from(_RESCALE_VALUES),
    frames=st.none() | st.sampled_from(_FRAME_VALUES),
)
@example(syntax="explicit_le", slope="0", intercept=None, frames=None)
@example(syntax="explicit_le", slope="1e30", intercept=None, frames=None)  # overflows float32
@example(syntax="jpeg_lossless", slope=None, intercept="1e9", frames=None)
@example(syntax="explicit_le", slope=None, intercept=None, frames="0")
def test_edited_rescale_and_frame_count(seeds, syntax, slope, intercept, frames):
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
            if value is not None:
                setattr(ds, keyword, value)
        if frames is not None:
            ds.NumberOfFrames = frames
        elif "NumberOfFrames" in ds:
            del ds.NumberOfFrames

    data = _rewritten(seeds[syntax], edit)
    _assert_only_dicom_read_error(data)
    if frames in ("0", "-1"):  # a frame count other than 1, refused from the header alone
        with pytest.raises(DicomRefusal) as info:
            read_header(data)
        assert info.value.reason == RefusalReason.MALFORMED and "frame count other than 1" in str(info.value)
    elif frames in (None, "", "1") and _is_zero_or_not_finite(slope):
        with pytest.raises(DicomRefusal) as info:
            read_slice(data)
        assert info.value.reason == RefusalReason.BAD_RESCALE
        assert "slope zero or not finite" in str(info.value)


# -------------------------------------------------------------------------------------------------
# crafted nasty files


def _explicit_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _file_meta() -> bytes:
    transfer_syntax = b"1.2.840.10008.1.2.1\x00"
    body = _explicit_element(0x0002, 0x0010, b"UI", transfer_syntax)
    return PREAMBLE + _explicit_element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def test_deeply_nested_sequences_are_refused():
    opening = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    data = _file_meta() + (opening + item) * 5000
    with pytest.raises(DicomReadError):
        read_slice(data)
    with pytest.raises(DicomReadError):
        read_header(data)


def test_element_bomb_of_tiny_elements_is_refused():
    tiny = b"".join(_explicit_element(0x0009, 0x1000 + i % 0xEFFF, b"LO", b"ab") for i in range(50_000))
    data = _file_meta() + tiny
    with pytest.raises(DicomReadError):
        read_slice(data)


def test_huge_declared_length_before_pixels_is_refused(seeds):
    # A 4 GiB private OB element in a small file: the reader must not try to allocate it.
    bomb = struct.pack("<HH", 0x0009, 0x0010) + b"OB\x00\x00" + struct.pack("<I", 0xFFFFFFF0) + b"x" * 64
    meta_end = seeds["explicit_le"].find(b"\x08\x00")  # first element of the data set (group 0008)
    data = seeds["explicit_le"][:meta_end] + bomb + seeds["explicit_le"][meta_end:]
    with pytest.raises(DicomReadError):
        read_slice(data)


def test_huge_declared_length_in_a_file_on_disk(seeds, tmp_path):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(_set_pixel_data_length(seeds["explicit_le"], "<", 0xFFFFFFF0))
    with pytest.raises(DicomReadError):
        read_slice(path)
    assert read_header(path).rows == 32  # the header alone is intact


def test_oversized_file_meta_is_refused():
    huge = struct.pack("<HH", 0x0002, 0x0100) + b"OB\x00\x00" + struct.pack("<I", 0x7FFFFFF0)
    data = _file_meta() + huge + b"\x00" * 70_000
    with pytest.raises(DicomReadError):
        read_slice(data)
    with pytest.raises(DicomReadError):
        read_header(data)
