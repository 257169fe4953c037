"""The DICOM boundary: the only package that imports pydicom.

``read_slice`` / ``read_header`` turn a file path or bytes into HU and a small metadata record, or
refuse with :class:`~hemorrhage_core.errors.DicomReadError` (a :class:`DicomRefusal` with a reason
code); ``write_ct_slice`` writes CT Image Storage files for the synthetic phantoms and the tests.
"""

from hemorrhage_core.dicom.reader import (
    LIMITS,
    CtSlice,
    DicomRefusal,
    ReadLimits,
    RefusalReason,
    SliceMeta,
    read_header,
    read_slice,
)
from hemorrhage_core.dicom.writer import TRANSFER_SYNTAXES, new_uid, write_ct_slice

__all__ = [
    "LIMITS",
    "TRANSFER_SYNTAXES",
    "CtSlice",
    "DicomRefusal",
    "ReadLimits",
    "RefusalReason",
    "SliceMeta",
    "new_uid",
    "read_header",
    "read_slice",
    "write_ct_slice",
]
