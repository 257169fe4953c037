"""Run directories: the only contract between training and the dashboard (see docs/run-format.md).

Writing: ``RunWriter`` creates ``RUNS_DIR/<run_id>/`` and keeps ``run.json`` current with atomic
replaces; ``metrics.csv`` and ``train.log`` only grow, one flushed and fsynced line at a time; every other
file (predictions, gallery index and images, grid results) is replaced atomically. A reader beside a
running writer therefore sees either the old or the new version of a file, or a CSV whose last line
may be torn, which the readers here drop.

Reading: ``list_runs`` summarises every run in a folder and never raises (a damaged run is listed with
status ``malformed`` and a reason); ``read_run`` loads one run; ``resolve_run`` turns a run id chosen in a
UI into a path only if a run of that name is actually on disk.

The parts, each importing only those before it: ``records`` (file names, columns, format version,
errors, the JSON and CSV encodings), ``lock`` (the writer lock), ``writer`` and ``reader``. pandas and
PIL are imported inside the functions that need them, so ``list_runs`` stays light.
"""

from hemorrhage_core.fileio import atomic_write_bytes, atomic_write_text
from hemorrhage_core.runs.lock import WriterLock
from hemorrhage_core.runs.reader import (
    RunRecord,
    RunSummary,
    list_runs,
    read_metrics,
    read_run,
    resolve_run,
    summarise_run,
)
from hemorrhage_core.runs.records import (
    CHECKPOINTS_DIR,
    DEFAULT_MODEL_FILE,
    FINAL_STATUSES,
    FORMAT_VERSION,
    GALLERY_COLUMNS,
    GALLERY_DIR,
    GALLERY_INDEX,
    GRID_RESULTS_CSV,
    KINDS,
    MALFORMED,
    METRICS_COLUMNS,
    METRICS_CSV,
    PREDICTION_COLUMNS,
    PREDICTIONS_CSV,
    PROB_COLUMNS,
    RUN_JSON,
    SPLIT_CSV,
    STATUSES,
    TRAIN_LOG,
    TRUE_COLUMNS,
    WRITER_LOCK,
    RunBusyError,
    RunFormatError,
    RunNotFoundError,
    check_format_version,
    dumps_json,
    format_major,
    iso_utc,
    load_run_json,
    read_csv_tolerant,
    utc_now,
)
from hemorrhage_core.runs.writer import (
    GalleryEntry,
    RunWriter,
    append_csv_row,
    encode_png,
    git_commit,
    new_run_id,
    package_versions,
    remove_stale_temp_files,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "DEFAULT_MODEL_FILE",
    "FINAL_STATUSES",
    "FORMAT_VERSION",
    "GALLERY_COLUMNS",
    "GALLERY_DIR",
    "GALLERY_INDEX",
    "GRID_RESULTS_CSV",
    "KINDS",
    "MALFORMED",
    "METRICS_COLUMNS",
    "METRICS_CSV",
    "PREDICTIONS_CSV",
    "PREDICTION_COLUMNS",
    "PROB_COLUMNS",
    "RUN_JSON",
    "SPLIT_CSV",
    "STATUSES",
    "TRAIN_LOG",
    "TRUE_COLUMNS",
    "WRITER_LOCK",
    "GalleryEntry",
    "RunBusyError",
    "RunFormatError",
    "RunNotFoundError",
    "RunRecord",
    "RunSummary",
    "RunWriter",
    "WriterLock",
    "append_csv_row",
    "atomic_write_bytes",  # re-exported from hemorrhage_core.fileio for the commands that import it here
    "atomic_write_text",
    "check_format_version",
    "dumps_json",
    "encode_png",
    "format_major",
    "git_commit",
    "iso_utc",
    "list_runs",
    "load_run_json",
    "new_run_id",
    "package_versions",
    "read_csv_tolerant",
    "read_metrics",
    "read_run",
    "remove_stale_temp_files",
    "resolve_run",
    "summarise_run",
    "utc_now",
]
