"""A study's prediction as a DICOM Comprehensive 3D SR: a TID 1500 measurement report written with highdicom.

What the SR holds (docs/pacs.md lists it for a PACS administrator):

* one measurement group (TID 1501), finding type "Intracranial hemorrhage" (SCT 1386000), with six
  numeric measurements, one per label: the study-level probability (the maximum over the slices), unit
  UCUM ``1`` (no units), each referencing the slice where that maximum lies; the measurement names are
  the project's own codes (coding scheme ``99HEMCT``, declared in the Coding Scheme Identification);
* the algorithm (TID 4019): this software, its version and the run id;
* the source series as evidence (every predicted instance in the Current Requested Procedure
  Evidence Sequence);
* IHE AI Results conventions: VerificationFlag UNVERIFIED, a series description that starts
  "CAUTION: Not for Diagnostic Use", Contributing Equipment naming the software, its version and the
  run id; new Series and SOP Instance UIDs (highdicom's UID root plus random digits);
* the Patient and Study modules copied from the source header, so the SR lands in the same study, and
  nothing else from it: the source's acquisition equipment (institution, station, serial number),
  which highdicom would add as contributing equipment, is left out.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from hemorrhage_core import __version__
from hemorrhage_core.dicom import new_uid
from hemorrhage_core.errors import PacsError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.pacs.series import StudyPrediction

# highdicom logs each module it copies at INFO; nothing a user needs.
logging.getLogger("highdicom").setLevel(logging.WARNING)

SOFTWARE_NAME = "hemorrhage-ct"
MANUFACTURER = "hemorrhage-ct project"
SERIES_DESCRIPTION = "CAUTION: Not for Diagnostic Use - hemorrhage-ct AI result"
SR_SERIES_NUMBER = 990
CODING_SCHEME = "99HEMCT"  # a private coding scheme: "99" designators are local by the standard (PS3.16 8.2)
PROCEDURE_REPORTED = hd.sr.CodedConcept("24725-4", "LN", "CT Head")
FINDING_TYPE = codes.SCT.IntracranialHemorrhage
UNIT = codes.UCUM.NoUnits
_MEANINGS = {
    "epidural": "Probability of epidural hemorrhage",
    "intraparenchymal": "Probability of intraparenchymal hemorrhage",
    "intraventricular": "Probability of intraventricular hemorrhage",
    "subarachnoid": "Probability of subarachnoid hemorrhage",
    "subdural": "Probability of subdural hemorrhage",
    "any": "Probability of any intracranial hemorrhage",
}
# label -> measurement name; the label itself is the code value (at most 16 characters, as SH allows)
LABEL_CONCEPTS: dict[str, hd.sr.CodedConcept] = {
    label: hd.sr.CodedConcept(label, CODING_SCHEME, _MEANINGS[label]) for label in LABELS
}
# Type 2 patient and study attributes highdicom reads from the source: present, possibly empty.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _header_dataset(header: Mapping[str, Any]) -> Dataset:
    """The source header (DICOM JSON) as a pydicom Dataset, bulk data (pixels, overlays) left out."""
    plain = {tag: element for tag, element in header.items()
             if isinstance(element, Mapping) and "BulkDataURI" not in element and "InlineBinary" not in element}
    try:
        dataset = Dataset.from_json(plain)
    except Exception as exc:  # noqa: BLE001 - a server's header we cannot use: one message, not its content
        raise PacsError(f"the source header cannot be read for the SR ({type(exc).__name__})") from None
    for keyword in _TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, None)
    return dataset


def _reference(study_uid: str, series_uid: str, sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def build_sr(
    prediction: StudyPrediction,
    *,
    run_id: str,
    software_version: str = __version__,
    now: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for a fully predicted study (see the module docstring); PacsError when a slice failed.

    highdicom checks the content tree against TID 1500 while building it.
    """
    study = prediction.study
    if prediction.failed or study is None:
        raise PacsError(f"nothing to store: {len(prediction.failed)} of {len(prediction.slices)} slices of study "
                        f"{prediction.study_uid} could not be predicted")
    series = prediction.series
    if series.header is None:
        raise PacsError("the source header is missing; the SR cannot join the study")
    sop_classes = {ref.sop_instance_uid: ref.sop_class_uid for ref in series.instances}
    predicted = {s.sop_instance_uid for s in prediction.slices}
    header = _header_dataset(series.header)
    if str(header.get("StudyInstanceUID", "")) != prediction.study_uid:
        raise PacsError("the source header belongs to another study")
    header.SeriesInstanceUID = prediction.series_uid
    header.SOPClassUID = sop_classes[series.instances[0].sop_instance_uid]
    header.SOPInstanceUID = series.instances[0].sop_instance_uid
    evidence = [header] + [
        _reference(prediction.study_uid, prediction.series_uid, ref.sop_class_uid, ref.sop_instance_uid)
        for ref in series.instances[1:] if ref.sop_instance_uid in predicted
    ]

    algorithm = hd.sr.AlgorithmIdentification(name=SOFTWARE_NAME, version=software_version,
                                              parameters=[f"run {run_id}"])
    measurements = []
    for label in LABELS:
        top = prediction.max_slice(label)
        measurements.append(hd.sr.Measurement(
            name=LABEL_CONCEPTS[label],
            value=float(study[label]),
            unit=UNIT,
            algorithm_id=algorithm,
            referenced_images=[hd.sr.SourceImageForMeasurement(sop_classes[top.sop_instance_uid],
                                                               top.sop_instance_uid)],
        ))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="hemorrhage probabilities"),
        finding_type=FINDING_TYPE,
        algorithm_id=algorithm,
        measurements=measurements,
    )
    # The same device UID for every report of one run: the observer is this software with that model.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=new_uid(f"{SOFTWARE_NAME}/device/{run_id}"), name=SOFTWARE_NAME, manufacturer_name=MANUFACTURER, model_name=SOFTWARE_NAME)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device)),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
    )
    moment = now or datetime.datetime.now()
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=[software_version],
        contribution_datetime=moment,
        contribution_description=f"AI inference with model run {run_id}"[:1024],  # ST
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=software_version,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[equipment],
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name="hemorrhage-ct model outputs",
            responsible_organization=MANUFACTURER)],
        content_date=moment.date(),
        content_time=moment.time(),
    )
    # highdicom adds the source's acquisition equipment (institution, station, serial number): not ours
    # to copy into a result. Only this software is contributing equipment.
    sr.ContributingEquipmentSequence = [item for item in sr.ContributingEquipmentSequence
                                        if item.get("Manufacturer") == MANUFACTURER]
    return sr


@dataclass(frozen=True)
class SrSummary:
    """What an SR written by ``build_sr`` says, read back (by the tests, a dashboard, a checker)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    values: dict[str, float]  # label -> study-level probability
    max_slices: dict[str, str]  # label -> SOP Instance UID of the slice holding the maximum
    source_series: tuple[str, ...]  # series referenced as evidence
    verified: bool
    series_description: str


def read_sr(dataset: Dataset) -> SrSummary:
    """Parse an SR made by ``build_sr`` with highdicom (which checks it against TID 1500 on the way);
    PacsError when it is not one."""
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
        report = sr.content
        if not isinstance(report, hd.sr.MeasurementReport):
            raise TypeError("its content is not a TID 1500 measurement report")
        groups = report.get_image_measurement_groups()
    except Exception as exc:  # noqa: BLE001 - whatever the dataset holds, one message
        raise PacsError(f"not a measurement report this software can read ({type(exc).__name__}: {exc})") from None
    by_code = {concept.value: label for label, concept in LABEL_CONCEPTS.items()}
    values: dict[str, float] = {}
    max_slices: dict[str, str] = {}
    for group in groups:
        for measurement in group.get_measurements():
            label = by_code.get(measurement.name.value) if measurement.name.scheme_designator == CODING_SCHEME else None
            if label is None:
                continue
            values[label] = float(measurement.value)
            images = measurement.referenced_images
            if images:
                max_slices[label] = str(images[0].referenced_sop_instance_uid)
    evidence = sr.get_evidence()
    return SrSummary(
        study_uid=str(sr.StudyInstanceUID),
        series_uid=str(sr.SeriesInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
        values=values,
        max_slices=max_slices,
        source_series=tuple(sorted({str(series) for _, series, _, _ in evidence})),
        verified=str(sr.get("VerificationFlag", "")) == "VERIFIED",
        series_description=str(sr.get("SeriesDescription", "")),
    )


@dataclass(frozen=True)
class PushedSr:
    """Where a stored SR is: its new series and SOP instance (in the source's study)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str

    def to_dict(self) -> dict[str, str]:
        return {"sop_instance_uid": self.sop_instance_uid, "series_uid": self.series_uid}


def push_result(client: Any, prediction: StudyPrediction, *, run_id: str,
                software_version: str = __version__) -> PushedSr:
    """Build the SR of a fully predicted study and store it (STOW-RS) into the same study.

    PacsError (nothing stored) when a slice failed or the server refuses the SR;
    PacsUnavailableError when the server cannot be reached.
    """
    sr = build_sr(prediction, run_id=run_id, software_version=software_version)
    client.store(sr)
    return PushedSr(str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
