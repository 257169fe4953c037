"""PACS node: find CT studies on a DICOMweb server, predict a study's axial CT series with the one
Predictor, and store the result into the same study as a DICOM Comprehensive 3D SR.

The only package that imports ``dicomweb-client`` and ``highdicom``. A caller (the ``pacs`` command, a
dashboard) holds a ``PacsClient`` and a ``Predictor`` and calls::

    client = PacsClient.from_url(url)                    # credentials from the environment
    studies = client.find_studies(modality="CT", since="20250101")
    result = predict_study(client, predictor, study_uid, run_id=run_id)
    result.to_dict()                                     # slices, study-level maxima
    pushed = push_result(client, result, run_id=run_id)  # only when no slice failed

``Watcher`` polls for new studies and does the same for each, once. Errors are ``PacsError`` (give up)
and ``PacsUnavailableError`` (try again later). No patient name or id appears in anything returned
(``StudySummary``, ``StudyPrediction.to_dict``) or logged.
"""

from hemorrhage_core.pacs.client import (
    DEFAULT_LIMIT,
    DEFAULT_TIMEOUT_S,
    ENV_CA_BUNDLE,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    PacsClient,
    PacsSettings,
    SeriesSummary,
    StudySummary,
)
from hemorrhage_core.pacs.series import (
    SeriesAssessment,
    SlicePrediction,
    StudyPrediction,
    assess_series,
    choose_series,
    predict_series,
    predict_study,
)
from hemorrhage_core.pacs.sr import PushedSr, SrSummary, build_sr, push_result, read_sr
from hemorrhage_core.pacs.watch import Watcher, WatchState, default_state_path

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TIMEOUT_S",
    "ENV_CA_BUNDLE",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "PacsClient",
    "PacsSettings",
    "PushedSr",
    "SeriesAssessment",
    "SeriesSummary",
    "SlicePrediction",
    "SrSummary",
    "StudyPrediction",
    "StudySummary",
    "WatchState",
    "Watcher",
    "assess_series",
    "build_sr",
    "choose_series",
    "default_state_path",
    "predict_series",
    "predict_study",
    "push_result",
    "read_sr",
]
