"""DICOM file or bytes -> CT slice in Hounsfield units plus a small metadata record.

This is the project's only door from untrusted DICOM bytes to arrays, so it is built as a boundary:

* every refusal is a :class:`DicomRefusal` (a :class:`~hemorrhage_core.errors.DicomReadError`) with a
  machine-readable ``reason`` and a message a person understands; no other exception type escapes,
  whatever the bytes (``KeyboardInterrupt`` still propagates; ``MemoryError`` becomes a refusal);
* messages never quote header values that can identify a patient, refusals carry no chained
  exception, and pydicom's own warnings and log records (which can quote raw header values) are
  captured during every read and dropped;
* sizes are checked from the header before anything is decoded: declared Rows/Columns, the file size,
  the inflated size of a deflated data set and the size inside a JPEG / JPEG 2000 codestream;
* only the elements the project needs are parsed (``specific_tags``), and header reads stop before
  the pixel data, so a scan of 750k files never touches pixels; a data set with more top-level
  elements than any real slice has (``ReadLimits.max_elements``) is refused as soon as the count is
  passed, so an element bomb costs milliseconds;
* values that make a slice meaningless are refused rather than passed on: a NumberOfFrames other
  than 1, a RescaleSlope of zero or not finite, and HU that are not finite or lie outside
  :data:`HU_RANGE` after rescaling.

Decoders: each compressed transfer syntax is decoded by one pinned pydicom plugin
(:data:`_DECODING_PLUGINS`), whatever else is installed, so that results do not depend on the
machine and a decoder that crashes on damaged data (python-gdcm aborts on some damaged JPEG
lossless codestreams) is never reached. pydicom has no permissive plugin for JPEG Extended 12-bit
and JPEG Lossless (its own is GPL ``pylibjpeg-libjpeg``), so this module registers ``imagecodecs``
(libjpeg-turbo 3) as a pydicom decoder plugin for them (``is_available``, ``DECODER_DEPENDENCIES``
and ``_imagecodecs_decode_frame`` are that plugin's interface).

Speed (the uncached training path reads every slice every epoch): the file meta group is parsed once,
here, and for the uncompressed syntaxes the data set goes straight to pydicom's ``read_dataset``;
each element is converted once (:class:`_Header`); uncompressed pixels are read in place with
pydicom's rules rather than through ``pixel_array``'s machinery. Compressed syntaxes and anything
unusual take pydicom's full path, so results and refusals are the same either way.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import IS, VR

from hemorrhage_core.errors import DicomReadError

log = logging.getLogger(__name__)


def _drop_record(record: logging.LogRecord) -> bool:
    return False


# pydicom logs every validation warning (with the offending raw header value) besides raising it as a
# Python warning. A filter on its loggers drops those records before any handler sees them, whoever
# attached the handler (turning off propagation would not stop a handler put on "pydicom" itself).
# pydicom is imported nowhere else in the project, so nothing else is silenced.
for _name in ["pydicom"] + [n for n in logging.root.manager.loggerDict if n.startswith("pydicom.")]:
    logging.getLogger(_name).addFilter(_drop_record)

Source = str | os.PathLike | bytes | bytearray | memoryview


@dataclass(frozen=True)
class ReadLimits:
    """Bounds checked before any allocation that depends on the file's claims."""

    max_rows: int = 4096
    max_columns: int = 4096
    max_file_bytes: int = 128 * 1024**2  # a 4096 x 4096 16-bit slice is 32 MiB
    max_inflated_bytes: int = 128 * 1024**2  # deflated data sets, refused while inflating
    header_peek_bytes: int = 64 * 1024  # where the file meta group (and its transfer syntax) must lie
    # Top-level data elements parsed before refusing: real slices have a few hundred, and parsing costs
    # about 5 us an element, so a deflated "element bomb" (a million empty elements in 12 KB) would
    # otherwise hold the reader (and its lock) for seconds per file.
    max_elements: int = 10_000


LIMITS = ReadLimits()

# The widest HU a CT slice can hold, inclusive; a read whose HU leave it (or are not finite) is refused.
# Nothing physical lies below air (-1000 HU), but scanners pad outside the field of view with -2000,
# -3024 or -32768 (-33792 with intercept -1024); extended-scale CT reaches +30710 (12-bit stored,
# slope 10, intercept -10240); unsigned 16-bit stored values with intercept -1024 reach +64511. So
# +-2**16 holds every 16-bit stored value under any intercept a scanner writes, and what lies beyond
# comes from a broken rescale (a slope in the hundreds, an intercept of 1e9, overflow to infinity).
# Plausibility for a head (air present, no sign flip) is the Predictor's check, not this bound.
HU_RANGE: tuple[float, float] = (-65536.0, 65536.0)


class RefusalReason(StrEnum):
    """Why a file cannot be used; stable codes for counting (``inspect --summary``) and tests."""

    UNREADABLE = "unreadable"
    NOT_DICOM = "not_dicom"
    MALFORMED = "malformed"
    NOT_IMAGE = "not_image"
    COLOUR = "colour"
    MULTI_FRAME = "multi_frame"
    EMPTY_IMAGE = "empty_image"
    TOO_LARGE = "too_large"
    UNSUPPORTED_BITS = "unsupported_bits"
    NO_PIXEL_DATA = "no_pixel_data"
    TRUNCATED = "truncated"
    SHAPE_MISMATCH = "shape_mismatch"
    NO_DECODER = "no_decoder"
    UNDECODABLE = "undecodable"
    OUT_OF_MEMORY = "out_of_memory"
    BAD_RESCALE = "bad_rescale"
    HU_OUT_OF_RANGE = "hu_out_of_range"


class DicomRefusal(DicomReadError):
    """A :class:`DicomReadError` with a reason code and, when the header was parsed, what it declared."""

    def __init__(
        self,
        reason: RefusalReason,
        message: str,
        *,
        modality: str | None = None,
        rows: int | None = None,
        columns: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.modality = modality
        self.rows = rows
        self.columns = columns


@dataclass(frozen=True)
class SliceMeta:
    """The header fields the project uses. No patient name, birth date or institution.

    ``patient_id`` is the raw PatientID, kept for grouping: callers hash it before writing anything,
    and it is left out of ``repr`` so that logging a record cannot leak it.
    """

    image_id: str
    patient_id: str = field(repr=False)
    study_uid: str
    series_uid: str
    z: float | None
    pixel_spacing: tuple[float, float] | None
    modality: str
    rows: int
    columns: int
    window_center: float | None
    window_width: float | None
    body_part: str = ""  # BodyPartExamined, upper-case ("HEAD"); empty when absent

    def to_dict(self) -> dict:
        """JSON-safe dict of every field (including the raw ``patient_id``)."""
        return {
            "image_id": self.image_id,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "z": self.z,
            "pixel_spacing": list(self.pixel_spacing) if self.pixel_spacing is not None else None,
            "modality": self.modality,
            "rows": self.rows,
            "columns": self.columns,
            "window_center": self.window_center,
            "window_width": self.window_width,
            "body_part": self.body_part,
        }


@dataclass(frozen=True)
class CtSlice:
    """A decoded slice: ``hu`` is float32 (rows, columns) in Hounsfield units (modality LUT output)."""

    hu: np.ndarray
    meta: SliceMeta


# Elements parsed from every file; everything else is skipped by seeking past it.
_HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImagePositionPatient",
    "PixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)
_PIXEL_TAGS: tuple[str, ...] = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
)
# Keyword -> tag, resolved once: pydicom resolves a keyword on every access and every dcmread call.
_TAGS: dict[str, BaseTag] = {kw: BaseTag(tag_for_keyword(kw)) for kw in _HEADER_TAGS + _PIXEL_TAGS}
_HEADER_TAG_LIST = [_TAGS[kw] for kw in _HEADER_TAGS]
_ALL_TAG_LIST = [_TAGS[kw] for kw in _HEADER_TAGS + _PIXEL_TAGS]
# Image Pixel module elements a decoder cannot do without.
_IMAGE_PIXEL_TAGS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Image Pixel values the native path reads; pydicom's decoder needs each to be a single integer.
_NATIVE_INT_TAGS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)
_KNOWN_COLOUR = ("RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_SUPPORTED_BITS_ALLOCATED = (8, 16)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_RLE_PADDING_WARNING = re.compile(r"non-conformant padding - (\d+) vs\. (\d+) bytes")
_DEFLATED_UID = "1.2.840.10008.1.2.1.99"
_INFLATE_CHUNK = 1024**2
# Native (uncompressed) transfer syntaxes whose pixels are read straight from the element's bytes,
# with their byte order. Deflate compresses the whole data set, so its PixelData arrive inflated.
_NATIVE_BYTE_ORDER = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    _DEFLATED_UID: "<",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian
}
_J2K_UIDS = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
_JPEG_UIDS = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)
# The one pydicom plugin that decodes each compressed syntax, and the package that provides it.
# RLE: pydicom's own (the Rust pylibjpeg-rle panics on malformed segments and its panic hook writes to
# stderr, outside our control). JPEG 12-bit/lossless: imagecodecs, registered below (python-gdcm aborts
# the process on about 1% of damaged lossless and 3% of damaged 12-bit codestreams; pylibjpeg-libjpeg
# is GPL). Baseline 8-bit stays with Pillow, JPEG-LS with pyjpegls, JPEG 2000 with pylibjpeg-openjpeg.
_DECODING_PLUGINS: dict[str, str] = {
    RLELossless: "pydicom",
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: "imagecodecs",
    JPEGLossless: "imagecodecs",
    JPEGLosslessSV1: "imagecodecs",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
    HTJ2KLossless: "pylibjpeg",
    HTJ2KLosslessRPCL: "pylibjpeg",
    HTJ2K: "pylibjpeg",
}
_PLUGIN_PACKAGES = {
    "pillow": "pillow",
    "imagecodecs": "imagecodecs",
    "pyjpegls": "pyjpegls",
    "pylibjpeg": "pylibjpeg and pylibjpeg-openjpeg",
}
# JPEG processes whose codestream must end with an EOI marker: libjpeg-turbo fills a truncated scan
# with grey and reports it only as a warning that imagecodecs drops.
_JPEG_DCT_AND_LOSSLESS_UIDS = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
# Transfer syntax -> (implicit VR, little endian) of the syntaxes whose data set _parse hands to
# pydicom's read_dataset directly, as dcmread would after reading the file meta group.
_DIRECT_ENCODINGS: dict[str | None, tuple[bool, bool]] = {
    "1.2.840.10008.1.2": (True, True),
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
}
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_STANDARD_VRS = frozenset(vr.value.encode("ascii") for vr in VR if len(vr.value) == 2)
# Explicit-VR value representations whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

# What a read lets through untouched: the user's interrupt and interpreter shutdown.
_NEVER_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)

# warnings.catch_warnings swaps process-wide state; serialise reads so two threads (e.g. concurrent
# dashboard sessions) cannot restore each other's filters and let a raw-valued warning through.
_PYDICOM_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------
# public API


def read_header(source: Source, *, image_id: str | None = None) -> SliceMeta:
    """Read only the header of a DICOM file path or bytes; never reads or decodes pixel data.

    Refuses (``DicomRefusal``) what the header alone shows is not a usable single-frame greyscale
    slice. A header that passes can still be refused by :func:`read_slice` (e.g. truncated pixels).
    """
    name = _default_image_id(source, image_id)
    with _guarded():
        ds, _ = _parse(source, with_pixels=False)
        with _annotated(ds):
            header = _Header(ds)
            rows, columns = _check_image_header(header)
            return _meta(header, name, rows, columns)


def read_slice(source: Source, *, image_id: str | None = None) -> CtSlice:
    """Decode a single-frame greyscale DICOM slice (file path or bytes) into HU and metadata.

    HU = stored x RescaleSlope + RescaleIntercept (first value of multi-valued tags; a Modality LUT
    Sequence is applied instead when present). MONOCHROME1 is inverted within the stored value range
    so that, as for MONOCHROME2, higher means brighter. The RSNA 12-bit fix is applied to CT files
    with BitsStored 12, PixelRepresentation 0 and RescaleIntercept > -100. Compressed transfer syntaxes
    are decoded by the one plugin pinned for each (:data:`_DECODING_PLUGINS`). Refused besides what
    :func:`read_header` refuses: a RescaleSlope of zero or not finite, a RescaleIntercept not finite,
    HU not finite or outside :data:`HU_RANGE`, and pixel data that are truncated or undecodable.
    """
    name = _default_image_id(source, image_id)
    with _guarded():
        ds, transfer_syntax = _parse_with_pixels(source)
        with _annotated(ds):
            header = _Header(ds)
            rows, columns = _check_image_header(header)
            meta = _meta(header, name, rows, columns)
            stored = _decode(ds, header, transfer_syntax, rows, columns)
            return CtSlice(hu=_to_hu(ds, header, stored, meta.modality), meta=meta)


# --------------------------------------------------------------------------------------------------
# error handling


@contextmanager
def _guarded() -> Iterator[None]:
    """Turn every failure inside a read into a DicomRefusal, with pydicom's warnings captured."""
    with _PYDICOM_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Refusals leave their cause behind ("from None"): pydicom's and the decoders' messages can
        # quote raw header values, and a logged traceback would print a chained exception.
        try:
            yield
        except DicomRefusal as exc:
            exc.__cause__, exc.__suppress_context__ = None, True
            raise
        except MemoryError:
            raise DicomRefusal(RefusalReason.OUT_OF_MEMORY, "not enough memory to read this file") from None
        except RecursionError:
            raise DicomRefusal(
                RefusalReason.MALFORMED, "the DICOM header is nested too deeply to parse"
            ) from None
        except _NEVER_CAUGHT:
            raise
        except BaseException as exc:
            # BaseException, because decoder plugins written in Rust report a panic as pyo3's
            # PanicException, which is not an Exception. Name the failure, never repeat its text.
            raise DicomRefusal(
                RefusalReason.MALFORMED,
                f"the DICOM data are damaged and cannot be parsed ({type(exc).__name__})",
            ) from None
        finally:
            if caught:
                log.debug("suppressed %d pydicom warning(s) while reading a file", len(caught))


@contextmanager
def _annotated(ds: Dataset) -> Iterator[None]:
    """Attach what the header declared (modality, size) to a refusal raised after parsing."""
    try:
        yield
    except DicomRefusal as exc:
        if exc.modality is None:
            exc.modality = _safe(lambda: _short(ds.get("Modality")))
            exc.rows = _safe(lambda: _int_or_none(ds.get("Rows")))
            exc.columns = _safe(lambda: _int_or_none(ds.get("Columns")))
        raise


def _safe(getter: Any) -> Any:
    try:
        return getter()
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# parsing


def _default_image_id(source: Source, image_id: str | None) -> str:
    if not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        raise TypeError(f"expected a file path or bytes, got {type(source).__name__}")
    if image_id is not None:
        return str(image_id)
    if isinstance(source, str | os.PathLike):
        return Path(os.fsdecode(source)).stem
    return ""


@contextmanager
def _opened(source: Source) -> Iterator[Any]:
    """A read-only file-like over the source whose ``read(n)`` never allocates past the real data.

    A path is memory-mapped: a declared element length of 4 GiB then yields the bytes that exist
    instead of the 4 GiB buffer a plain ``file.read(n)`` would allocate first.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > LIMITS.max_file_bytes:
            raise DicomRefusal(RefusalReason.TOO_LARGE, _file_too_large(len(data)))
        yield _BytesFile(data)
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed below, after the mapping
    except FileNotFoundError as exc:
        raise DicomRefusal(RefusalReason.UNREADABLE, "file not found") from exc
    except IsADirectoryError as exc:
        raise DicomRefusal(RefusalReason.UNREADABLE, "this is a folder, not a file") from exc
    except PermissionError as exc:
        raise DicomRefusal(RefusalReason.UNREADABLE, "permission denied") from exc
    except OSError as exc:
        raise DicomRefusal(
            RefusalReason.UNREADABLE, f"the file cannot be opened ({type(exc).__name__})"
        ) from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise DicomRefusal(RefusalReason.NOT_DICOM, "not a DICOM file (the file is empty)")
        if size > LIMITS.max_file_bytes:
            raise DicomRefusal(RefusalReason.TOO_LARGE, _file_too_large(size))
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise DicomRefusal(
                RefusalReason.UNREADABLE, f"the file cannot be read ({type(exc).__name__})"
            ) from exc
        with mapped:
            yield mapped


class _BytesFile(io.BytesIO):
    """In-memory bytes that, like the memory map of a path, refuse a seek past their end.

    pydicom seeks over the values it skips; a plain BytesIO lets a declared length run past the end
    and the parse then ends quietly with a partial header, so bytes and the same file on disk would
    be refused for different reasons.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._size = len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        position = super().seek(pos, whence)
        if position > self._size:
            raise ValueError("seek out of range")  # mmap's own words
        return position


def _file_too_large(size: int) -> str:
    return (
        f"the file is {size / 1024**2:.0f} MiB, more than the {LIMITS.max_file_bytes // 1024**2} MiB accepted"
    )


def _parse(source: Source, *, with_pixels: bool) -> tuple[Dataset, str | None]:
    """The parsed data set (only the elements the reader uses) and its transfer syntax UID."""
    tags = _ALL_TAG_LIST if with_pixels else _HEADER_TAG_LIST
    stop_when = _element_budget(LIMITS.max_elements, stop_at_pixels=not with_pixels)
    with _opened(source) as fp:
        head = fp.read(LIMITS.header_peek_bytes)
        meta = _peek_file_meta(head)
        if meta.transfer_syntax == _DEFLATED_UID:
            inflated = _inflate(fp, meta.dataset_offset)
            if meta.plain and inflated.getbuffer()[:2] != b"\0\0":
                # Inflated, the data set is explicit VR little endian (PS3.5 A.5): read it from this
                # bounded copy; pydicom would inflate the file again, unbounded and at twice the size.
                ds = read_dataset(inflated, False, True, stop_when=stop_when, specific_tags=tags)
                return ds, meta.transfer_syntax
            del inflated  # an unusual file meta group: pydicom's full path below
        encoding = _DIRECT_ENCODINGS.get(meta.transfer_syntax) if meta.plain else None
        if encoding is not None and head[meta.dataset_offset : meta.dataset_offset + 2] != b"\0\0":
            # The file meta group was just parsed, and for these syntaxes all that dcmread adds is
            # parsing it again (about a third of a header read); pydicom's own data set reader
            # takes it from there. Anything unusual (no preamble, a command set, deflate, odd
            # meta elements) still goes through dcmread's reader (read_partial).
            fp.seek(meta.dataset_offset)
            return read_dataset(fp, *encoding, stop_when=stop_when, specific_tags=tags), meta.transfer_syntax
        fp.seek(0)
        try:
            # dcmread's own reader, with the element budget as its stop condition
            ds = read_partial(fp, stop_when, specific_tags=tags)
        except InvalidDicomError as exc:
            raise DicomRefusal(
                RefusalReason.NOT_DICOM, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
            ) from exc
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return ds, None if transfer_syntax is None else str(transfer_syntax)


def _parse_with_pixels(source: Source) -> tuple[Dataset, str | None]:
    """:func:`_parse` with the pixel data; a file that ends inside them is refused as truncated.

    When the file ends inside an encapsulated (undefined-length) element, pydicom either seeks past
    the end or warns and drops every top-level element read so far; without this, a cut JPEG file
    would be refused as "damaged" or even as "not an image". Only then is the header parsed again.
    """
    try:
        ds, transfer_syntax = _parse(source, with_pixels=True)
    except ValueError as exc:
        if "seek out of range" not in str(exc):  # the words of mmap and _BytesFile
            raise
        ds, transfer_syntax = None, None
    if ds is not None and _TAGS["Rows"] in ds:
        return ds, transfer_syntax
    header, _ = _parse(source, with_pixels=False)
    if ds is not None and _TAGS["Rows"] not in header:
        return ds, transfer_syntax  # no Rows either way: the header checks say what it is
    with _annotated(header):
        _check_image_header(_Header(header))  # what the header alone refuses (multi-frame, colour ...) first
        # the header is whole: the file ends inside the pixel data
        raise DicomRefusal(
            RefusalReason.TRUNCATED, "the pixel data are truncated (the file ends inside them)"
        )


def _element_budget(limit: int, *, stop_at_pixels: bool) -> Callable[[int, str | None, int], bool]:
    """A ``stop_when`` for pydicom's reader: refuses past ``limit`` top-level elements, and stops at the
    first pixel data element (as ``dcmread(stop_before_pixels=True)``) when ``stop_at_pixels``."""
    seen = 0

    def stop_when(tag: int, vr: str | None, length: int) -> bool:
        nonlocal seen
        seen += 1
        if seen > limit:
            raise DicomRefusal(
                RefusalReason.TOO_LARGE,
                f"the data set holds more than {limit} elements; a CT slice has a few hundred",
            )
        return stop_at_pixels and tag in _PIXEL_DATA_TAGS

    return stop_when


def _inflate(fp: Any, dataset_offset: int) -> io.BytesIO:
    """The inflated data set of a deflated file; refused past ``max_inflated_bytes`` before holding more."""
    fp.seek(dataset_offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, out = fp.read(), io.BytesIO()
    try:
        # A chunk at a time, so that a bomb is refused having inflated no more than the limit.
        while pending and out.tell() <= LIMITS.max_inflated_bytes:
            out.write(inflater.decompress(pending, _INFLATE_CHUNK))
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DicomRefusal(RefusalReason.MALFORMED, "the deflated data set is corrupt") from exc
    if out.tell() > LIMITS.max_inflated_bytes:
        raise DicomRefusal(
            RefusalReason.TOO_LARGE,
            f"the deflated data set expands to more than {LIMITS.max_inflated_bytes // 1024**2} MiB",
        )
    out.seek(0)
    return out


class _FileMeta(NamedTuple):
    transfer_syntax: str | None
    dataset_offset: int
    # a preamble, and every group 0002 element with a standard VR and a defined length: pydicom
    # reads such a group exactly as this parser does, and the data set starts at dataset_offset
    plain: bool


def _peek_file_meta(head: bytes) -> _FileMeta:
    """TransferSyntaxUID and the offset of the data set from the Part 10 file meta group, if present."""
    if head[128:132] != b"DICM":
        return _FileMeta(None, 0, plain=False)
    offset, transfer_syntax, plain = 132, None, True
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        plain = plain and vr in _STANDARD_VRS
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value_at = offset + 8
        if element == 0x0010:
            transfer_syntax = head[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        plain = plain and length != _UNDEFINED_LENGTH
        offset = value_at + length
    else:
        if len(head) >= LIMITS.header_peek_bytes:  # still in group 0002 where the window ends
            raise DicomRefusal(RefusalReason.MALFORMED, "the file meta information is implausibly large")
        plain = False  # the file ends inside (or right after) the file meta group
    return _FileMeta(transfer_syntax, offset, plain)


# --------------------------------------------------------------------------------------------------
# header checks and metadata


class _Header:
    """The parsed elements' values by keyword, each looked up (and converted by pydicom) once.

    Every ``Dataset`` access resolves the keyword and walks pydicom's element machinery again; a read
    uses some elements several times, and this memo makes the header checks a handful of dict hits.
    Values are still converted lazily, in the order the checks ask for them.
    """

    __slots__ = ("_ds", "_values")

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds
        self._values: dict[str, Any] = {}

    def get(self, keyword: str) -> Any:
        """The element's value; None when the element is absent (or its value is empty)."""
        try:
            return self._values[keyword]
        except KeyError:
            pass
        element = self._ds.get(_TAGS[keyword])
        value = None if element is None else element.value
        self._values[keyword] = value
        return value

    def __contains__(self, keyword: str) -> bool:
        return _TAGS[keyword] in self._ds


def _check_image_header(ds: _Header) -> tuple[int, int]:
    """Refuse what is not a single-frame greyscale image of a supported size and bit depth."""
    sop_class = _uid_name(ds.get("SOPClassUID"))
    if sop_class is not None and "Image" not in sop_class:
        raise DicomRefusal(RefusalReason.NOT_IMAGE, f"not an image: this is a '{sop_class}' object")
    if "Rows" not in ds or "Columns" not in ds:
        if sop_class is not None:  # an image class (checked above): its header was cut short or derailed
            raise DicomRefusal(
                RefusalReason.MALFORMED,
                f"the '{sop_class}' header is incomplete (no Rows/Columns): the file is damaged or cut short",
            )
        raise DicomRefusal(RefusalReason.NOT_IMAGE, "not an image: an object without Rows/Columns")
    rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    if rows is None or columns is None:
        raise DicomRefusal(RefusalReason.MALFORMED, "Rows/Columns are not valid numbers")
    if rows == 0 or columns == 0:
        raise DicomRefusal(RefusalReason.EMPTY_IMAGE, f"the image is empty ({rows} x {columns} pixels)")
    if rows > LIMITS.max_rows or columns > LIMITS.max_columns:
        raise DicomRefusal(
            RefusalReason.TOO_LARGE,
            f"the image declares {rows} x {columns} pixels, more than the "
            f"{LIMITS.max_rows} x {LIMITS.max_columns} accepted",
        )
    raw_frames = ds.get("NumberOfFrames")
    frames = 1 if raw_frames is None or raw_frames == "" else _int_or_none(raw_frames)
    if frames is None:
        raise DicomRefusal(RefusalReason.MALFORMED, "NumberOfFrames is not a valid number")
    if frames < 1:
        raise DicomRefusal(
            RefusalReason.MALFORMED,
            f"NumberOfFrames is {frames}: a frame count other than 1 on a single-frame slice",
        )
    if frames > 1:
        raise DicomRefusal(
            RefusalReason.MULTI_FRAME, f"multi-frame object ({frames} frames); one slice per file is expected"
        )
    missing = [kw for kw in _IMAGE_PIXEL_TAGS if ds.get(kw) is None]
    if missing:
        raise DicomRefusal(
            RefusalReason.MALFORMED, f"the image header is incomplete: {', '.join(missing)} missing"
        )
    samples = _int_or_none(ds.get("SamplesPerPixel"))
    photometric = _short(ds.get("PhotometricInterpretation"))
    if samples != 1 or (photometric in _KNOWN_COLOUR):
        shown = photometric if photometric in _KNOWN_COLOUR else f"{samples} samples per pixel"
        raise DicomRefusal(
            RefusalReason.COLOUR, f"colour image ({shown}); only greyscale slices are supported"
        )
    if photometric not in _GREYSCALE:
        raise DicomRefusal(
            RefusalReason.MALFORMED,
            "PhotometricInterpretation is missing or unknown; MONOCHROME1 or MONOCHROME2 is expected",
        )
    bits_allocated = _int_or_none(ds.get("BitsAllocated"))
    bits_stored = _int_or_none(ds.get("BitsStored"))
    pixel_representation = _int_or_none(ds.get("PixelRepresentation"))
    if (
        bits_allocated not in _SUPPORTED_BITS_ALLOCATED
        or bits_stored is None
        or not 1 <= bits_stored <= bits_allocated
        or pixel_representation not in (0, 1)
    ):
        raise DicomRefusal(
            RefusalReason.UNSUPPORTED_BITS,
            f"unsupported pixel format (BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
            f"PixelRepresentation {pixel_representation}); 8- or 16-bit integer pixels are supported",
        )
    return rows, columns


def _meta(ds: _Header, image_id: str, rows: int, columns: int) -> SliceMeta:
    position = _floats(ds.get("ImagePositionPatient"))
    spacing = _floats(ds.get("PixelSpacing"))
    return SliceMeta(
        image_id=image_id,
        patient_id=_text(ds.get("PatientID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        z=position[2] if position is not None and len(position) >= 3 else None,
        pixel_spacing=(spacing[0], spacing[1]) if spacing is not None and len(spacing) >= 2 else None,
        modality=_short(ds.get("Modality")) or "",
        rows=rows,
        columns=columns,
        window_center=_first_float(ds.get("WindowCenter")),
        window_width=_first_float(ds.get("WindowWidth")),
        body_part=_short(ds.get("BodyPartExamined")) or "",
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _short(value: Any, limit: int = 16) -> str | None:
    """A short code string (Modality, PhotometricInterpretation), upper-cased; None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = _first(value)
    text = str(value).strip().upper()
    return text[:limit] if text else None


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple | MultiValue):
        return value[0] if len(value) else None
    return value


def _to_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _first_float(value: Any) -> float | None:
    return None if value is None else _to_float(_first(value))


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    numbers = [_to_float(v) for v in items]
    return None if any(n is None for n in numbers) else numbers  # type: ignore[return-value]


def _int_or_none(value: Any) -> int | None:
    value = _first(value)
    if value is None or isinstance(value, bytes | bytearray):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


def _uid_name(value: Any) -> str | None:
    """The registered name of a UID (e.g. 'RT Plan Storage'); None when absent or unregistered."""
    if value is None:
        return None
    uid = UID(str(value))
    name = uid.name
    return name if name != str(uid) else None


# --------------------------------------------------------------------------------------------------
# pixel data


def _decode(ds: Dataset, header: _Header, transfer_syntax: str | None, rows: int, columns: int) -> np.ndarray:
    """The stored values (rows, columns) as pydicom decodes them (unused high bits cleared)."""
    raw = ds.get_item(_TAGS["PixelData"])  # still the raw element: it keeps the declared length
    declared = getattr(raw, "length", None)
    pixel_data = header.get("PixelData")
    if pixel_data is None:
        if "FloatPixelData" in header or "DoubleFloatPixelData" in header:
            raise DicomRefusal(RefusalReason.UNSUPPORTED_BITS, "floating-point pixel data are not supported")
        raise DicomRefusal(RefusalReason.NO_PIXEL_DATA, "the file has no pixel data (missing or cut off)")
    if transfer_syntax is None:
        raise DicomRefusal(RefusalReason.MALFORMED, "the file meta information has no transfer syntax")
    transfer_syntax = UID(transfer_syntax)
    byte_order = _NATIVE_BYTE_ORDER.get(str(transfer_syntax))
    plugin = _DECODING_PLUGINS.get(transfer_syntax)
    if byte_order is None:  # pydicom's native decoder is always there
        try:
            decoder = get_decoder(transfer_syntax)
        except NotImplementedError as exc:
            raise DicomRefusal(
                RefusalReason.NO_DECODER, f"unsupported transfer syntax '{_printable(transfer_syntax.name)}'"
            ) from exc
        if not (decoder.is_available if plugin is None else plugin in decoder.available_plugins):
            package = f" (install {_PLUGIN_PACKAGES[plugin]})" if plugin in _PLUGIN_PACKAGES else ""
            raise DicomRefusal(
                RefusalReason.NO_DECODER,
                f"no decoder is installed for '{_printable(transfer_syntax.name)}' pixel data{package}",
            )
    if declared is not None and declared != _UNDEFINED_LENGTH and declared > len(pixel_data):
        raise DicomRefusal(
            RefusalReason.TRUNCATED,
            f"the pixel data are truncated (the file ends after {len(pixel_data)} of {declared} bytes)",
        )
    if transfer_syntax.is_encapsulated:
        _check_codestream_size(pixel_data, str(transfer_syntax), rows, columns)
        if transfer_syntax in _JPEG_DCT_AND_LOSSLESS_UIDS:
            _check_jpeg_end(pixel_data)
    else:
        expected = rows * columns * (int(header.get("BitsAllocated")) // 8)
        if len(pixel_data) < expected:
            raise DicomRefusal(
                RefusalReason.TRUNCATED,
                f"the pixel data are truncated ({len(pixel_data)} of {expected} bytes)",
            )
    if (
        byte_order is not None
        and isinstance(pixel_data, bytes)
        and _as_pydicom_decodes(header)
        # 8-bit big-endian OW data are byte-swapped in pairs: left to pydicom
        and (byte_order == "<" or header.get("BitsAllocated") == 16)
    ):
        return _native_pixels(pixel_data, header, byte_order, rows, columns)
    if getattr(ds, "file_meta", None) is None:  # read by _parse without dcmread: pydicom needs it
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    if plugin is not None:  # the pinned decoder, never another one that happens to be installed
        ds.pixel_array_options(decoding_plugin=plugin)
    try:
        with warnings.catch_warnings(record=True) as decode_warnings:
            warnings.simplefilter("always")
            stored = ds.pixel_array
    except (MemoryError, RecursionError, *_NEVER_CAUGHT):
        raise  # _guarded words these
    except BaseException as exc:  # see _guarded: plugin panics are BaseExceptions
        what = "the pixel data cannot be decoded"
        if transfer_syntax.is_encapsulated:
            what = "the compressed pixel data cannot be decoded (damaged, truncated, or a variant no decoder handles)"
        raise DicomRefusal(RefusalReason.UNDECODABLE, f"{what} ({type(exc).__name__})") from exc
    excess = _rle_excess_bytes(decode_warnings)
    if excess >= columns:
        raise DicomRefusal(
            RefusalReason.SHAPE_MISMATCH,
            f"the RLE segments hold {excess} bytes more than Rows x Columns ({rows} x {columns}) allow",
        )
    if stored.shape != (rows, columns):
        raise DicomRefusal(
            RefusalReason.SHAPE_MISMATCH,
            f"decoded pixels have shape {stored.shape}, but Rows x Columns is {rows} x {columns}",
        )
    return stored


def _as_pydicom_decodes(header: _Header) -> bool:
    """Whether pydicom's decoder takes the Image Pixel values as they are.

    It refuses what the header checks are lenient about (multi-valued or non-integer numbers, a
    PhotometricInterpretation spelt otherwise than the standard, float pixel data beside the
    integer ones); such files still go to it, so that they are refused exactly as before.
    """
    frames = header.get("NumberOfFrames")
    return (
        "FloatPixelData" not in header
        and "DoubleFloatPixelData" not in header
        and all(type(header.get(keyword)) in (int, IS) for keyword in _NATIVE_INT_TAGS)
        and header.get("PhotometricInterpretation") in _GREYSCALE
        and (frames is None or frames == "" or (type(frames) in (int, IS) and frames == 1))
    )


def _native_pixels(
    pixel_data: bytes, header: _Header, byte_order: str, rows: int, columns: int
) -> np.ndarray:
    """Uncompressed pixels read in place, exactly as pydicom's native decoder returns them.

    pydicom's ``pixel_array`` spends most of a millisecond a slice on option handling and element
    look-ups before the same ``frombuffer``; the header checks it would repeat are done already (a
    greyscale single frame, 8/16 bits allocated, 1 <= BitsStored <= BitsAllocated, enough bytes).
    The result may be a read-only view on ``pixel_data``: the HU conversion always makes a new array.
    """
    bits_allocated = _int_or_none(header.get("BitsAllocated"))
    bits_stored = _int_or_none(header.get("BitsStored"))
    signed = _int_or_none(header.get("PixelRepresentation")) == 1
    itemsize = bits_allocated // 8
    expected = rows * columns * itemsize
    if len(pixel_data) > expected + expected % 2 and len(pixel_data) // expected > 1:
        # pydicom reads surplus whole frames as extra frames; a single-frame header cannot hold them.
        raise DicomRefusal(
            RefusalReason.SHAPE_MISMATCH,
            f"the pixel data hold {len(pixel_data) // expected} frames of Rows x Columns "
            f"({rows} x {columns}), but the header declares one",
        )
    dtype = np.dtype(f"{byte_order}{'i' if signed else 'u'}{itemsize}")
    stored = np.frombuffer(pixel_data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    unused = bits_allocated - bits_stored
    if unused:
        # As pydicom (PS3.5 8.1.1): bits above BitsStored are not part of the value; clear them, or
        # sign-extend from the stored sign bit.
        if signed:
            stored = np.left_shift(stored, unused)
            np.right_shift(stored, unused, out=stored)
        else:
            stored = np.bitwise_and(stored, dtype.type((1 << bits_stored) - 1))
    return stored


def _rle_excess_bytes(caught: list[warnings.WarningMessage]) -> int:
    """Bytes beyond Rows x Columns in a decoded RLE segment, from pydicom's padding warning.

    pydicom crops over-long segments as "non-conformant padding"; a row or more of surplus means
    the encoded image is larger than the header says, not padding.
    """
    excess = 0
    for warning in caught:
        match = _RLE_PADDING_WARNING.search(str(warning.message))
        if match:
            excess = max(excess, int(match.group(1)) - int(match.group(2)))
    return excess


def _printable(text: str, limit: int = 64) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _check_codestream_size(pixel_data: bytes, transfer_syntax: str, rows: int, columns: int) -> None:
    """Compare the size inside a JPEG / JPEG 2000 codestream with Rows/Columns before decoding.

    The decoders allocate what the codestream declares, so a 60000 x 60000 codestream under a
    512 x 512 header would be an allocation bomb.
    """
    if transfer_syntax not in _J2K_UIDS and transfer_syntax not in _JPEG_UIDS:
        return
    fragments = list(islice(generate_fragments(pixel_data), 2))  # basic offset table, first fragment
    if len(fragments) < 2 or not fragments[1]:
        raise DicomRefusal(RefusalReason.NO_PIXEL_DATA, "the compressed pixel data hold no image fragment")
    codestream = fragments[1]
    size = _j2k_size(codestream) if transfer_syntax in _J2K_UIDS else _jpeg_size(codestream)
    if size is not None and size != (rows, columns):
        raise DicomRefusal(
            RefusalReason.SHAPE_MISMATCH,
            f"the compressed image is {size[0]} x {size[1]} pixels, but Rows x Columns is {rows} x {columns}",
        )


def _check_jpeg_end(pixel_data: bytes) -> None:
    """Refuse a JPEG codestream that does not end with its EOI marker (trailing 0x00 / 0xFF padding allowed)."""
    last = b""
    for fragment in islice(generate_fragments(pixel_data), 1, None):  # skip the basic offset table
        if fragment:
            last = fragment
    if not last.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise DicomRefusal(
            RefusalReason.TRUNCATED,
            "the compressed pixel data are truncated (the JPEG codestream has no end-of-image marker)",
        )


def _j2k_size(codestream: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ segment of a JPEG 2000 codestream (optionally inside JP2 boxes)."""
    start = codestream.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 24 > len(codestream):
        return None
    xsiz, ysiz, x_offset, y_offset = struct.unpack_from(">IIII", codestream, start + 8)
    return ysiz - y_offset, xsiz - x_offset


def _jpeg_size(codestream: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the first SOF segment of a JPEG / JPEG-LS codestream."""
    offset = 2 if codestream[:2] == b"\xff\xd8" else None
    if offset is None:
        return None
    for _ in range(256):  # a real header has a handful of segments before SOF
        if offset + 4 > len(codestream) or codestream[offset] != 0xFF:
            return None
        marker = codestream[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack_from(">H", codestream, offset + 2)
        is_sof = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
        if is_sof or marker == 0xF7:  # 0xF7: JPEG-LS SOF55
            if offset + 9 > len(codestream):
                return None
            rows, columns = struct.unpack_from(">HH", codestream, offset + 5)
            return (rows, columns) if rows else None  # rows 0: defined later by a DNL segment
        offset += 2 + length
    return None


def _to_hu(ds: Dataset, header: _Header, stored: np.ndarray, modality: str) -> np.ndarray:
    bits_stored = _int_or_none(header.get("BitsStored"))
    signed = _int_or_none(header.get("PixelRepresentation")) == 1
    if _short(header.get("PhotometricInterpretation")) == "MONOCHROME1":
        # Invert within the representable stored range (not the image's own min/max) so the
        # mapping is the same for every slice of a series.
        wide = stored.astype(np.int32)
        stored = (-1 - wide) if signed else ((1 << bits_stored) - 1 - wide)
    if header.get("ModalityLUTSequence"):
        hu = np.ascontiguousarray(apply_modality_lut(stored, ds), dtype=np.float32)
        _check_hu_range(hu, stored)
        return hu

    slope = _rescale_value(header, "RescaleSlope", default=1.0)
    if slope == 0:
        raise DicomRefusal(
            RefusalReason.BAD_RESCALE,
            "RescaleSlope is 0: a slope zero or not finite leaves no image (every pixel would be the intercept)",
        )
    intercept = _rescale_value(header, "RescaleIntercept", default=0.0)
    if modality == "CT" and bits_stored == 12 and not signed and intercept > -100:
        stored, intercept = _rsna_12bit_fix(stored), -1000.0

    if slope == 1.0 and intercept == int(intercept) and abs(intercept) < 2**23:
        # Exact in float32 (integers below 2**24): skips a float64 temporary on the hot path.
        hu = stored.astype(np.float32)
        hu += np.float32(intercept)
    else:
        hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    _check_hu_range(hu, stored, slope, intercept)
    return hu


def _rescale_value(ds: _Header, keyword: str, *, default: float) -> float:
    """First value of a rescale tag; ``default`` when absent or empty, a refusal when not a finite number."""
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return default
    try:
        value = float(_first(raw))
    except (TypeError, ValueError, OverflowError):
        raise DicomRefusal(RefusalReason.MALFORMED, f"{keyword} is not a valid number") from None
    if not math.isfinite(value):
        what = (
            "a slope zero or not finite" if keyword == "RescaleSlope" else "an intercept that is not finite"
        )
        raise DicomRefusal(
            RefusalReason.BAD_RESCALE, f"{keyword} is {value:g}: {what} leaves no meaningful HU"
        )
    return value


def _check_hu_range(
    hu: np.ndarray, stored: np.ndarray, slope: float | None = None, intercept: float = 0.0
) -> None:
    """Refuse HU that are not finite or leave :data:`HU_RANGE`.

    With a rescale, the ends of the stored type's range are mapped first: when they land inside (every
    common CT encoding), no value can be outside and the pixels are not scanned.
    """
    low, high = HU_RANGE
    if slope is not None and stored.dtype.kind in "iu":
        info = np.iinfo(stored.dtype)
        ends = (info.min * slope + intercept, info.max * slope + intercept)
        if low <= min(ends) and max(ends) <= high:
            return
    lowest, highest = float(hu.min()), float(hu.max())  # NaN, if any, propagates to both
    if low <= lowest and highest <= high:
        return
    worst = lowest if not low <= lowest else highest
    shown = "NaN (not a number)" if math.isnan(worst) else f"{worst:.6g} HU"
    raise DicomRefusal(
        RefusalReason.HU_OUT_OF_RANGE,
        f"the rescaled values reach {shown}, outside the [{low:.0f}, {high:.0f}] HU that any CT slice "
        "can hold: RescaleSlope or RescaleIntercept is wrong",
    )


def _rsna_12bit_fix(stored: np.ndarray) -> np.ndarray:
    """RSNA 2019 pixel bug (rsna-notes.md): add 1000, subtract 4096 from values >= 4096.

    The public kernels' form (J. Howard, "cleaning the data for rapid prototyping", widely copied):
    ``x = dcm.pixel_array + 1000; x[x >= 4096] -= 4096; dcm.RescaleIntercept = -1000``. pydicom >= 3
    clears the unused high bits, so stored values lie in [0, 4095] and the uint16 arithmetic of those
    kernels has no wrap-around to reproduce; int32 keeps the sum exact.

    On values in [0, 4095] (all that a decoder clearing the unused bits returns) the rule is
    ``(x + 1000) mod 4096``: a mask, several times faster than a boolean-indexed subtraction.
    """
    if stored.dtype == np.uint16 and stored.size and int(stored.max()) <= 4095:
        fixed = stored + np.uint16(1000)  # at most 5095: no uint16 wrap-around
        fixed &= np.uint16(0x0FFF)
        return fixed
    fixed = stored.astype(np.int32) + 1000
    fixed[fixed >= 4096] -= 4096
    return fixed


# --------------------------------------------------------------------------------------------------
# imagecodecs as a pydicom decoder plugin (JPEG Extended 12-bit and JPEG Lossless)
#
# pydicom's plugin interface: ``is_available(uid)``, ``DECODER_DEPENDENCIES`` and a frame decoder taking
# (encoded frame, DecodeRunner). pydicom then interprets the returned bytes as it does any plugin's
# (BitsAllocated, PixelRepresentation, sign extension from BitsStored), so results match its rules.

_IMAGECODECS_UIDS = (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
DECODER_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    uid: ("imagecodecs>=2026.3.6 (libjpeg-turbo 3)",) for uid in _IMAGECODECS_UIDS
}


def is_available(uid: str) -> bool:
    """pydicom plugin interface: whether imagecodecs can decode ``uid`` here (libjpeg-turbo >= 3)."""
    if uid not in _IMAGECODECS_UIDS:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    version = imagecodecs.jpeg8_version() if imagecodecs.JPEG8.available else ""
    match = re.match(r"libjpeg_turbo (\d+)\.", version)
    return match is not None and int(match.group(1)) >= 3  # 12-bit and lossless came with 3.0


def _imagecodecs_decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom plugin interface: one JPEG frame -> its samples as little-endian bytes of BitsAllocated."""
    import imagecodecs

    samples = imagecodecs.jpeg8_decode(src)
    if samples.shape != (runner.rows, runner.columns) or runner.samples_per_pixel != 1:
        raise ValueError("the JPEG codestream does not hold one greyscale frame of Rows x Columns")
    itemsize = runner.bits_allocated // 8
    if samples.dtype.itemsize > itemsize or itemsize not in (1, 2):
        raise ValueError("the JPEG sample precision exceeds BitsAllocated")
    return samples.astype(f"<u{itemsize}", copy=False).tobytes()


def _register_imagecodecs() -> None:
    for uid in _IMAGECODECS_UIDS:
        try:
            get_decoder(uid).add_plugin("imagecodecs", (__name__, "_imagecodecs_decode_frame"))
        except ValueError:  # registered already (this module was imported twice under one name)
            pass


_register_imagecodecs()
