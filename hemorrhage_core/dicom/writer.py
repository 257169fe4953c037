"""Write CT Image Storage files (used by the synthetic phantom generator and by tests).

Files are complete Part 10 objects any DICOM viewer opens: file meta, SOP class/instance, patient,
study, series, frame of reference, image plane, image pixel, CT image and VOI LUT modules.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

# Names accepted by ``write_ct_slice(transfer_syntax=...)``.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "deflated_le": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k_lossless": JPEG2000Lossless,  # openjpeg needs at least 32 x 32 pixels
}
_ORIENTATION_AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def new_uid(seed_material: str) -> str:
    """A DICOM UID derived (SHA-512) from ``seed_material``: same material, same UID."""
    return str(generate_uid(entropy_srcs=[seed_material]))


def write_ct_slice(
    path: str | os.PathLike,
    stored: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    z: float,
    instance_number: int,
    pixel_spacing: tuple[float, float] = (0.45, 0.45),
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    window_center: float | Sequence[float] = 40.0,
    window_width: float | Sequence[float] = 80.0,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    extra: dict[str, Any] | None = None,
    transfer_syntax: str = "explicit_le",
) -> None:
    """Write one 16-bit CT slice of stored values (HU = stored x slope + intercept) atomically.

    ``stored`` is a 2-D integer array whose values fit ``bits_stored`` bits, signed when
    ``pixel_representation`` is 1. ``window_center``/``window_width`` may be sequences (the RSNA
    multi-valued quirk). ``extra`` sets further keywords (e.g. PatientName, InstitutionName) and may
    override the defaults. ``transfer_syntax`` is one of :data:`TRANSFER_SYNTAXES`. The file appears
    under ``path`` only once complete (temporary file in the same folder + ``os.replace``).
    Raises ValueError for arguments that cannot make a valid file.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}"
        )
    pixels = _checked_pixels(stored, bits_stored, pixel_representation)
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    rows, columns = pixels.shape

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if uid in (RLELossless, JPEG2000Lossless) else uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    # SOP common, patient, general study: Type 2 elements present even when empty.
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # General series, frame of reference, general equipment, general image.
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = new_uid(f"frame-of-reference:{study_uid}")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = ""
    ds.InstanceNumber = int(instance_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Image plane: centre the slice on the z axis, rows along +y, columns along +x.
    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    ds.PixelSpacing = [row_spacing, column_spacing]
    ds.ImagePositionPatient = [-column_spacing * columns / 2.0, -row_spacing * rows / 2.0, float(z)]
    ds.ImageOrientationPatient = _ORIENTATION_AXIAL
    ds.SliceThickness = ""
    # Image pixel and CT image.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = int(pixel_representation)
    ds.KVP = ""
    ds.AcquisitionNumber = ""
    ds.RescaleIntercept = _ds_number(rescale_intercept)
    ds.RescaleSlope = _ds_number(rescale_slope)
    ds.RescaleType = "HU"
    ds.WindowCenter = _ds_values(window_center)
    ds.WindowWidth = _ds_values(window_width)
    for keyword, value in (extra or {}).items():
        if keyword not in pydicom.datadict.keyword_dict:
            raise ValueError(f"extra: {keyword!r} is not a DICOM keyword")
        setattr(ds, keyword, value)

    big_endian = uid == ExplicitVRBigEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
    ds["PixelData"].VR = "OW"
    if uid in (RLELossless, JPEG2000Lossless):
        try:
            ds.compress(uid, pixels, generate_instance_uid=False)
        except RuntimeError as exc:
            raise ValueError(f"cannot encode a {rows} x {columns} slice as {uid.name}: {exc}") from exc
    _write_atomically(Path(path), ds, implicit_vr=uid == ImplicitVRLittleEndian, little_endian=not big_endian)


def _checked_pixels(stored: np.ndarray, bits_stored: int, pixel_representation: int) -> np.ndarray:
    arr = np.asarray(stored)
    if arr.ndim != 2 or 0 in arr.shape or max(arr.shape) > 65535:
        raise ValueError(
            f"stored must be a non-empty 2-D array of at most 65535 x 65535, got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"stored must hold integers (stored values, not HU), got {arr.dtype}")
    if pixel_representation not in (0, 1) or not 1 <= bits_stored <= 16:
        raise ValueError("pixel_representation must be 0 or 1 and bits_stored between 1 and 16")
    if pixel_representation:
        low, high, dtype = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1, np.int16
    else:
        low, high, dtype = 0, (1 << bits_stored) - 1, np.uint16
    if arr.min() < low or arr.max() > high:
        raise ValueError(
            f"stored values span [{arr.min()}, {arr.max()}], outside [{low}, {high}] for "
            f"bits_stored={bits_stored}, pixel_representation={pixel_representation}"
        )
    return np.ascontiguousarray(arr, dtype=dtype)


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters) for a number."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"


def _ds_values(value: float | Sequence[float]) -> str | list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return _ds_number(float(value))  # type: ignore[arg-type]
    return [_ds_number(float(v)) for v in value]


def _write_atomically(path: Path, ds: Dataset, *, implicit_vr: bool, little_endian: bool) -> None:
    # A reader (or a crash) never sees a half-written file. No fsync: a lost phantom file is
    # regenerated from its seed; the rename is what keeps readers from torn data.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 honours the umask, unlike mkstemp's private 0o600.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            pydicom.dcmwrite(
                fh, ds, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=True
            )
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
