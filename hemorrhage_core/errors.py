"""The project's exception types: every refusal a user can meet is one of these."""


class HemorrhageError(Exception):
    """Base class: a problem with the user's input or files, said in words a person understands."""


class DicomReadError(HemorrhageError):
    """A file or byte string is not a usable single-frame greyscale image slice."""


class CheckpointError(HemorrhageError):
    """A checkpoint is unsafe, malformed, for another architecture or holds non-finite weights."""


class WeightsUnavailableError(HemorrhageError):
    """Pretrained weights were asked for but are not on this machine (and nothing is downloaded)."""


class InputRejectedError(HemorrhageError):
    """The Predictor refuses an input it was not made for (not CT, not head-like HU content)."""


class DatasetError(HemorrhageError):
    """A data-set folder, its label CSV or its index cannot be used as asked (missing, malformed, empty)."""


class PacsError(HemorrhageError):
    """A DICOMweb server refused what was asked, or holds nothing usable for it (bad URL or credentials,
    unknown study, no CT series)."""


class PacsUnavailableError(PacsError):
    """A DICOMweb server cannot be reached, did not answer in time or failed (HTTP 5xx): asking again
    later may work."""
