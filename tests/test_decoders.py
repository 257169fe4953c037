"""Compressed pixel data: the decoders the reader uses, and every file of pydicom's test data through them.

For every single-frame greyscale image among ``pydicom.data.get_testdata_files()`` (the files shipped
with pydicom, plus pydicom-data's when that package is installed; nothing is downloaded), the reader's
HU equal pydicom's own decoding (its ``pixel_array``, with the plugin pydicom itself would choose)
with the modality LUT applied: exactly for lossless transfer syntaxes, within ``LOSSY_TOLERANCE``
stored values for lossy ones (two decoders of one lossy codestream may round the inverse transform
differently). A greyscale single frame that is damaged is refused for the reason ``DAMAGED`` states.
Every other file is refused for the reason its header shows: not DICOM, not an image, multi-frame,
colour or an unsupported bit depth (``expected_refusal``, read with pydicom, independently of the
reader's checks).

Then the decoders themselves: one pinned permissive plugin per compressed syntax, GPL
``pylibjpeg-libjpeg`` absent, licences as the README states, and round trips of known pixels through
JPEG Lossless (every predictor), JPEG Extended 12-bit and JPEG-LS (lossless and near-lossless).
"""

from __future__ import annotations

import io
import os
import warnings
from importlib.metadata import PackageNotFoundError, metadata
from importlib.util import find_spec
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from hemorrhage_core.dicom import (
    DicomRefusal,
    RefusalReason,
    new_uid,
    read_header,
    read_slice,
    write_ct_slice,
)
from hemorrhage_core.dicom import reader as dicom_reader

DATA_ROOT = Path(pydicom.data.__file__).parent
ALL_FILES = sorted(f for f in get_testdata_files() if os.path.isfile(f))

# Lossy transfer syntaxes: the only ones where the reader's decoder and pydicom's may differ, by at
# most this many stored values (the inverse DCT / wavelet rounding of two implementations).
LOSSY_SYNTAXES = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLSNearLossless,
        JPEG2000,
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
LOSSY_TOLERANCE = 1

# Greyscale single frames that pydicom's test data ship damaged on purpose, and why they are refused.
DAMAGED: dict[str, tuple[RefusalReason, str]] = {
    "MR_truncated.dcm": (RefusalReason.TRUNCATED, "the pixel data end early"),
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        RefusalReason.SHAPE_MISMATCH,
        "its JPEG 2000 codestream declares 1024 x 3.7e9 pixels; pydicom cannot decode it either",
    ),
    # not an image either way: pydicom's lenient header read passes the cut, the reader's parse does not
    "rtplan_truncated.dcm": (RefusalReason.MALFORMED, "an RT Plan cut short inside its data set"),
}
_COLOUR = {"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}


def _label(path: str) -> str:
    return os.path.relpath(path, DATA_ROOT) if path.startswith(str(DATA_ROOT)) else Path(path).name


def _dataset(path: str, **kwargs) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, **kwargs)
    except Exception:
        return None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def expected_refusal(path: str) -> RefusalReason | None:
    """What pydicom's reading of the header says the file is, as the refusal it calls for.

    None: a single-frame greyscale image of a supported bit depth, which must be read (unless DAMAGED).
    """
    ds = _dataset(path, stop_before_pixels=True)
    if ds is None:
        return RefusalReason.NOT_DICOM
    sop_class = str(ds.get("SOPClassUID", ""))
    registered = UID(sop_class).name if sop_class and UID(sop_class).name != sop_class else None
    if registered is not None and "Image" not in registered:  # e.g. RT Plan, SR, Segmentation
        return RefusalReason.NOT_IMAGE
    if "Rows" not in ds or "Columns" not in ds:  # an image class without them is a damaged header
        return RefusalReason.MALFORMED if registered is not None else RefusalReason.NOT_IMAGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ds.get("NumberOfFrames")
    frames = 1 if frames in (None, "") else _int(frames)
    if frames is None or frames < 1:
        return RefusalReason.MALFORMED
    if frames > 1:
        return RefusalReason.MULTI_FRAME
    if ds.get("SamplesPerPixel") != 1 or ds.get("PhotometricInterpretation") in _COLOUR:
        return RefusalReason.COLOUR
    if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return RefusalReason.MALFORMED
    bits_allocated, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits_allocated not in (8, 16) or not 1 <= (bits_stored or 0) <= bits_allocated:
        return RefusalReason.UNSUPPORTED_BITS
    with_pixels = _dataset(path, specific_tags=["PixelData"])
    if with_pixels is not None and "PixelData" not in with_pixels:
        return RefusalReason.NO_PIXEL_DATA
    return None


def _transfer_syntax(path: str) -> str:
    ds = _dataset(path, stop_before_pixels=True)
    if ds is None or "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        return "(none)"
    return str(ds.file_meta.TransferSyntaxUID)


def pydicom_hu(path: str) -> np.ndarray:
    """pydicom's own decoding with the modality LUT applied; MONOCHROME1 inverted within the stored range
    first, as the reader documents (higher is brighter for both photometric interpretations)."""
    ds = _dataset(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = ds.pixel_array
    if ds.PhotometricInterpretation == "MONOCHROME1":
        wide = stored.astype(np.int32)
        stored = (-1 - wide) if ds.PixelRepresentation == 1 else ((1 << ds.BitsStored) - 1 - wide)
    rsna_quirk = ds.get("Modality") == "CT" and ds.BitsStored == 12 and ds.PixelRepresentation == 0
    assert not (rsna_quirk and float(ds.get("RescaleIntercept", 0)) > -100), "the RSNA fix applies here"
    return apply_modality_lut(stored, ds).astype(np.float32)


def _slope(path: str) -> float:
    value = _dataset(path, stop_before_pixels=True).get("RescaleSlope", 1)
    return abs(float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value))


def outcome(path: str) -> str:
    """'exact', 'within tolerance' or the refusal reason code: what the reader did, checked."""
    name = Path(path).name
    reason = DAMAGED[name][0] if name in DAMAGED else expected_refusal(path)
    if reason is not None:
        with pytest.raises(DicomRefusal) as info:
            read_slice(path)
        assert info.value.reason == reason, f"{_label(path)}: {info.value.reason} ({info.value})"
        assert str(info.value) and "\n" not in str(info.value)
        return str(reason)
    hu = read_slice(path).hu
    reference = pydicom_hu(path)
    assert hu.dtype == np.float32 and hu.shape == reference.shape
    if _transfer_syntax(path) not in LOSSY_SYNTAXES or np.array_equal(hu, reference):
        np.testing.assert_array_equal(hu, reference)
        return "exact"
    np.testing.assert_allclose(hu, reference, rtol=1e-6, atol=LOSSY_TOLERANCE * _slope(path))
    return "within tolerance"


@pytest.mark.parametrize("path", ALL_FILES, ids=_label)
def test_pydicom_test_file_matches_pydicom_or_is_refused_for_its_reason(path):
    outcome(path)


def test_every_newly_supported_syntax_is_read_from_pydicom_test_data():
    # The files that were refused with "no decoder is installed" before imagecodecs and pyjpegls.
    for name in ("MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm"):
        assert outcome(get_testdata_file(name)) == "exact", name
    # 12-bit JPEG Extended: pydicom has no permissive decoder for it, so this is the reader's plugin;
    # the values pydicom's own reference tests pin for this file.
    hu = read_slice(get_testdata_file("JPGExtended.dcm")).hu
    assert (hu[420, 140], hu[230, 120]) == (244.0, 95.0)
    # pydicom calls JPEG-lossy.dcm a "bad JPEG" (scan end 0, not 63): libjpeg-turbo reads it as JPGExtended.
    np.testing.assert_array_equal(read_slice(get_testdata_file("JPEG-lossy.dcm")).hu, hu)


# -------------------------------------------------------------------------------------------------
# the decoders


# package -> the licence its PyPI metadata declares (README "DICOM decoders" lists the same)
DECODER_LICENCES = {
    "pydicom": "MIT",
    "pylibjpeg": "MIT",
    "pylibjpeg-openjpeg": "MIT",
    "pylibjpeg-rle": "MIT",
    "pyjpegls": "MIT",
    "imagecodecs": "BSD-3-Clause",
    "pillow": "MIT-CMU",
}


def _declared_licence(package: str) -> str:
    meta = metadata(package)
    texts = [meta.get("License-Expression") or "", meta.get("License") or ""]
    texts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " | ".join(t for t in texts if t)


@pytest.mark.parametrize("package", sorted(DECODER_LICENCES))
def test_decoder_packages_are_permissively_licensed(package):
    declared = _declared_licence(package)
    assert DECODER_LICENCES[package] in declared or (
        DECODER_LICENCES[package] == "MIT" and "MIT License" in declared
    ), declared
    assert "GPL" not in declared and "General Public" not in declared


def test_the_gpl_libjpeg_plugin_is_not_installed():
    # pylibjpeg-libjpeg (GPL-3) would make the distribution GPL; its module is `libjpeg`.
    with pytest.raises(PackageNotFoundError):
        metadata("pylibjpeg-libjpeg")
    assert find_spec("libjpeg") is None
    for syntax in (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless):
        assert "pylibjpeg" not in get_decoder(syntax).available_plugins


@pytest.mark.parametrize("syntax", sorted(dicom_reader._DECODING_PLUGINS), ids=lambda uid: UID(uid).name)
def test_every_compressed_syntax_has_its_pinned_decoder_installed_for_pydicom(syntax):
    assert dicom_reader._DECODING_PLUGINS[syntax] in get_decoder(syntax).available_plugins


def test_a_crashing_decoder_installed_beside_the_pinned_one_is_never_called(monkeypatch):
    # As python-gdcm would be if a user installed it: pydicom prefers it, and it aborts the process on
    # some damaged JPEG lossless codestreams. The reader asks for its pinned plugin only.
    def crash(src, runner):
        pytest.fail("an unpinned decoder was called")

    for syntax in (JPEGLSLossless, JPEGExtended12Bit):
        decoder = get_decoder(syntax)
        monkeypatch.setattr(decoder, "_available", {"crashing": crash, **decoder._available})
    assert read_slice(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).hu.shape == (64, 64)
    assert read_slice(get_testdata_file("JPGExtended.dcm")).hu.shape == (1024, 256)


def test_a_missing_pinned_decoder_is_refused_naming_the_package(monkeypatch):
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(
        decoder, "_available", {k: v for k, v in decoder._available.items() if k != "pyjpegls"}
    )
    with pytest.raises(DicomRefusal) as info:
        read_slice(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    assert info.value.reason == RefusalReason.NO_DECODER
    assert "install pyjpegls" in str(info.value)


# -------------------------------------------------------------------------------------------------
# round trips of known pixels


def _ramp(rows: int = 48, columns: int = 40, low: int = -1024, high: int = 3000) -> np.ndarray:
    values = np.linspace(low, high, rows * columns).round().astype(np.int16).reshape(rows, columns)
    values[::7, ::5] = low  # edges, so that the lossy codecs have something to smooth
    return values


def _compressed(
    tmp_path: Path, stored: np.ndarray, syntax: str, codestream: bytes | None, **overrides
) -> bytes:
    """A CT slice of ``stored`` written by the project's writer, its pixels replaced by ``codestream``
    (or compressed by pydicom's own encoder when None)."""
    path = tmp_path / "plain.dcm"
    write_ct_slice(
        path, stored, patient_id="DECODERS", study_uid=new_uid("dec-study"), series_uid=new_uid("dec-series"),
        sop_uid=new_uid(f"dec-{syntax}"), z=0.0, instance_number=1, **overrides,
    )  # fmt: skip
    ds = pydicom.dcmread(path)
    if codestream is None:
        ds.compress(
            syntax, generate_instance_uid=False, **({"jls_error": 2} if syntax == JPEGLSNearLossless else {})
        )
    else:
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("predictor", range(1, 8))
def test_jpeg_lossless_round_trips_every_predictor_exactly(tmp_path, predictor):
    stored = _ramp()
    codestream = imagecodecs.jpeg8_encode(
        stored.view(np.uint16), lossless=True, predictor=predictor, bitspersample=16
    )
    syntax = JPEGLosslessSV1 if predictor == 1 else JPEGLossless
    data = _compressed(tmp_path, stored, syntax, codestream)
    np.testing.assert_array_equal(read_slice(data).hu, stored.astype(np.float32) - 1024)


def test_rsna_12bit_fix_applies_to_jpeg_lossless_slices_too(tmp_path):
    # The RSNA quirk (unsigned 12-bit wrapped values, intercept 0) survives a lossless re-encoding.
    hu = _ramp(low=-1000)  # the quirk's fix reads [-1000, 3095]
    stored = np.mod(hu.astype(np.int32), 4096).astype(np.uint16)
    codestream = imagecodecs.jpeg8_encode(stored, lossless=True, bitspersample=12)
    data = _compressed(
        tmp_path,
        stored,
        JPEGLosslessSV1,
        codestream,
        bits_stored=12,
        pixel_representation=0,
        rescale_intercept=0.0,
    )
    np.testing.assert_array_equal(read_slice(data).hu, hu.astype(np.float32))


def test_jpeg_extended_12bit_matches_pydicom_exactly_and_the_original_closely(tmp_path):
    stored = (_ramp() + 1024).astype(np.uint16)  # lossy 12-bit CT is stored unsigned
    codestream = imagecodecs.jpeg8_encode(stored, level=95, bitspersample=12)
    data = _compressed(
        tmp_path, stored, JPEGExtended12Bit, codestream, bits_stored=12, pixel_representation=0
    )
    hu = read_slice(data).hu
    reference = apply_modality_lut(
        pydicom.dcmread(io.BytesIO(data)).pixel_array, pydicom.dcmread(io.BytesIO(data))
    )
    np.testing.assert_array_equal(hu, reference.astype(np.float32))
    error = np.abs(hu - (stored.astype(np.float32) - 1024))
    assert error.mean() < 4 and error.max() < 64  # quality 95 on a ramp with sharp dots


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLSNearLossless], ids=["lossless", "near-lossless"])
def test_jpeg_ls_round_trips_within_its_declared_error(tmp_path, syntax):
    stored = _ramp()
    data = _compressed(tmp_path, stored, syntax, None)
    error = np.abs(read_slice(data).hu - (stored.astype(np.float32) - 1024))
    assert error.max() <= (2 if syntax == JPEGLSNearLossless else 0)  # NEAR = 2: JPEG-LS's guarantee


def test_header_reads_of_compressed_files_never_decode(tmp_path, monkeypatch):
    stored = _ramp()
    data = _compressed(
        tmp_path,
        stored,
        JPEGLosslessSV1,
        imagecodecs.jpeg8_encode(stored.view(np.uint16), lossless=True, bitspersample=16),
    )
    monkeypatch.setattr(
        "pydicom.dataset.Dataset.pixel_array",
        property(lambda self: pytest.fail("a header read decoded pixels")),
    )
    assert read_header(data).rows == 48
