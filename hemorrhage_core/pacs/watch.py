"""Watch a DICOMweb server: each new CT study is predicted once and, if asked, its SR stored.

A poll is one QIDO-RS query for CT studies. A study is new when the state file does not know it; it is
predicted once its instance count has stayed the same for one poll (a study still arriving is not
predicted half-way). What was done is remembered per study in a small JSON state file, written
atomically after each study, so a restarted watcher never predicts a study twice:

``{"format_version": 1, "url", "run_id", "studies": {study_uid: {"status", "at", ...}}, "pending":
{study_uid: instances seen}, "attempts": {study_uid: n}}`` with status ``baseline`` (there before the
first poll, left alone unless ``include_existing``), ``pushed``, ``predicted`` (without ``--push``) or
``failed`` (with a message: no usable CT series, slices that failed, an SR the server refused). A
predicted or pushed study also keeps its ``series_uid``, ``slices`` and ``study`` (label -> the
study-level probability), which the dashboard's worklist shows; ``pushed`` adds the SR's UIDs.

A server that goes away (PacsUnavailableError) is retried with exponential back-off (``backoff_s``) and
the watcher carries on when it is back; a study whose own requests keep failing that way is given up
after ``max_attempts``. Stopping (``stop`` event, Ctrl-C) between two studies or inside one leaves the
state file whole; the study under way is simply done again on the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hemorrhage_core.errors import PacsError, PacsUnavailableError
from hemorrhage_core.pacs.client import DEFAULT_LIMIT, PacsClient
from hemorrhage_core.pacs.series import StudyPrediction, predict_study
from hemorrhage_core.pacs.sr import PushedSr, push_result

log = logging.getLogger(__name__)

STATE_FORMAT = 1
DEFAULT_INTERVAL_S = 60.0
DEFAULT_MAX_BACKOFF_S = 300.0
DEFAULT_MAX_ATTEMPTS = 3


def default_state_path(url: str, run_id: str) -> Path:
    """The state file of watching ``url`` with ``run_id``: one per server and run, in the user's state
    folder (platformdirs), named by a hash so that the URL does not appear in the file name."""
    import platformdirs

    key = hashlib.sha256(f"{url}\n{run_id}".encode()).hexdigest()[:16]
    return Path(platformdirs.user_state_dir("hemorrhage-ct")) / "pacs-watch" / f"{key}.json"


def backoff_s(failures: int, interval_s: float, maximum_s: float = DEFAULT_MAX_BACKOFF_S) -> float:
    """Seconds to wait after ``failures`` polls in a row found the server unavailable: the interval
    doubled per failure, at most ``maximum_s`` (and never less than the interval)."""
    if failures <= 0:
        return interval_s
    return max(interval_s, min(maximum_s, interval_s * 2.0 ** min(failures, 30)))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class WatchState:
    """What a watcher has done, kept in ``path`` (see the module docstring for the format)."""

    path: Path
    url: str
    run_id: str
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    fresh: bool = True  # no poll has run yet with this file

    @classmethod
    def load(cls, path: str | Path, *, url: str, run_id: str) -> WatchState:
        """The state in ``path``, or a fresh one when it does not exist. PacsError when it is damaged or
        belongs to another server or run (a state file must not make one run skip another's work)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path, url, run_id)
        except OSError as exc:
            raise PacsError(f"cannot read the watch state file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or int(data.get("format_version", 0)) != STATE_FORMAT:
                raise ValueError("unknown format")
            studies, pending = dict(data.get("studies") or {}), dict(data.get("pending") or {})
            attempts = {str(k): int(v) for k, v in (data.get("attempts") or {}).items()}
        except (ValueError, TypeError, AttributeError):
            raise PacsError(f"the watch state file {path} is damaged; move it away to start afresh "
                            "(the studies it lists would then be predicted again)") from None
        if data.get("url") != url or data.get("run_id") != run_id:
            raise PacsError(f"the watch state file {path} belongs to another server or run; give another --state")
        return cls(path, url, run_id, studies, {str(k): int(v) for k, v in pending.items()}, attempts, fresh=False)

    def save(self) -> None:
        from hemorrhage_core.fileio import atomic_write_text

        atomic_write_text(self.path, json.dumps({
            "format_version": STATE_FORMAT, "url": self.url, "run_id": self.run_id, "studies": self.studies,
            "pending": self.pending, "attempts": self.attempts}, indent=1, sort_keys=True) + "\n")

    def record(self, study_uid: str, status: str, **details: Any) -> None:
        """Remember a study as done (``status``) and write the file."""
        self.studies[study_uid] = {"status": status, "at": _now(),
                                   **{k: v for k, v in details.items() if v is not None}}
        self.pending.pop(study_uid, None)
        self.attempts.pop(study_uid, None)
        self.save()


@dataclass(frozen=True)
class WatchOutcome:
    """What one study came to in a poll."""

    study_uid: str
    status: str  # pushed, predicted or failed
    message: str | None = None
    prediction: StudyPrediction | None = field(default=None, repr=False)
    pushed: PushedSr | None = None


class Watcher:
    """Polls ``client`` for new CT studies and predicts (and pushes) each once; see the module docstring.

    ``on_outcome`` is called with each study's ``WatchOutcome`` as it is done (the command prints it).
    """

    def __init__(
        self,
        client: PacsClient,
        predictor: Any,
        state: WatchState,
        *,
        run_id: str,
        push: bool = False,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        include_existing: bool = False,
        limit: int = DEFAULT_LIMIT,
        on_outcome: Callable[[WatchOutcome], None] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise PacsError(f"the poll interval must be a positive number of seconds, got {interval_s!r}")
        self.client, self.predictor, self.state = client, predictor, state
        self.run_id, self.push = run_id, push
        self.interval_s, self.max_backoff_s, self.max_attempts = float(interval_s), float(max_backoff_s), max_attempts
        self.include_existing, self.limit, self.on_outcome = include_existing, limit, on_outcome

    def poll_once(self) -> list[WatchOutcome]:
        """One QIDO query; predict every new study whose instance count has settled. Raises
        PacsUnavailableError when the server cannot answer (nothing is lost: the next poll resumes)."""
        studies = self.client.find_studies(modality="CT", limit=self.limit)
        if self.state.fresh:
            self.state.fresh = False
            if not self.include_existing:
                for study in studies:
                    self.state.studies.setdefault(study.study_uid, {"status": "baseline", "at": _now()})
                self.state.save()
                log.info("watching %s: %d CT studies already there are left alone", self.client.url, len(studies))
                return []
        outcomes: list[WatchOutcome] = []
        changed = False
        for study in sorted(studies, key=lambda s: (s.study_date or "", s.study_uid)):
            uid = study.study_uid
            if uid in self.state.studies:
                continue
            count = study.n_instances if study.n_instances is not None else -1
            if self.state.pending.get(uid) != count:  # new, or still growing: look again next poll
                self.state.pending[uid] = count
                changed = True
                continue
            outcome = self._process(uid)
            outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        if changed:
            self.state.save()
        return outcomes

    def _process(self, study_uid: str) -> WatchOutcome:
        try:
            return self._predict_and_push(study_uid)
        except PacsUnavailableError as exc:
            tries = self.state.attempts.get(study_uid, 0) + 1
            if tries < self.max_attempts:
                self.state.attempts[study_uid] = tries
                self.state.save()
                raise
            message = f"given up after {tries} attempts: {exc}"
        except PacsError as exc:
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 - one study must not stop the watch; details with -v
            log.debug("predicting study %s failed", study_uid, exc_info=True)
            message = f"internal error ({type(exc).__name__})"
        self.state.record(study_uid, "failed", message=message)
        return WatchOutcome(study_uid, "failed", message)

    def _predict_and_push(self, study_uid: str) -> WatchOutcome:
        result = predict_study(self.client, self.predictor, study_uid, run_id=self.run_id)
        summary = {"series_uid": result.series_uid, "slices": len(result.slices)}
        if result.failed:
            message = (f"{len(result.failed)} of {len(result.slices)} slices could not be predicted"
                       + ("; nothing stored" if self.push else ""))
            self.state.record(study_uid, "failed", message=message, **summary)
            return WatchOutcome(study_uid, "failed", message, result)
        summary["study"] = result.study  # the study-level probabilities, for the dashboard's worklist
        if not self.push:
            self.state.record(study_uid, "predicted", **summary)
            return WatchOutcome(study_uid, "predicted", None, result)
        pushed = push_result(self.client, result, run_id=self.run_id)
        self.state.record(study_uid, "pushed", sr_series_uid=pushed.series_uid,
                          sr_sop_instance_uid=pushed.sop_instance_uid, **summary)
        return WatchOutcome(study_uid, "pushed", None, result, pushed)

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (or Ctrl-C), backing off while the server is unavailable.
        PacsError other than unavailability (credentials refused, a URL that is no DICOMweb service)
        ends the watch: waiting will not mend it."""
        stop = stop or threading.Event()
        failures = 0
        while not stop.is_set():
            try:
                self.poll_once()
                if failures:
                    log.info("%s answers again", self.client.url)
                failures = 0
            except PacsUnavailableError as exc:
                failures += 1
                log.warning("%s; polling again in %.0f s", exc, backoff_s(failures, self.interval_s, self.max_backoff_s))
            stop.wait(backoff_s(failures, self.interval_s, self.max_backoff_s))
