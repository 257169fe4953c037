"""Dashboard settings as data: where the runs are, how often to look, what an upload may weigh, and
which PACS (DICOMweb server) the Predict and Worklist panels may use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

RUNS_DIR_ENV = "HEMORRHAGE_RUNS_DIR"
MAX_UPLOAD_ENV = "HEMORRHAGE_MAX_UPLOAD_MB"
# The PACS: its DICOMweb base address. Credentials are read by hemorrhage_core.pacs from their own
# variables (HEMORRHAGE_DICOMWEB_USER / _PASSWORD or _TOKEN) when a request is made; never kept here.
PACS_URL_ENV = "HEMORRHAGE_DICOMWEB_URL"
PACS_TIMEOUT_ENV = "HEMORRHAGE_DICOMWEB_TIMEOUT"
PACS_MAX_SLICES_ENV = "HEMORRHAGE_PACS_MAX_SLICES"
PACS_WATCH_STATE_ENV = "HEMORRHAGE_PACS_WATCH_STATE"
DEFAULT_RUNS_DIR = "runs"
DEFAULT_MAX_UPLOAD_MB = 64.0

DISCLAIMER = "Research use only, not for clinical or diagnostic use."


@dataclass(frozen=True)
class DashboardConfig:
    """Everything the dashboard reads from its environment, fixed when the app starts."""

    runs_dir: Path = Path(DEFAULT_RUNS_DIR)
    # Seconds between checks of the runs folder's modification times (cheap: stat calls only).
    poll_seconds: float = 2.0
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_upload_files: int = 64
    # Patient-level bootstrap resamples for the comparison's AUC intervals.
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    gallery_page_size: int = 24
    # The PACS (None: the PACS source and the worklist are off and nothing is asked of any server).
    pacs_url: str | None = None
    pacs_timeout_s: float = 30.0
    # Slices of one series fetched into a session's memory (about 1 MB each at 512 x 512).
    pacs_max_slices: int = 400
    # Studies on the worklist: the newest, in one QIDO-RS answer.
    pacs_worklist_limit: int = 200
    # A `pacs watch` state file to read results from (None: the watch's default file for the run).
    pacs_watch_state: Path | None = None

    @property
    def max_upload_mb(self) -> float:
        return self.max_upload_bytes / (1024 * 1024)


def _positive(env: Mapping[str, str], name: str, default: float, unit: str) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of {unit}, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def load_config(environ: Mapping[str, str] | None = None) -> DashboardConfig:
    """Read HEMORRHAGE_RUNS_DIR (default ``runs/``), HEMORRHAGE_MAX_UPLOAD_MB (default 64) and the PACS
    settings: HEMORRHAGE_DICOMWEB_URL (unset: no PACS), HEMORRHAGE_DICOMWEB_TIMEOUT (seconds, default
    30), HEMORRHAGE_PACS_MAX_SLICES (default 400) and HEMORRHAGE_PACS_WATCH_STATE (a file).

    A number that is not positive is refused rather than silently replaced. The URL is kept as given:
    the panels say what is wrong with it, so that a bad one never stops the app.
    """
    env = os.environ if environ is None else environ
    runs_dir = Path(env.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).expanduser()
    cap_mb = _positive(env, MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB, "megabytes")
    watch_state = env.get(PACS_WATCH_STATE_ENV)
    return DashboardConfig(
        runs_dir=runs_dir,
        max_upload_bytes=int(cap_mb * 1024 * 1024),
        pacs_url=(env.get(PACS_URL_ENV) or "").strip() or None,
        pacs_timeout_s=_positive(env, PACS_TIMEOUT_ENV, 30.0, "seconds"),
        pacs_max_slices=max(1, int(_positive(env, PACS_MAX_SLICES_ENV, 400, "slices"))),
        pacs_watch_state=Path(watch_state).expanduser() if watch_state else None,
    )
