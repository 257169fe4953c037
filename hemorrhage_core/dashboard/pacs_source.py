"""The dashboard's PACS side, without Shiny: find studies, fetch a series as uploads, store the result,
and the worklist of recent CT studies with what is known of each.

A PACS series becomes what an upload is: its instances are fetched (WADO-RS, in memory) into
``Upload`` objects and predicted by the Predict panel's own pipeline (``analyse_uploads`` through the
run's cached, calibrated Predictor), so a study from the PACS shows the same slice list, probabilities,
aligned image, Grad-CAM and series verdict as uploaded files, with the same numbers.
``study_prediction`` turns those results into the library's ``StudyPrediction``, which
``hemorrhage_core.pacs.push_result`` stores as a DICOM SR.

Every function that talks to the server blocks: the panels call them from worker threads (extended
tasks). Each call opens its own ``PacsClient`` (one HTTP session) and closes it, so no two threads
share one. Credentials are read from the environment by the library when a call is made and never
pass through here. Nothing is asked of any server while ``HEMORRHAGE_DICOMWEB_URL`` is unset, and
``hemorrhage_core.pacs`` (dicomweb-client, highdicom) is imported only when one is configured.

What the worklist knows of a study comes from two places: the studies this dashboard predicted
(``DashboardResults``: process-wide, in memory, gone when the app stops) and the state file of a
``pacs watch`` with the same server and run, which keeps each study's study-level probabilities.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hemorrhage_core.dashboard.config import PACS_MAX_SLICES_ENV, PACS_URL_ENV, DashboardConfig
from hemorrhage_core.dashboard.predictors import Upload, UploadResult
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.errors import PacsError
from hemorrhage_core.labels import LABELS

if TYPE_CHECKING:
    from hemorrhage_core.pacs import PacsClient, PushedSr, SeriesAssessment, StudyPrediction, StudySummary

log = logging.getLogger("hemorrhage_core.dashboard")

NOT_CONFIGURED = (
    f"No PACS is configured: set {PACS_URL_ENV} to its DICOMweb address (credentials in "
    "HEMORRHAGE_DICOMWEB_USER and HEMORRHAGE_DICOMWEB_PASSWORD, or HEMORRHAGE_DICOMWEB_TOKEN) and restart "
    "the dashboard."
)
DASHBOARD, WATCH = "dashboard", "watch"


def pacs_message(exc: BaseException, *, context: str) -> str:
    """Text for the page: the library's PACS errors as they are (they name the server by its URL and
    never quote it or the credentials), the command line's option names replaced by the dashboard's
    settings; anything else a generic sentence (details in the server log)."""
    text = user_message(exc, context=context)
    return text.replace("--url", PACS_URL_ENV)


def connect(config: DashboardConfig) -> PacsClient:
    """A new client for the configured server; PacsError when none is configured or the settings
    (URL, credentials, CA bundle) cannot be used."""
    if not config.pacs_url:
        raise PacsError(NOT_CONFIGURED)
    from hemorrhage_core.pacs import PacsClient

    return PacsClient.from_url(config.pacs_url, timeout_s=config.pacs_timeout_s)


def server_url(config: DashboardConfig) -> str:
    """The configured URL as the library writes it (the key of results and watch state files)."""
    if not config.pacs_url:
        raise PacsError(NOT_CONFIGURED)
    from hemorrhage_core.pacs.client import check_url

    return check_url(config.pacs_url)


# ----------------------------------------------------------------------------------- studies, series
def list_studies(config: DashboardConfig, *, limit: int | None = None) -> list[StudySummary]:
    """The server's CT studies, newest first (no patient attribute: see ``StudySummary``)."""
    with connect(config) as client:
        return client.find_studies(modality="CT", limit=limit or config.pacs_worklist_limit)


def _date(text: str | None) -> str:
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "no date"


def study_label(study: StudySummary) -> str:
    """How a study is named in a picker: date, description, modalities, size, and the end of its UID
    (studies of one day with one description are told apart by it). No patient attribute."""
    parts = [_date(study.study_date), study.description or "no description", "/".join(study.modalities) or "?"]
    if study.n_series is not None:
        parts.append(f"{study.n_series} series")
    if study.n_instances is not None:
        parts.append(f"{study.n_instances} images")
    parts.append(f"…{study.study_uid[-6:]}")
    return " · ".join(parts)


@dataclass(frozen=True)
class SeriesChoice:
    """A series of a study as the picker lists it: ``n_slices`` usable axial CT slices, or ``refusal``."""

    series_uid: str
    number: int | None
    description: str | None
    modality: str
    n_slices: int
    refusal: str | None = None

    @property
    def label(self) -> str:
        number = f"#{self.number}" if self.number is not None else "#?"
        return f"{number} · {self.description or 'no description'} · {self.n_slices} slices"


def list_series(config: DashboardConfig, study_uid: str) -> list[SeriesChoice]:
    """Every series of a study, each assessed as ``pacs predict`` assesses it (CT, single-frame,
    no localizer, axial), by series number. Reads the CT series' headers (no pixels)."""
    from hemorrhage_core.pacs import assess_series
    from hemorrhage_core.pacs.client import check_uid

    study_uid = check_uid(study_uid, "study")
    with connect(config) as client:
        found = client.find_series(study_uid)
        if not found:
            raise PacsError(f"study {study_uid} was not found on {client.url} (or holds no series)")
        out = []
        for summary in found:
            if summary.modality != "CT":
                out.append(SeriesChoice(summary.series_uid, summary.number, summary.description, summary.modality,
                                        0, f"modality {summary.modality or 'not given'}, not CT"))
                continue
            assessed = assess_series(study_uid, summary, client.series_metadata(study_uid, summary.series_uid))
            out.append(SeriesChoice(summary.series_uid, summary.number, summary.description, summary.modality,
                                    len(assessed.instances), assessed.refusal))
        return out


def default_series(choices: Sequence[SeriesChoice]) -> str | None:
    """The series ``pacs predict`` would choose: the usable one with the most slices (ties: the lowest
    series number)."""
    usable = [c for c in choices if c.refusal is None]
    if not usable:
        return None
    best = max(usable, key=lambda c: (c.n_slices, -(c.number if c.number is not None else 1 << 31)))
    return best.series_uid


# ----------------------------------------------------------------------------------- fetch, push
@dataclass(eq=False)
class PacsOrigin:
    """Where a batch of uploads came from: one series of one study on the server at ``url``.

    ``sop_uids[i]`` is the SOP Instance UID of upload ``i``; ``fetch_errors`` the instances the server
    would not give (SOP Instance UID -> message). ``series`` (the library's assessment, holding the
    source header for the SR) is never shown.
    """

    url: str
    study_uid: str
    series_uid: str
    series: SeriesAssessment = field(repr=False)
    sop_uids: tuple[str, ...]
    fetch_errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def n_instances(self) -> int:
        return len(self.series.instances)

    @property
    def series_label(self) -> str:
        number = f"#{self.series.number}" if self.series.number is not None else "#?"
        return f"series {number} ({self.series.description or 'no description'})"


@dataclass(frozen=True)
class FetchedSeries:
    """A series fetched into memory: one ``Upload`` per instance the server gave, in z order."""

    origin: PacsOrigin
    uploads: tuple[Upload, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(f"instance {uid}: {text}" for uid, text in self.origin.fetch_errors.items())


def fetch_series(
    config: DashboardConfig,
    study_uid: str,
    series_uid: str | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> FetchedSeries:
    """Choose the series as ``pacs predict`` does (``series_uid``, or the usable axial CT series with
    the most slices), then fetch each usable instance's bytes.

    PacsError when the series cannot be predicted or holds more than ``config.pacs_max_slices``
    slices; PacsUnavailableError when the server goes away. An instance the server refuses is left out
    and named in ``fetch_errors``. ``progress(done, total)`` after each instance.
    """
    from hemorrhage_core.errors import PacsUnavailableError
    from hemorrhage_core.pacs import choose_series

    with connect(config) as client:
        series = choose_series(client, study_uid, series_uid)
        total = len(series.instances)
        if total > config.pacs_max_slices:
            raise PacsError(
                f"series {series.series_uid} has {total} slices, more than the dashboard holds in memory "
                f"({config.pacs_max_slices}, set by {PACS_MAX_SLICES_ENV}); `python -m training pacs predict` "
                "predicts it without that limit")
        uploads: list[Upload] = []
        sop_uids: list[str] = []
        errors: dict[str, str] = {}
        for position, ref in enumerate(series.instances):
            try:
                data = client.fetch_instance(series.study_uid, series.series_uid, ref.sop_instance_uid)
            except PacsUnavailableError:
                raise
            except PacsError as exc:
                errors[ref.sop_instance_uid] = str(exc)
            else:
                name = f"instance {ref.instance_number}" if ref.instance_number is not None else f"slice {position + 1}"
                uploads.append(Upload(name=name, data=data))
                sop_uids.append(ref.sop_instance_uid)
            if progress is not None:
                progress(position + 1, total)
        origin = PacsOrigin(client.url, series.study_uid, series.series_uid, series, tuple(sop_uids), errors)
        return FetchedSeries(origin, tuple(uploads))


def study_prediction(origin: PacsOrigin, results: Sequence[UploadResult], *, run_id: str) -> StudyPrediction:
    """The library's ``StudyPrediction`` of a series predicted as uploads: one slice per instance of the
    series in z order, with the probabilities shown in the page (calibrated, ``any`` rule applied), or
    the reason it has none (not fetched, refused by the reader)."""
    from hemorrhage_core.pacs import SlicePrediction, StudyPrediction

    by_uid = {origin.sop_uids[r.index]: r for r in results if 0 <= r.index < len(origin.sop_uids)}
    slices = []
    for ref in origin.series.instances:
        uid = ref.sop_instance_uid
        result = by_uid.get(uid)
        if result is None:
            slices.append(SlicePrediction(uid, ref.z, None, (), origin.fetch_errors.get(uid, "not fetched")))
        elif not result.ok:
            slices.append(SlicePrediction(uid, ref.z, None, (), result.error))
        else:
            probabilities = {label: float(result.probabilities[label]) for label in LABELS}
            z = ref.z if ref.z is not None else result.z
            slices.append(SlicePrediction(uid, z, probabilities, tuple(result.flags)))
    return StudyPrediction(origin.study_uid, origin.series_uid, tuple(slices), origin.series, run_id)


def push(config: DashboardConfig, prediction: StudyPrediction, *, run_id: str) -> PushedSr:
    """Store the prediction's SR into its study (``hemorrhage_core.pacs.push_result``); PacsError when
    a slice failed (nothing is stored) or the server refuses it."""
    from hemorrhage_core.pacs import push_result

    with connect(config) as client:
        return push_result(client, prediction, run_id=run_id)


@dataclass(frozen=True)
class OpenStudy:
    """A click on the worklist: show this study's series (None: the one ``pacs predict`` would choose)
    in the Predict panel, predicted by this run."""

    study_uid: str
    series_uid: str | None
    run_id: str | None


# ----------------------------------------------------------------------------------- results, worklist
def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StudyResult:
    """What is known of a study's prediction by one run: the study-level probabilities (each label's
    maximum over the series' slices), which series, when, by whom (``dashboard`` or ``watch``), and
    the stored SR when there is one."""

    study_uid: str
    probabilities: Mapping[str, float]
    series_uid: str | None
    at: str
    source: str
    sr_sop_instance_uid: str | None = None


class DashboardResults:
    """The studies this dashboard predicted, per (server, run): process-wide, thread-safe, in memory.

    Shared by every session (the worklist is the server's, not a session's); forgotten when the app
    stops, while the SRs stored in the PACS stay. ``version`` changes with every change (cheap to poll).
    """

    def __init__(self, max_studies: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._results: dict[tuple[str, str], dict[str, StudyResult]] = {}
        self._max = max_studies
        self.version = 0

    def record(self, url: str, run_id: str, result: StudyResult) -> None:
        with self._lock:
            studies = self._results.setdefault((url, run_id), {})
            studies.pop(result.study_uid, None)
            studies[result.study_uid] = result
            while len(studies) > self._max:  # the oldest entry goes first
                studies.pop(next(iter(studies)))
            self.version += 1

    def mark_pushed(self, url: str, run_id: str, study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
        """Note the SR stored for a study predicted here (of that series)."""
        with self._lock:
            current = self._results.get((url, run_id), {}).get(study_uid)
            if current is not None and current.series_uid == series_uid:
                self._results[(url, run_id)][study_uid] = StudyResult(
                    current.study_uid, current.probabilities, current.series_uid, current.at, current.source,
                    sop_instance_uid)
                self.version += 1

    def results(self, url: str, run_id: str) -> dict[str, StudyResult]:
        with self._lock:
            return dict(self._results.get((url, run_id), {}))


def complete_result(origin: PacsOrigin, results: Sequence[UploadResult]) -> StudyResult | None:
    """The study result of a series predicted in full (every instance fetched and predicted), else None:
    a maximum over part of a series would understate the study."""
    usable = [r for r in results if r.ok]
    if origin.fetch_errors or len(usable) != origin.n_instances or len(results) != len(usable):
        return None
    probabilities = {label: max(float(r.probabilities[label]) for r in usable) for label in LABELS}
    return StudyResult(origin.study_uid, probabilities, origin.series_uid, _now(), DASHBOARD)


def watch_state_path(config: DashboardConfig, url: str, run_id: str) -> Path:
    """The state file of ``pacs watch --url URL --run RUN`` (its default), or the configured one."""
    if config.pacs_watch_state is not None:
        return config.pacs_watch_state
    from hemorrhage_core.pacs import default_state_path

    return default_state_path(url, run_id)


def watch_results(path: Path, url: str, run_id: str) -> dict[str, StudyResult]:
    """The predicted and pushed studies of a watch state file with their study-level probabilities
    ({} when there is no such file; PacsError when it is damaged or belongs to another server or run).
    Entries written before the watch kept probabilities are left out."""
    from hemorrhage_core.pacs import WatchState

    if not path.is_file():
        return {}
    state = WatchState.load(path, url=url, run_id=run_id)
    out: dict[str, StudyResult] = {}
    for study_uid, entry in state.studies.items():
        if not isinstance(entry, Mapping) or entry.get("status") not in ("predicted", "pushed"):
            continue
        values = entry.get("study")
        if not isinstance(values, Mapping):
            continue
        try:
            probabilities = {label: float(values[label]) for label in LABELS}
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probabilities.values()):
            continue
        out[str(study_uid)] = StudyResult(
            str(study_uid), probabilities, _str_or_none(entry.get("series_uid")), str(entry.get("at") or ""), WATCH,
            _str_or_none(entry.get("sr_sop_instance_uid")))
    return out


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def merge_results(*sources: Mapping[str, StudyResult]) -> dict[str, StudyResult]:
    """One result per study: the most recent (``at``); on a tie the one of the later source."""
    merged: dict[str, StudyResult] = {}
    for source in sources:
        for uid, result in source.items():
            if uid not in merged or result.at >= merged[uid].at:
                merged[uid] = result
    return merged


@dataclass(frozen=True)
class WorklistRow:
    """A study on the worklist, its result (None: not predicted by this run) and the run's study-level
    threshold for ``any`` (None: the run offers none)."""

    study: StudySummary
    result: StudyResult | None
    threshold: float | None

    @property
    def any(self) -> float | None:
        return None if self.result is None else float(self.result.probabilities["any"])

    @property
    def flagged(self) -> bool:
        """Suspected hemorrhage: the study's ``any`` at or above the threshold (the rule it was chosen by)."""
        return self.any is not None and self.threshold is not None and self.any >= self.threshold


def worklist_rows(
    studies: Sequence[StudySummary], results: Mapping[str, StudyResult], threshold: float | None
) -> list[WorklistRow]:
    """The worklist in reading order: suspected hemorrhage first (highest ``any`` first), then every other
    study (predicted below the threshold, or not predicted) in the order given (``find_studies``:
    newest first)."""
    rows = [WorklistRow(s, results.get(s.study_uid), threshold) for s in studies]
    flagged = sorted((r for r in rows if r.flagged), key=lambda r: -(r.any or 0.0))  # stable: ties keep order
    return flagged + [r for r in rows if not r.flagged]


def run_any_threshold(run_dir: Path) -> tuple[float | None, str]:
    """The run's study-level threshold for ``any`` on the scale the dashboard shows (calibrated when the
    run is), and a sentence saying where it comes from."""
    from hemorrhage_core.evaluations import read_calibration, run_thresholds

    calibration = read_calibration(run_dir)
    chosen = run_thresholds(run_dir, calibration)
    value = (chosen.get("study") or {}).get("any")
    if value is None:
        return None, "The run offers no threshold."
    if chosen.get("data") is None:
        how = "0.5: the run has no validation predictions to choose a threshold on"
    elif "any" in (chosen.get("study_defaulted") or []):
        how = "0.5: validation could not choose one"
    else:
        how = "chosen on the run's validation set at study level (Youden's J)"
    scale = "calibrated probabilities" if calibration is not None else "the model's probabilities"
    return float(value), f"{how}; on {scale}"


def describe_state_problem(exc: BaseException) -> str:
    """A watch state file that cannot be used, in one line (its results are then left out)."""
    return f"The results of `pacs watch` cannot be read: {pacs_message(exc, context='watch state')}"

