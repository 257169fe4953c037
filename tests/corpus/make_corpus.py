"""(Re)create the DICOM regression corpus: the nastiest inputs as small files, plus README.md.

    python tests/corpus/make_corpus.py [OUT_DIR]      # default: this script's folder

Every file is built from fixed bytes (no clock, no random UIDs, a fixed implementation UID and version
name), so running the script again rewrites the same bytes; ``tests/test_corpus.py`` checks that and
runs every file through the reader, ``inspect``, ``predict`` and the dashboard's upload path. ``CASES``
is the single list of files and what must happen to each; README.md is written from it.

Expectations: ``reader``/``header`` is ``"ok"`` or the ``RefusalReason`` code that ``read_slice`` /
``read_header`` must raise; ``hu`` maps the phantom's HU to the HU the reader must return; ``predict``
is ``"ok"`` (probabilities, no flags), ``"flag:<code>,..."`` (probabilities and exactly these flags) or
``"refuse"`` (an error message instead of probabilities); ``says``, when given, is a phrase the
refusal's message must contain.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

SIZE = 32
ROOT = "1.2.826.0.1.3680043.8.498.77"  # pydicom's UID root + a fixed suffix: no clock, no entropy
IMPLEMENTATION_UID = f"{ROOT}.1"
IMPLEMENTATION_VERSION = "HEMCT_CORPUS_1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def head_hu() -> np.ndarray:
    """A 32 x 32 axial head in integer HU: air, a bone ring, textured brain, a ventricle, a bleed.

    The 4-pixel border is all air, so a sign flip turns the border bright (the Predictor's check).
    """
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    hu = np.full((SIZE, SIZE), -1000, np.int16)
    hu[r < 12] = 1000  # skull
    brain = r < 10
    texture = (np.arange(SIZE)[:, None] * 3 + np.arange(SIZE)[None, :] * 5) % 11
    hu[brain] = (30 + texture)[brain]
    hu[(np.abs(yy) < 2) & (np.abs(xx) < 3)] = 8  # ventricle (CSF)
    hu[np.hypot(yy - 4, xx - 5) < 2.5] = 70  # intraparenchymal bleed
    return hu


# ------------------------------------------------------------------------------------------ encoding
def _ct(stored: np.ndarray | None = None, **attributes) -> Dataset:
    """A complete single-frame CT header over ``stored`` (default: the phantom + 1024, int16)."""
    if stored is None:
        stored = (head_hu() + 1024).astype(np.int16)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{ROOT}.2.1"
    ds.PatientName = "Corpus^Phantom"
    ds.PatientID = "CORPUS"
    ds.StudyInstanceUID = f"{ROOT}.3.1"
    ds.SeriesInstanceUID = f"{ROOT}.4.1"
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-7.2, -7.2, 10.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.45, 0.45]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.BitsStored = 8 * stored.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The Part 10 bytes of ``ds`` in ``syntax`` (native, deflated or RLE)."""
    ds = ds.copy()
    if syntax == RLELossless:
        ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    if syntax == ExplicitVRBigEndian and "PixelData" in ds and ds.BitsAllocated == 16:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    ds.file_meta = _file_meta(ds, syntax)
    out = io.BytesIO()
    pydicom.dcmwrite(
        out,
        ds,
        implicit_vr=False,
        little_endian=syntax != ExplicitVRBigEndian,
        enforce_file_format=True,
    )
    return out.getvalue()


def _file_meta(ds: Dataset, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", f"{ROOT}.2.1")
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _encapsulated(ds: Dataset, syntax: str, codestream: bytes) -> bytes:
    """``ds`` with ``codestream`` as its one encapsulated frame, in ``syntax``."""
    ds = ds.copy()
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta = _file_meta(ds, syntax)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _jpeg_lossless(stored: np.ndarray, predictor: int = 1) -> bytes:
    """A JPEG lossless codestream (ITU-T T.81 annex H, process 14) of 16-bit ``stored``.

    Written here rather than by a library so that the corpus bytes never change with an encoder's
    version. One Huffman table, every difference category (0-16) a 5-bit code; signed values are
    coded as their 16-bit two's-complement patterns, as DICOM stores them. Checked against three
    independent decoders (libjpeg-turbo, liblj92, jpegsof3) for all seven predictors.
    """
    rows, columns = stored.shape
    x = stored.astype(np.int64) & 0xFFFF
    ra, rb, rc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    predictions = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }
    prediction = predictions[predictor].copy()
    prediction[0, 1:] = x[0, :-1]  # first row: the left neighbour, whatever the predictor (H.1.2.1)
    prediction[1:, 0] = x[:-1, 0]  # first column: the sample above
    prediction[0, 0] = 1 << 15  # first sample: 2 ** (P - 1)
    differences = ((x - prediction) % 65536).ravel().tolist()

    scan, accumulator, pending = bytearray(), 0, 0

    def put(value: int, length: int) -> None:
        nonlocal accumulator, pending
        accumulator = (accumulator << length) | (value & ((1 << length) - 1))
        pending += length
        while pending >= 8:
            pending -= 8
            byte = (accumulator >> pending) & 0xFF
            scan.extend((byte, 0) if byte == 0xFF else (byte,))  # byte stuffing
        accumulator &= (1 << pending) - 1

    for difference in differences:
        if difference == 32768:  # category 16 carries no extra bits
            put(16, 5)
            continue
        difference = difference - 65536 if difference > 32768 else difference
        category = abs(difference).bit_length()
        put(category, 5)
        if category:
            put(difference if difference > 0 else difference + (1 << category) - 1, category)
    if pending:
        put(0xFF, 8 - pending)  # pad the last byte with 1 bits
    frame = struct.pack(">BHHB", 16, rows, columns, 1) + b"\x01\x11\x00"
    table = b"\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    return (
        b"\xff\xd8"
        + b"\xff\xc3"
        + struct.pack(">H", 2 + len(frame))
        + frame
        + b"\xff\xc4"
        + struct.pack(">H", 2 + len(table))
        + table
        + b"\xff\xda"
        + struct.pack(">HB", 8, 1)
        + b"\x01\x00"
        + bytes([predictor, 0, 0])
        + bytes(scan)
        + b"\xff\xd9"
    )


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _raw_file(syntax: str, dataset: bytes) -> bytes:
    """Preamble, a minimal file meta group and ``dataset`` bytes as they are (for hand-made data sets)."""
    body = _element(0x0002, 0x0010, b"UI", syntax.encode() + b"\0" * (len(syntax) % 2))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


def _find_element(data: bytes, group: int, element: int, endian: str = "<") -> int:
    """Offset of the (last) element with this tag; the corpus files are small and tags unique."""
    at = data.rfind(struct.pack(f"{endian}HH", group, element))
    if at < 0:
        raise LookupError(f"({group:04X},{element:04X}) not found")
    return at


def _png_bytes() -> bytes:
    """A real 8 x 8 greyscale PNG (stored, uncompressed zlib blocks: the same bytes everywhere)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    rows = b"".join(b"\0" + bytes(range(r * 8, r * 8 + 8)) for r in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows, 0))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------- cases
def _baseline() -> bytes:
    return _encode(_ct())


def _monochrome1() -> bytes:
    # The reader inverts MONOCHROME1 within the stored range: signed stored s -> -1 - s.
    stored = (-1 - (head_hu().astype(np.int32) + 1024)).astype(np.int16)
    return _encode(_ct(stored, PhotometricInterpretation="MONOCHROME1"))


def _rsna_12bit() -> bytes:
    # RSNA 2019: unsigned 12-bit pixels that wrapped; HU = ((stored + 1000) mod 4096) - 1000.
    stored = np.mod(head_hu().astype(np.int32), 4096).astype(np.uint16)
    return _encode(
        _ct(
            stored,
            BitsStored=12,
            HighBit=11,
            RescaleIntercept="0",
            WindowCenter=["40", "40"],
            WindowWidth=["80", "80"],
        )
    )


def _rows_columns(rows: int, columns: int) -> Callable[[], bytes]:
    return lambda: _encode(_ct(Rows=rows, Columns=columns))


def _bits(allocated: int, stored: int, representation: int) -> Callable[[], bytes]:
    return lambda: _encode(
        _ct(
            BitsAllocated=allocated,
            BitsStored=stored,
            HighBit=max(stored - 1, 0),
            PixelRepresentation=representation,
        )
    )


def _bits_allocated_32() -> bytes:
    stored = (head_hu() + 1024).astype(np.int32)
    return _encode(_ct(stored))


def _colour(photometric: str) -> Callable[[], bytes]:
    def build() -> bytes:
        grey = np.clip((head_hu() + 1000) // 8, 0, 255).astype(np.uint8)
        if photometric == "PALETTE COLOR":
            ds = _ct(grey, PhotometricInterpretation=photometric, RescaleIntercept=None, RescaleSlope=None)
            ramp = np.arange(256, dtype="<u2") * 257
            for colour in ("Red", "Green", "Blue"):
                setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
                setattr(ds, f"{colour}PaletteColorLookupTableData", ramp.tobytes())
            return _encode(ds)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        ds = _ct(
            rgb,
            PhotometricInterpretation=photometric,
            SamplesPerPixel=3,
            PlanarConfiguration=0,
            RescaleIntercept=None,
            RescaleSlope=None,
        )
        return _encode(ds)

    return build


def _frames(declared: str, stored_frames: int) -> Callable[[], bytes]:
    def build() -> bytes:
        frame = (head_hu() + 1024).astype("<i2").tobytes()
        ds = _ct(NumberOfFrames=declared)
        ds.PixelData = frame * stored_frames
        return _encode(ds)

    return build


def _nested_sequences() -> bytes:
    # 1000 levels of undefined-length sequence items, never closed: pydicom recurses per level.
    opening = _element(0x0008, 0x1115, b"SQ", b"")[:8] + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    return _raw_file(ExplicitVRLittleEndian, b"") + (opening + item) * 1000


def _huge_private_length() -> bytes:
    # A private OB element declaring 4 GiB before the image elements, in a 2 KB file.
    data = _baseline()
    at = _find_element(data, 0x0008, 0x0005)  # first element of the data set
    bomb = struct.pack("<HH", 0x0009, 0x0010) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFF0) + b"x" * 64
    return data[:at] + bomb + data[at:]


def _huge_pixel_length() -> bytes:
    data = _baseline()
    at = _find_element(data, 0x7FE0, 0x0010)
    return data[: at + 8] + struct.pack("<I", 0xFFFFFFF0) + data[at + 12 :]


def _element_bomb() -> bytes:
    # One million empty private elements, deflated (8 MB -> 12 KB): the amplification is the point.
    dataset = (struct.pack("<HH", 0x0009, 0x1010) + b"LO\0\0") * 1_000_000
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return _raw_file(DeflatedExplicitVRLittleEndian, b"") + deflater.compress(dataset) + deflater.flush()


def _truncated_pixels() -> bytes:
    data = _baseline()
    return data[: len(data) - SIZE * SIZE]  # half of the 16-bit pixel data is missing


def _truncated_header() -> bytes:
    data = _baseline()
    return data[: _find_element(data, 0x0028, 0x0010) + 5]  # cut inside the Rows element


def _bit_flipped_header() -> bytes:
    # Flip the top bit of the StudyInstanceUID's 2-byte length: the parser lands 32 KiB further on.
    data = bytearray(_baseline())
    at = _find_element(bytes(data), 0x0020, 0x000D)
    data[at + 7] ^= 0x80
    return bytes(data)


def _jpeg_codestream_bomb() -> bytes:
    # A JPEG whose frame header claims 65000 x 65000 under a 32 x 32 DICOM header.
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65000, 65000, 1) + b"\x01\x11\x00"
    codestream = b"\xff\xd8" + sof + b"\xff\xd9"
    ds = _ct(np.zeros((SIZE, SIZE), np.uint8), RescaleIntercept=None, RescaleSlope=None)
    return _encapsulated(ds, JPEGBaseline8Bit, codestream)


def _j2k_codestream_bomb() -> bytes:
    # A JPEG 2000 SIZ segment declaring 60000 x 60000 pixels under a 32 x 32 DICOM header.
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 60000, 60000, 0, 0, 60000, 60000, 0, 0, 1) + b"\x0f\x01\x01"
    codestream = b"\xff\x4f\xff\x51" + siz + b"\xff\xd9"
    ds = _ct(np.zeros((SIZE, SIZE), np.int16))
    return _encapsulated(ds, JPEG2000Lossless, codestream)


def _structured_report() -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = f"{ROOT}.2.2"
    ds.PatientID = "CORPUS"
    ds.StudyInstanceUID = f"{ROOT}.3.1"
    ds.SeriesInstanceUID = f"{ROOT}.4.2"
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.TextValue = "No intracranial haemorrhage."
    ds.ContentSequence = Sequence([text])
    return _encode(ds)


def _mr_slice() -> bytes:
    return _encode(_ct(SOPClassUID=MR_IMAGE_STORAGE, Modality="MR", RescaleIntercept=None, RescaleSlope=None))


def _sign_flipped() -> bytes:
    # HU = stored x (-1) + 1024 = -(phantom HU): the rescale's sign is wrong.
    return _encode(_ct(RescaleSlope="-1", RescaleIntercept="1024"))


def _missing_rescale() -> bytes:
    # RescaleIntercept dropped: the stored values (HU + 1024, air near 0) come out as HU.
    return _encode(_ct(RescaleIntercept=None))


def _no_pixel_data() -> bytes:
    return _encode(_ct(PixelData=None))


def _big_endian() -> bytes:
    return _encode(_ct(), ExplicitVRBigEndian)


def _rle() -> bytes:
    return _encode(_ct(), RLELossless)


def _deflated() -> bytes:
    return _encode(_ct(), DeflatedExplicitVRLittleEndian)


def _jpeg_lossless_slice(syntax: str, predictor: int) -> Callable[[], bytes]:
    def build() -> bytes:
        stored = (head_hu() + 1024).astype(np.int16)
        return _encapsulated(_ct(stored), syntax, _jpeg_lossless(stored, predictor))

    return build


def _jpeg_lossless_truncated() -> bytes:
    stored = (head_hu() + 1024).astype(np.int16)
    codestream = _jpeg_lossless(stored)
    return _encapsulated(_ct(stored), JPEGLosslessSV1, codestream[: len(codestream) // 2])


def _jpeg_lossless_file_cut() -> bytes:
    data = _jpeg_lossless_slice(JPEGLosslessSV1, 1)()
    return data[: len(data) - 500]  # the file ends inside the encapsulated pixel data


def _rescale(**values: str) -> Callable[[], bytes]:
    def build() -> bytes:
        with warnings.catch_warnings():  # pydicom warns that NaN / inf are not valid DS values
            warnings.simplefilter("ignore")
            return _encode(_ct(**values))

    return build


def _empty_file() -> bytes:
    return b""


def _text_file() -> bytes:
    return b"This is a plain text file, not a DICOM image.\n" * 8


@dataclass(frozen=True)
class HuRule:
    """What the reader must return for an accepted file, as a function of the phantom's HU."""

    text: str
    apply: Callable[[np.ndarray], np.ndarray]


PHANTOM = HuRule("HU = the phantom's", lambda hu: hu)
NEGATED = HuRule("HU = minus the phantom's", lambda hu: -hu)
STORED = HuRule("HU = the phantom's + 1024 (the stored values)", lambda hu: hu + 1024)


@dataclass(frozen=True)
class Case:
    """One corpus file and what every consumer must do with it (see the module docstring)."""

    name: str
    what: str
    build: Callable[[], bytes]
    reader: str
    header: str
    predict: str
    hu: HuRule | None = None
    says: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reader == "ok"

    @property
    def expected_flags(self) -> list[str]:
        return self.predict.removeprefix("flag:").split(",") if self.predict.startswith("flag:") else []


# One row per file: name, what it is, builder; read_slice, read_header, predict; HU rule (accepted files)
# or the phrase the refusal must say.
# fmt: off
CASES: tuple[Case, ...] = (
    # accepted by the reader
    Case("ok-baseline.dcm", "plain 16-bit signed CT slice, explicit VR little endian", _baseline,
         "ok", "ok", "ok", PHANTOM),
    Case("ok-monochrome1.dcm", "MONOCHROME1 (inverted greyscale) CT slice", _monochrome1,
         "ok", "ok", "ok", PHANTOM),
    Case("ok-big-endian.dcm", "explicit VR big endian (retired syntax, still read)", _big_endian,
         "ok", "ok", "ok", PHANTOM),
    Case("ok-rle.dcm", "RLE Lossless compressed slice", _rle,
         "ok", "ok", "ok", PHANTOM),
    Case("ok-deflated.dcm", "deflated explicit VR little endian", _deflated,
         "ok", "ok", "ok", PHANTOM),
    Case("ok-rsna-12bit.dcm", "RSNA 2019 quirk: unsigned 12-bit wrapped pixels, intercept 0, multi-valued window",
         _rsna_12bit, "ok", "ok", "ok", PHANTOM),
    Case("ok-jpeg-lossless.dcm", "JPEG Lossless, first-order prediction (process 14 SV1), 16-bit signed",
         _jpeg_lossless_slice(JPEGLosslessSV1, 1), "ok", "ok", "ok", PHANTOM),
    Case("ok-jpeg-lossless-p14.dcm", "JPEG Lossless (process 14), predictor 7: (left + above) / 2",
         _jpeg_lossless_slice(JPEGLossless, 7), "ok", "ok", "ok", PHANTOM),
    # accepted by the reader, flagged or refused by the Predictor
    Case("flag-sign-flipped.dcm", "RescaleSlope -1: HU sign-flipped (bright air border)", _sign_flipped,
         "ok", "ok", "flag:inverted", NEGATED),
    Case("flag-missing-rescale.dcm", "RescaleIntercept dropped: raw stored values (air near +24) read as HU",
         _missing_rescale, "ok", "ok", "flag:no_air", STORED),
    Case("mr-modality.dcm", "a valid MR slice: readable, but the CT model must refuse it", _mr_slice,
         "ok", "ok", "refuse", STORED),
    # refused by the reader
    Case("bad-rows-0.dcm", "Rows 0", _rows_columns(0, SIZE),
         "empty_image", "empty_image", "refuse"),
    Case("bad-columns-0.dcm", "Columns 0", _rows_columns(SIZE, 0),
         "empty_image", "empty_image", "refuse"),
    Case("bad-rows-columns-65535.dcm", "Rows/Columns 65535 (an 8 GiB claim) over 2 KB of pixels",
         _rows_columns(65535, 65535), "too_large", "too_large", "refuse"),
    Case("bad-bits-allocated-12.dcm", "BitsAllocated 12 (not a byte multiple)", _bits(12, 12, 0),
         "unsupported_bits", "unsupported_bits", "refuse"),
    Case("bad-bits-allocated-32.dcm", "32-bit integer pixels", _bits_allocated_32,
         "unsupported_bits", "unsupported_bits", "refuse"),
    Case("bad-bits-stored-0.dcm", "BitsStored 0", _bits(16, 0, 1),
         "unsupported_bits", "unsupported_bits", "refuse"),
    Case("bad-bits-stored-17.dcm", "BitsStored 17 > BitsAllocated 16", _bits(16, 17, 1),
         "unsupported_bits", "unsupported_bits", "refuse"),
    Case("bad-pixel-representation-2.dcm", "PixelRepresentation 2 (only 0 or 1 exist)", _bits(16, 16, 2),
         "unsupported_bits", "unsupported_bits", "refuse"),
    Case("bad-rgb.dcm", "RGB colour image, 3 samples per pixel", _colour("RGB"),
         "colour", "colour", "refuse"),
    Case("bad-palette-color.dcm", "PALETTE COLOR image with lookup tables", _colour("PALETTE COLOR"),
         "colour", "colour", "refuse"),
    Case("bad-ybr-full.dcm", "YBR_FULL colour image", _colour("YBR_FULL"),
         "colour", "colour", "refuse"),
    Case("bad-frames-2.dcm", "NumberOfFrames 2 with two frames of pixels", _frames("2", 2),
         "multi_frame", "multi_frame", "refuse"),
    Case("bad-frames-huge.dcm", "NumberOfFrames 2147483647 over one frame of pixels", _frames("2147483647", 1),
         "multi_frame", "multi_frame", "refuse"),
    Case("bad-frames-0.dcm", "NumberOfFrames 0 over one frame of pixels (a frame count other than 1)",
         _frames("0", 1), "malformed", "malformed", "refuse", says="a frame count other than 1"),
    Case("bad-slope-0.dcm", "RescaleSlope 0: every pixel would be the intercept", _rescale(RescaleSlope="0"),
         "bad_rescale", "ok", "refuse", says="slope zero or not finite"),
    Case("bad-slope-nan.dcm", "RescaleSlope NaN", _rescale(RescaleSlope="NaN"),
         "bad_rescale", "ok", "refuse", says="slope zero or not finite"),
    Case("bad-slope-inf.dcm", "RescaleSlope inf", _rescale(RescaleSlope="inf"),
         "bad_rescale", "ok", "refuse", says="slope zero or not finite"),
    Case("bad-hu-out-of-range.dcm", "RescaleSlope 1000: HU up to 2 million, past the +-65536 any CT can hold",
         _rescale(RescaleSlope="1000"), "hu_out_of_range", "ok", "refuse", says="outside the [-65536, 65536] HU"),
    Case("bad-jpeg-lossless-truncated.dcm", "JPEG Lossless codestream cut in half (no end-of-image marker)",
         _jpeg_lossless_truncated, "truncated", "ok", "refuse", says="no end-of-image marker"),
    Case("bad-jpeg-lossless-file-cut.dcm", "JPEG Lossless file cut inside its encapsulated pixel data",
         _jpeg_lossless_file_cut, "truncated", "ok", "refuse", says="the file ends inside them"),
    Case("bad-nested-sequences.dcm", "1000 levels of nested undefined-length sequences", _nested_sequences,
         "malformed", "malformed", "refuse"),
    Case("bad-huge-private-length.dcm", "a private element declaring 4 GiB in a 2 KB file", _huge_private_length,
         "malformed", "malformed", "refuse"),
    Case("bad-huge-pixel-length.dcm", "PixelData declaring 4 GiB; the header alone is intact", _huge_pixel_length,
         "truncated", "ok", "refuse"),
    Case("bad-element-bomb.dcm", "one million empty private elements, deflated to 12 KB", _element_bomb,
         "too_large", "too_large", "refuse"),
    Case("bad-truncated-pixels.dcm", "pixel data cut in half", _truncated_pixels,
         "truncated", "ok", "refuse"),
    Case("bad-truncated-header.dcm", "file cut inside the Rows element", _truncated_header,
         "malformed", "malformed", "refuse"),
    Case("bad-bit-flipped-header.dcm", "one bit flipped in an element length: parsing derails",
         _bit_flipped_header, "malformed", "malformed", "refuse"),
    Case("bad-jpeg-codestream-bomb.dcm", "JPEG codestream claiming 65000 x 65000 under a 32 x 32 header",
         _jpeg_codestream_bomb, "shape_mismatch", "ok", "refuse"),
    Case("bad-j2k-codestream-bomb.dcm", "JPEG 2000 codestream claiming 60000 x 60000 under a 32 x 32 header",
         _j2k_codestream_bomb, "shape_mismatch", "ok", "refuse"),
    Case("bad-no-pixel-data.dcm", "complete CT header, no PixelData element", _no_pixel_data,
         "no_pixel_data", "ok", "refuse"),
    Case("bad-structured-report.dcm", "a Basic Text SR document (not an image)", _structured_report,
         "not_image", "not_image", "refuse"),
    Case("bad-not-dicom-png.dcm", "PNG image bytes named .dcm", _png_bytes,
         "not_dicom", "not_dicom", "refuse"),
    Case("bad-not-dicom-text.dcm", "a text file named .dcm", _text_file,
         "not_dicom", "not_dicom", "refuse"),
    Case("bad-empty.dcm", "an empty file", _empty_file,
         "not_dicom", "not_dicom", "refuse"),
)
# fmt: on

README_HEAD = """# DICOM regression corpus

The nastiest inputs met so far, as small files. Written by `make_corpus.py` (run it again after changing
it: it rewrites these files and this README, byte for byte the same when nothing changed). Every file goes
through `read_slice`/`read_header`, `python -m training inspect`, `python -m training predict` and the
dashboard's upload path in `tests/test_corpus.py`.

"Refused (reason)" means only a `DicomReadError` with that reason code, within the memory bound; "read"
means `read_slice` returns exactly the HU given (the phantom is `head_hu()` in `make_corpus.py`);
"predict" is what `predict` and the dashboard's upload must give.

| file | what it is | what must happen |
| --- | --- | --- |
"""


def expectation(case: Case) -> str:
    """One README cell: what must happen to the file."""
    reason = f'{case.reader}: "{case.says}"' if case.says else case.reader
    if case.accepted:
        read = f"read, {case.hu.text}" if case.hu else "read"
    elif case.header == "ok":
        read = f"header read; slice refused ({reason})"
    else:
        read = f"refused ({reason})"
    predict = {"ok": "predicted, no flags", "refuse": "an error message"}.get(
        case.predict, f"predicted and flagged `{case.predict.removeprefix('flag:')}`"
    )
    return f"{read}; predict: {predict}"


def write_corpus(out: Path) -> list[Path]:
    """Write every case and README.md into ``out``; returns the corpus files in CASES order."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in CASES:
        path = out / case.name
        path.write_bytes(case.build())
        paths.append(path)
    rows = "".join(f"| `{c.name}` | {c.what} | {expectation(c)} |\n" for c in CASES)
    (out / "README.md").write_text(README_HEAD + rows, encoding="utf-8")
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    written = write_corpus(target)
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} files, {total / 1024:.1f} KiB, in {target}")
