"""Dashboard settings as data: where the runs are, how often to look, what an upload may weigh."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

RUNS_DIR_ENV = "HEMORRHAGE_RUNS_DIR"
MAX_UPLOAD_ENV = "HEMORRHAGE_MAX_UPLOAD_MB"
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

    @property
    def max_upload_mb(self) -> float:
        return self.max_upload_bytes / (1024 * 1024)


def load_config(environ: Mapping[str, str] | None = None) -> DashboardConfig:
    """Read HEMORRHAGE_RUNS_DIR (default ``runs/``) and HEMORRHAGE_MAX_UPLOAD_MB (default 64).

    A cap that is not a positive number is refused rather than silently replaced.
    """
    env = os.environ if environ is None else environ
    runs_dir = Path(env.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).expanduser()
    raw_cap = env.get(MAX_UPLOAD_ENV)
    cap_mb = DEFAULT_MAX_UPLOAD_MB
    if raw_cap:
        try:
            cap_mb = float(raw_cap)
        except ValueError:
            raise ValueError(f"{MAX_UPLOAD_ENV} must be a number of megabytes, got {raw_cap!r}") from None
        if not cap_mb > 0:
            raise ValueError(f"{MAX_UPLOAD_ENV} must be positive, got {raw_cap!r}")
    return DashboardConfig(runs_dir=runs_dir, max_upload_bytes=int(cap_mb * 1024 * 1024))
