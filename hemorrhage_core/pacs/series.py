"""Which series of a study to predict, and predicting it slice by slice with the one Predictor.

``assess_series`` (pure, on WADO-RS metadata) says whether a series can be predicted: CT, single-frame CT
Image Storage instances, not a localizer, axial. ``choose_series`` applies it to a study's series and
picks the usable one with the most slices (or checks the one asked for). ``predict_study`` fetches the
chosen series' instances (WADO-RS, in memory) a batch at a time, or all of them first for a 2.5D model
that reads each slice with its neighbours, and predicts them with ``Predictor.predict_many``: the same
reading, preprocessing, model and calibration as ``predict``, ``evaluate`` and the dashboard. A slice
that cannot be fetched or read is reported with its error; the others are still predicted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hemorrhage_core.errors import HemorrhageError, PacsError, PacsUnavailableError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.pacs.client import PacsClient, SeriesSummary, check_uid, json_value

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# |cos| between the slice normal and the patient's z axis above which a slice counts as axial: a
# gantry tilt of up to ~37 degrees stays axial, a coronal or sagittal reformat does not.
AXIAL_MIN_COSINE = 0.8


@dataclass(frozen=True)
class InstanceRef:
    """One instance of a series as its header describes it (no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    z: float | None
    instance_number: int | None


@dataclass(frozen=True)
class SeriesAssessment:
    """Whether a series can be predicted: ``refusal`` is None, or says why not in words.

    ``instances``: the usable ones, ordered along z (then by instance number). ``header`` is the first
    usable instance's DICOM JSON header (patient and study modules included) for the SR writer; it is
    left out of ``repr`` and never printed.
    """

    study_uid: str
    series_uid: str
    modality: str
    description: str | None
    number: int | None
    instances: tuple[InstanceRef, ...]
    refusal: str | None
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> instances of the series left out
    header: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)


def _floats(values: Any) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _is_axial(orientation: list[float] | None) -> bool | None:
    """True / False from ImageOrientationPatient; None when it is absent or malformed."""
    if orientation is None or len(orientation) != 6:
        return None
    (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:]
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    norm = math.sqrt(nx * nx + ny * ny + nz * nz)
    if norm < 1e-6:
        return None
    return abs(nz) / norm >= AXIAL_MIN_COSINE


def assess_series(study_uid: str, summary: SeriesSummary, metadata: Sequence[Mapping[str, Any]]) -> SeriesAssessment:
    """Which instances of a series can be predicted, from its WADO-RS metadata (DICOM JSON per instance).

    Left out: instances of another SOP class than CT Image Storage (enhanced multi-frame CT, secondary
    captures, dose reports), localizers (ImageType holding LOCALIZER) and slices that are not axial. The
    series is refused when it is not CT or nothing is left.
    """
    modality = summary.modality
    if not modality and metadata:  # a server that leaves Modality out of QIDO answers
        modality = str(json_value(metadata[0], "Modality") or "").strip().upper()

    def refused(reason: str, left_out: dict[str, int] | None = None) -> SeriesAssessment:
        return SeriesAssessment(study_uid, summary.series_uid, modality, summary.description, summary.number, (),
                                reason, left_out or {})

    if modality != "CT":
        return refused(f"modality {modality or 'not given'}, not CT")
    if not metadata:
        return refused("it holds no instances")
    kept: list[tuple[InstanceRef, Mapping[str, Any]]] = []
    left_out: dict[str, int] = {}
    for item in metadata:
        sop_uid = str(json_value(item, "SOPInstanceUID") or "")
        sop_class = str(json_value(item, "SOPClassUID") or "")
        image_type = [str(v).upper() for v in json_value(item, "ImageType", None)]
        orientation = _floats(json_value(item, "ImageOrientationPatient", None))
        if not sop_uid:
            reason = "instances without a SOP Instance UID"
        elif sop_class != CT_IMAGE_STORAGE:
            reason = f"not single-frame CT images (SOP class {sop_class or 'missing'})"
        elif "LOCALIZER" in image_type:
            reason = "localizer (scout) images"
        elif _is_axial(orientation) is False:
            reason = "slices that are not axial (coronal or sagittal reformats)"
        else:
            position = _floats(json_value(item, "ImagePositionPatient", None))
            z = position[2] if position is not None and len(position) == 3 else None
            number = json_value(item, "InstanceNumber")
            kept.append((InstanceRef(sop_uid, sop_class, z, int(number) if isinstance(number, int | float) else None),
                         item))
            continue
        left_out[reason] = left_out.get(reason, 0) + 1
    if not kept:
        main_reason = max(left_out, key=left_out.get)
        return refused(f"it holds only {main_reason}", left_out)
    kept.sort(key=lambda pair: (pair[0].z is None, pair[0].z or 0.0,
                                pair[0].instance_number if pair[0].instance_number is not None else 0,
                                pair[0].sop_instance_uid))
    return SeriesAssessment(study_uid, summary.series_uid, modality, summary.description, summary.number,
                            tuple(ref for ref, _ in kept), None, left_out, kept[0][1])


def choose_series(client: PacsClient, study_uid: str, series_uid: str | None = None) -> SeriesAssessment:
    """The series of a study to predict: ``series_uid`` if given and usable, else the usable axial CT
    series with the most slices (ties: the lowest series number). PacsError says why none can be."""
    study_uid = check_uid(study_uid, "study")
    series = client.find_series(study_uid)
    if not series:
        raise PacsError(f"study {study_uid} was not found on {client.url} (or holds no series)")
    if series_uid is not None:
        series_uid = check_uid(series_uid, "series")
        chosen = next((s for s in series if s.series_uid == series_uid), None)
        if chosen is None:
            raise PacsError(f"series {series_uid} is not in study {study_uid}")
        found = assess_series(study_uid, chosen, client.series_metadata(study_uid, series_uid) if chosen.modality == "CT" else [])
        if found.refusal:
            raise PacsError(f"series {series_uid} cannot be predicted: {found.refusal}; this model reads axial head CT")
        return found
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        modalities = ", ".join(sorted({s.modality or "?" for s in series}))
        raise PacsError(f"study {study_uid} holds no CT series (modalities: {modalities})")
    assessed = [assess_series(study_uid, s, client.series_metadata(study_uid, s.series_uid)) for s in ct]
    usable = [a for a in assessed if a.refusal is None]
    if not usable:
        reasons = "; ".join(f"series {a.series_uid}: {a.refusal}" for a in assessed)
        raise PacsError(f"study {study_uid} has no usable axial CT series ({reasons})")
    return max(usable, key=lambda a: (len(a.instances), -(a.number if a.number is not None else 1 << 31)))


@dataclass(frozen=True)
class SlicePrediction:
    """One slice's outcome: probabilities in LABELS order (calibrated when the run is), or an error."""

    sop_instance_uid: str
    z: float | None
    probabilities: dict[str, float] | None
    warnings: tuple[str, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "z": self.z, "probabilities": self.probabilities,
                "warnings": list(self.warnings), "error": self.error}


@dataclass(frozen=True)
class StudyPrediction:
    """A study's series predicted slice by slice, in z order.

    ``study`` is each label's maximum over the predicted slices (None when none was predicted);
    ``failed`` the slices that could not be. ``series`` (repr-less) keeps what the SR writer needs: the
    instances' SOP classes and the header with the patient and study modules.
    """

    study_uid: str
    series_uid: str
    slices: tuple[SlicePrediction, ...]
    series: SeriesAssessment = field(repr=False, compare=False)
    run_id: str | None = None

    @property
    def failed(self) -> tuple[SlicePrediction, ...]:
        return tuple(s for s in self.slices if s.error is not None)

    @property
    def study(self) -> dict[str, float] | None:
        predicted = [s.probabilities for s in self.slices if s.probabilities is not None]
        if not predicted:
            return None
        return {label: max(p[label] for p in predicted) for label in LABELS}

    def max_slice(self, label: str) -> SlicePrediction:
        """The first slice (in z order) with the study's maximum probability of ``label``."""
        predicted = [s for s in self.slices if s.probabilities is not None]
        if not predicted:
            raise ValueError("no slice was predicted")
        return max(predicted, key=lambda s: s.probabilities[label])  # max keeps the first of equals

    def to_dict(self, pushed: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The JSON the ``pacs predict`` command prints (``pushed``: what was stored, or None)."""
        return {"study_uid": self.study_uid, "series_uid": self.series_uid,
                "slices": [s.to_dict() for s in self.slices], "study": self.study,
                "pushed": dict(pushed) if pushed is not None else None}


def _message(exc: BaseException) -> str:
    if isinstance(exc, HemorrhageError):
        return str(exc) or type(exc).__name__
    return f"internal error while predicting ({type(exc).__name__})"


def _outcome(ref: InstanceRef, result: Any) -> SlicePrediction:
    if isinstance(result, BaseException):
        return SlicePrediction(ref.sop_instance_uid, ref.z, None, (), _message(result))
    probabilities = {label: float(result.probabilities[label]) for label in LABELS}
    if not all(math.isfinite(p) for p in probabilities.values()):
        return SlicePrediction(ref.sop_instance_uid, ref.z, None, (), "the model gave a non-finite probability")
    z = ref.z if ref.z is not None else result.meta.get("z")
    return SlicePrediction(ref.sop_instance_uid, z, probabilities, tuple(str(f) for f in result.flags or ()))


def predict_series(
    client: PacsClient,
    predictor: Any,
    series: SeriesAssessment,
    *,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StudyPrediction:
    """Fetch and predict every usable instance of ``series`` in forwards of ``batch_size`` (default: the
    Predictor's) slices.

    A 2D model's series is fetched and predicted a batch at a time, so memory holds one batch of slices
    whatever the series' length. A 2.5D model (``predictor.context`` > 0) reads each slice with its
    neighbours, which a batch boundary would cut off: its whole series is fetched first and predicted in
    one ``predict_many`` call, so memory holds the series' bytes and preprocessed slices.

    A slice the server will not give, or that the reader or Predictor refuses, gets an error; the server
    going away (PacsUnavailableError) stops the whole prediction. ``progress(done, total)`` is called
    after each batch (a 2.5D model's series: once, when it is predicted).
    """
    size = max(1, int(batch_size or getattr(predictor, "batch_size", 16)))
    refs = series.instances
    # The instances fetched before each predict_many call: a 2.5D model's whole series, else one batch.
    step = max(1, len(refs)) if int(getattr(predictor, "context", 0) or 0) > 0 else size
    outcomes: list[SlicePrediction] = []
    for start in range(0, len(refs), step):
        fetched = [_fetch(client, series, ref) for ref in refs[start : start + step]]
        outcomes += _predict_fetched(predictor, fetched, size)
        if progress is not None:
            progress(len(outcomes), len(refs))
    return StudyPrediction(series.study_uid, series.series_uid, tuple(outcomes), series)


def _fetch(
    client: PacsClient, series: SeriesAssessment, ref: InstanceRef
) -> tuple[InstanceRef, bytes | None, str | None]:
    """One instance's bytes, or why the server would not give it; PacsUnavailableError propagates."""
    try:
        return ref, client.fetch_instance(series.study_uid, series.series_uid, ref.sop_instance_uid), None
    except PacsUnavailableError:
        raise
    except PacsError as exc:
        return ref, None, str(exc)


def _predict_fetched(
    predictor: Any, fetched: Sequence[tuple[InstanceRef, bytes | None, str | None]], size: int
) -> list[SlicePrediction]:
    """The outcomes of fetched instances in order: one ``predict_many`` call over those that arrived."""
    from hemorrhage_core.inference import isolating  # torch only once a series is predicted

    ready = [data for _, data, _ in fetched if data is not None]
    # If the call breaks, isolating predicts one slice at a time (a 2.5D model then flags them no_neighbours).
    results = iter(isolating(lambda batch: predictor.predict_many(batch, batch_size=size), ready)
                   if ready else ())
    return [SlicePrediction(ref.sop_instance_uid, ref.z, None, (), error) if data is None
            else _outcome(ref, next(results)) for ref, data, error in fetched]


def predict_study(
    client: PacsClient,
    predictor: Any,
    study_uid: str,
    *,
    series_uid: str | None = None,
    batch_size: int | None = None,
    run_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StudyPrediction:
    """``choose_series`` then ``predict_series``: a study's axial CT series (or ``series_uid``) predicted.

    ``run_id`` (the run whose model the Predictor holds) travels with the result to the SR.
    """
    series = choose_series(client, study_uid, series_uid)
    for reason, count in series.left_out.items():
        log.info("series %s: %d instance(s) left out: %s", series.series_uid, count, reason)
    result = predict_series(client, predictor, series, batch_size=batch_size, progress=progress)
    return StudyPrediction(result.study_uid, result.series_uid, result.slices, series, run_id)
