"""A DICOMweb server seen through ``dicomweb-client``: QIDO-RS to find, WADO-RS to fetch, STOW-RS to store.

Any DICOMweb server works (Orthanc, dcm4chee, Google Healthcare, ...). Credentials come from the
environment, never from the command line or the URL, so they stay out of shell history, process lists and
messages: ``HEMORRHAGE_DICOMWEB_USER`` + ``HEMORRHAGE_DICOMWEB_PASSWORD`` (HTTP basic) or
``HEMORRHAGE_DICOMWEB_TOKEN`` (a bearer token). TLS certificates are verified (against
``HEMORRHAGE_DICOMWEB_CA_BUNDLE`` when set); every request has a connect and a read timeout, and no
request is retried here (the watcher retries whole polls, with back-off), so a call takes at most about
its timeout.

Every failure is a :class:`~hemorrhage_core.errors.PacsError` in words a person understands:
:class:`~hemorrhage_core.errors.PacsUnavailableError` when asking again later may work (cannot connect,
timeout, HTTP 5xx), the base class when it will not (bad URL, credentials refused, not found). Messages
name the server by its URL (which holds no credentials: a URL with ``user:password@`` is refused) and
never quote what the server sent back.

What is returned is an allowlist of study and series attributes: QIDO answers carry patient names and
ids, which are dropped here and never leave this module except inside the DICOM headers that
``series_metadata`` returns for the SR writer.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient

from hemorrhage_core.errors import PacsError, PacsUnavailableError

log = logging.getLogger(__name__)
# dicomweb-client logs every request at INFO (one line per slice fetched): this module says what matters.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

ENV_USER = "HEMORRHAGE_DICOMWEB_USER"
ENV_PASSWORD = "HEMORRHAGE_DICOMWEB_PASSWORD"
ENV_TOKEN = "HEMORRHAGE_DICOMWEB_TOKEN"
ENV_CA_BUNDLE = "HEMORRHAGE_DICOMWEB_CA_BUNDLE"

DEFAULT_TIMEOUT_S = 30.0
# A QIDO answer is asked for in one page: Orthanc 1.10 / DICOMweb 1.7 ignores ``offset`` when a study is
# filtered by ModalitiesInStudy, so paging would repeat or lose studies there.
DEFAULT_LIMIT = 1000

# DICOM JSON tags (Part 18 F.2): group + element, upper-case hex.
TAG = {
    "StudyDate": "00080020",
    "ModalitiesInStudy": "00080061",
    "Modality": "00080060",
    "StudyDescription": "00081030",
    "SeriesDescription": "0008103E",
    "SOPClassUID": "00080016",
    "SOPInstanceUID": "00080018",
    "ImageType": "00080008",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SeriesNumber": "00200011",
    "InstanceNumber": "00200013",
    "ImagePositionPatient": "00200032",
    "ImageOrientationPatient": "00200037",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "NumberOfSeriesRelatedInstances": "00201209",
    "FailedSOPSequence": "00081198",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def json_value(item: Mapping[str, Any], keyword: str, index: int | None = 0) -> Any:
    """The value of ``keyword`` in a DICOM JSON object: the ``index``-th value (None when absent), or
    the whole list with ``index=None``."""
    element = item.get(TAG.get(keyword, keyword)) or {}
    values = element.get("Value") if isinstance(element, Mapping) else None
    if not isinstance(values, list):
        return None if index is not None else []
    if index is None:
        return values
    return values[index] if len(values) > index else None


def _int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def check_uid(uid: str, what: str = "UID") -> str:
    """``uid`` if it is a well-formed DICOM UID (digits and dots, at most 64 characters), else PacsError."""
    uid = str(uid).strip()
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise PacsError(f"{what} {uid[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def check_url(url: str) -> str:
    """The DICOMweb base URL without a trailing slash; PacsError for one that cannot be used."""
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"--url must be an http:// or https:// DICOMweb address, e.g. "
                        f"http://pacs.example.org:8042/dicom-web (got {parts.scheme or 'no scheme'}://...)")
    if parts.username is not None or parts.password is not None:
        # Never repeat the URL here: it holds the credentials.
        raise PacsError(f"--url must not hold credentials; set {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}) "
                        "in the environment instead")
    if parts.query or parts.fragment:
        raise PacsError("--url must be the DICOMweb base address, without a query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise PacsError("--url has a port that is not a number between 0 and 65535") from None
    return text.rstrip("/")


class _Session(requests.Session):
    """A Session whose ``verify`` wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE: requests lets those
    environment variables replace a session's own CA bundle when a call passes none (dicomweb-client's
    calls pass none), which would silently ignore HEMORRHAGE_DICOMWEB_CA_BUNDLE."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001 - requests' API
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``; kept off the request's own headers so that nothing logs it."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


@dataclass(frozen=True)
class PacsSettings:
    """Where a DICOMweb server is and how to talk to it. Secrets are left out of ``repr``.

    ``verify``: True (the system's certificate authorities) or the path of a CA bundle; there is no
    switch to turn verification off.
    """

    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    verify: bool | str = True
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 environ: Mapping[str, str] | None = None) -> PacsSettings:
        """Settings for ``url`` with the credentials and CA bundle of the environment (see module doc)."""
        env = os.environ if environ is None else environ
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise PacsError(f"the timeout must be a positive number of seconds, got {timeout_s!r}")
        user, password, token = env.get(ENV_USER) or None, env.get(ENV_PASSWORD), env.get(ENV_TOKEN) or None
        if token and user:
            raise PacsError(f"set either {ENV_TOKEN} or {ENV_USER}/{ENV_PASSWORD}, not both")
        if user and password is None:
            raise PacsError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
        ca_bundle = env.get(ENV_CA_BUNDLE) or None
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise PacsError(f"{ENV_CA_BUNDLE} names no file: {ca_bundle}")
        return cls(check_url(url), float(timeout_s), ca_bundle or True, user, password if user else None, token)

    @property
    def authentication(self) -> str:
        """``"basic"``, ``"bearer"`` or ``"none"``: what a message may say about the credentials."""
        return "bearer" if self.token else "basic" if self.username else "none"


@dataclass(frozen=True)
class StudySummary:
    """A study as QIDO-RS describes it, with no patient attribute."""

    study_uid: str
    study_date: str | None
    description: str | None
    modalities: tuple[str, ...]
    n_series: int | None
    n_instances: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "study_date": self.study_date, "description": self.description,
                "modalities": list(self.modalities), "n_series": self.n_series, "n_instances": self.n_instances}

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> StudySummary:
        modalities = tuple(str(m).strip().upper() for m in json_value(item, "ModalitiesInStudy", None) if m)
        date = json_value(item, "StudyDate")
        description = json_value(item, "StudyDescription")
        return cls(str(json_value(item, "StudyInstanceUID") or ""), str(date) if date else None,
                   str(description) if description else None, modalities,
                   _int(json_value(item, "NumberOfStudyRelatedSeries")),
                   _int(json_value(item, "NumberOfStudyRelatedInstances")))


@dataclass(frozen=True)
class SeriesSummary:
    """A series as QIDO-RS describes it."""

    series_uid: str
    modality: str
    description: str | None
    number: int | None
    n_instances: int | None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> SeriesSummary:
        description = json_value(item, "SeriesDescription")
        return cls(str(json_value(item, "SeriesInstanceUID") or ""),
                   str(json_value(item, "Modality") or "").strip().upper(),
                   str(description) if description else None, _int(json_value(item, "SeriesNumber")),
                   _int(json_value(item, "NumberOfSeriesRelatedInstances")))


def _connection_reason(exc: BaseException) -> str:
    """A few words on why a connection failed ("Connection refused"), without urllib3's long repr."""
    text = str(exc)
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found[-1].strip()
    for hint in ("Name or service not known", "Connection refused", "No route to host", "Network is unreachable",
                 "Temporary failure in name resolution", "Connection reset", "Remote end closed connection"):
        if hint.lower() in text.lower():
            return hint
    return type(exc).__name__


class PacsClient:
    """One DICOMweb server. Thread-compatible, not thread-safe (one ``requests.Session``): give each
    thread (or dashboard session) its own client. Use as a context manager, or call ``close``."""

    def __init__(self, settings: PacsSettings) -> None:
        self.settings = settings
        self.url = settings.url
        session = _Session()
        session.verify = settings.verify
        if settings.token:
            session.auth = _BearerAuth(settings.token)
        elif settings.username:
            session.auth = (settings.username, settings.password or "")
        host = urlsplit(self.url).hostname or ""
        if session.auth is not None and self.url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("credentials are sent to %s without encryption (http://); use https://", self.url)
        self._session = session
        timeout = settings.timeout_s
        self._web = DICOMwebClient(self.url, session=session, timeout=(min(10.0, timeout), timeout))
        # One attempt per call: the library's default retries 5 times with back-off (15 s of waiting
        # on top of five timeouts), which would make a dead server look like a hung command.
        self._web.set_http_retry_params(retry=False)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 environ: Mapping[str, str] | None = None) -> PacsClient:
        """A client for ``url`` with the environment's credentials (``PacsSettings.from_env``)."""
        return cls(PacsSettings.from_env(url, timeout_s=timeout_s, environ=environ))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PacsClient({self.url!r}, authentication={self.settings.authentication})"

    # -- errors -------------------------------------------------------------------------------------
    @contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """Turn what requests and dicomweb-client raise into PacsError / PacsUnavailableError."""
        try:
            yield
        except PacsError:
            raise
        except requests.exceptions.SSLError:
            raise PacsError(f"{what}: the TLS certificate of {self.url} cannot be verified; give its "
                            f"certificate authority in {ENV_CA_BUNDLE}") from None
        except requests.exceptions.Timeout:
            raise PacsUnavailableError(
                f"{what}: {self.url} did not answer within {self.settings.timeout_s:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            raise PacsUnavailableError(
                f"{what}: cannot connect to {self.url} ({_connection_reason(exc)})") from None
        except requests.exceptions.HTTPError as exc:
            raise self._http_error(what, exc.response) from None
        except requests.exceptions.JSONDecodeError:
            raise PacsError(f"{what}: {self.url} answered with something that is not DICOM JSON; is it a "
                            "DICOMweb base address (e.g. .../dicom-web)?") from None
        except requests.exceptions.RequestException as exc:
            raise PacsUnavailableError(f"{what}: the request to {self.url} failed ({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001 - only dicomweb-client runs in here: its parsers' failures
            raise PacsError(f"{what}: {self.url} sent an answer that cannot be read as DICOMweb "
                            f"({type(exc).__name__})") from None

    def _http_error(self, what: str, response: requests.Response | None) -> PacsError:
        status = getattr(response, "status_code", None)
        if status == 401:
            hint = ("the credentials were refused" if self.settings.authentication != "none"
                    else "it asks for credentials")
            return PacsError(f"{what}: {self.url} answered HTTP 401 ({hint}); set {ENV_USER} and {ENV_PASSWORD}, "
                             f"or {ENV_TOKEN}")
        if status == 403:
            return PacsError(f"{what}: {self.url} answered HTTP 403 (these credentials may not do this)")
        if status == 404:
            return PacsError(f"{what}: not found on {self.url} (HTTP 404)")
        if status is not None and status >= 500:
            return PacsUnavailableError(f"{what}: {self.url} failed (HTTP {status})")
        return PacsError(f"{what}: {self.url} answered HTTP {status}")

    # -- QIDO-RS ------------------------------------------------------------------------------------
    def find_studies(self, *, modality: str | None = "CT", since: str | None = None,
                     limit: int = DEFAULT_LIMIT) -> list[StudySummary]:
        """Studies holding ``modality`` (None: any) with a StudyDate on or after ``since`` (YYYYMMDD),
        newest first, at most ``limit``."""
        filters: dict[str, str] = {}
        if modality:
            modality = str(modality).strip().upper()
            if not re.fullmatch(r"[A-Z0-9]{1,16}", modality):
                raise PacsError(f"--modality must be a DICOM modality code such as CT, got {modality[:20]!r}")
            filters["ModalitiesInStudy"] = modality
        if since:
            try:
                datetime.strptime(str(since), "%Y%m%d")
            except ValueError:
                raise PacsError(f"--since must be a date as YYYYMMDD, got {str(since)[:20]!r}") from None
            filters["StudyDate"] = f"{since}-"
        if limit < 1:
            raise PacsError("the study limit must be at least 1")
        fields = ["StudyDate", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances"]
        with self._asking("finding studies"):
            items = self._web.search_for_studies(search_filters=filters, fields=fields, limit=int(limit))
        studies = [StudySummary.from_json(item) for item in items if isinstance(item, Mapping)]
        # Servers that ignore a filter must not widen the answer.
        studies = [s for s in studies if s.study_uid and (not modality or not s.modalities or modality in s.modalities)
                   and (not since or not s.study_date or s.study_date >= since)]
        if len(items) >= limit:
            log.warning("the server returned %d studies, the limit: there may be more (narrow with --since)", limit)
        return sorted(studies, key=lambda s: (s.study_date or "", s.study_uid), reverse=True)

    def find_series(self, study_uid: str, *, modality: str | None = None) -> list[SeriesSummary]:
        """The series of a study (only those of ``modality`` when given), by series number."""
        study_uid = check_uid(study_uid, "study")
        filters = {"Modality": modality} if modality else None
        with self._asking(f"listing the series of study {study_uid}"):
            items = self._web.search_for_series(
                study_uid, search_filters=filters,
                fields=["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"])
        series = [SeriesSummary.from_json(item) for item in items if isinstance(item, Mapping)]
        series = [s for s in series if s.series_uid and (not modality or s.modality == modality)]
        return sorted(series, key=lambda s: (s.number if s.number is not None else 1 << 31, s.series_uid))

    # -- WADO-RS ------------------------------------------------------------------------------------
    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """Every instance's header (DICOM JSON, bulk data left out) of one series.

        These headers hold the patient module: they are for choosing instances and for the SR writer,
        never for output or logs.
        """
        study_uid, series_uid = check_uid(study_uid, "study"), check_uid(series_uid, "series")
        with self._asking(f"reading the headers of series {series_uid}"):
            items = self._web.retrieve_series_metadata(study_uid, series_uid)
        return [dict(item) for item in items if isinstance(item, Mapping)]

    def fetch_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """One instance as DICOM Part 10 bytes in its stored transfer syntax, made in memory.

        dicomweb-client parses what WADO-RS sends into a pydicom Dataset; it is written back with
        ``dcmwrite`` to a BytesIO (the elements are kept as read, so the bytes are the stored file's)
        for ``hemorrhage_core.dicom.read_slice``, which reads bytes. PacsError when the server's
        answer is not a DICOM object.
        """
        import pydicom

        what = f"fetching instance {sop_uid}"
        with self._asking(what):
            dataset = self._web.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),))
        buffer = io.BytesIO()
        try:
            pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        except Exception as exc:  # noqa: BLE001 - whatever the server sent, one message without its content
            raise PacsError(f"{what}: the server's answer cannot be written as a DICOM file "
                            f"({type(exc).__name__})") from None
        return buffer.getvalue()

    def fetch_dataset(self, study_uid: str, series_uid: str, sop_uid: str) -> Any:
        """One instance as a pydicom Dataset (e.g. an SR read back)."""
        with self._asking(f"fetching instance {sop_uid}"):
            return self._web.retrieve_instance(study_uid, series_uid, sop_uid)

    # -- STOW-RS ------------------------------------------------------------------------------------
    def store(self, dataset: Any) -> None:
        """Store one pydicom Dataset; PacsError when the server refuses it."""
        what = f"storing instance {dataset.SOPInstanceUID}"
        with self._asking(what):
            answer = self._web.store_instances([dataset])
        failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", None)
            raise PacsError(f"{what}: {self.url} refused it" + (f" (failure reason {reason})" if reason else ""))
