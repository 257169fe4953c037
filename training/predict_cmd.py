"""``predict --run RUN_DIR FILE... [--json] [--submission OUT.csv]``: probabilities for DICOM slices.

Each input (a file, or a folder searched for ``.dcm``/``.dicom`` files) is predicted by the run's model
through the one Predictor, calibrated with the run's calibration.json when it has one (temperature
scaling fitted on its validation set; a damaged file refuses the run). ``--json`` prints a list, one
object per input in order: ``{"file", "probabilities": {label: p} or null, "error": null or message,
"flags": [warnings], "raw_probabilities": {label: p} or null, "calibrated": bool}`` (flags: the
Predictor's notes on HU content unlike a head CT; the slice is still predicted; raw_probabilities: the
model's own values, equal to probabilities when the run has no calibration). The table shows the
flags in a last column, and either way stderr says how many predicted inputs were flagged, so an odd slice
is never predicted silently. Exit 0 when every input was predicted (flagged or not), 2 when any failed (the
others are still predicted) or the run cannot be used.
``--submission`` writes the RSNA long format ``ID,Label`` (``ID_<image>_<label>``, six rows per image,
image id = file stem) for the inputs that succeeded, with the probabilities the table shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 2  # some input failed, or the run / its model cannot be used
DICOM_SUFFIXES = (".dcm", ".dicom")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model predicts")
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM files, or folders searched for *.dcm")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--submission", metavar="OUT.csv", help="also write an RSNA long-format submission CSV")


@dataclass(frozen=True)
class PredictionRow:
    """One input's outcome: probabilities in LABELS order (calibrated when the run is) or an error message."""

    file: str
    probabilities: dict[str, float] | None
    error: str | None
    flags: tuple[str, ...] = ()  # the Predictor's warnings (e.g. HU content unlike a head CT)
    raw_probabilities: dict[str, float] | None = None  # the model's own values, before calibration
    calibrated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "probabilities": self.probabilities, "error": self.error, "flags": list(self.flags),
                "raw_probabilities": self.raw_probabilities, "calibrated": self.calibrated}


def expand_inputs(items: Sequence[str]) -> list[tuple[str, str | None]]:
    """Inputs -> ``(file, error)`` pairs in order; a folder becomes its DICOM files (sorted, recursive).

    A folder with no DICOM file, or a path that does not exist, becomes one entry with an error.
    """
    out: list[tuple[str, str | None]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES and p.is_file()
            )
            if not found:
                out.append((item, "folder holds no .dcm or .dicom files"))
            out.extend((f, None) for f in found)
        elif path.is_file():
            out.append((item, None))
        else:
            out.append((item, "no such file"))
    return out


def _message(exc: BaseException) -> str:
    from hemorrhage_core.errors import HemorrhageError

    if isinstance(exc, HemorrhageError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    # Unexpected failures: say what kind, keep details (which may hold paths) for --verbose.
    return f"internal error while predicting ({type(exc).__name__})"


def load_run_predictor(run_dir: str, *, calibrated: bool = True, **predictor_options: Any):
    """(RunRecord, Predictor) for a run directory; HemorrhageError subclasses when unusable.

    With ``calibrated`` the Predictor applies the run's calibration.json (if any; EvaluationError when
    it is damaged); without, it returns the model's raw probabilities (what evaluate calibrates itself).
    ``predictor_options`` go to ``Predictor.from_checkpoint`` (e.g. ``batch_size``)."""
    from hemorrhage_core.evaluations import read_calibration
    from hemorrhage_core.inference import Predictor
    from hemorrhage_core.runs import read_run

    record = read_run(run_dir)
    model_path = record.model_path
    if not model_path.is_file():
        from hemorrhage_core.errors import CheckpointError

        raise CheckpointError(f"run {record.id} has no model file {record.info.get('model_file')}")
    # Read before the model loads: a damaged file refuses the run at once.
    calibration = read_calibration(record.path) if calibrated else None
    return record, Predictor.from_checkpoint(model_path, calibration=calibration, **predictor_options)


def predict_files(
    predictor, files: Sequence[tuple[str, str | None]], *, batch_size: int | None = None
) -> list[PredictionRow]:
    """Predict each ``(file, error)`` entry that has no error yet, keeping input order."""
    from hemorrhage_core.errors import HemorrhageError

    todo = [f for f, err in files if err is None]
    results: list[Any]
    try:
        results = list(predictor.predict_many(todo, batch_size=batch_size))
    except HemorrhageError:
        raise
    except Exception:  # noqa: BLE001 - fall back to one file at a time so one input cannot sink all
        log.debug("batch prediction failed; predicting one file at a time", exc_info=True)
        results = []
        for f in todo:
            try:
                results.append(predictor.predict(f))
            except Exception as exc:  # noqa: BLE001
                log.debug("prediction failed", exc_info=True)
                results.append(exc)
    by_file = iter(results)
    rows: list[PredictionRow] = []
    for f, err in files:
        if err is not None:
            rows.append(PredictionRow(f, None, err))
            continue
        result = next(by_file)
        if isinstance(result, BaseException):
            rows.append(PredictionRow(f, None, _message(result)))
        else:
            probs = {label: float(p) for label, p in result.probabilities.items()}
            raw = {label: float(p) for label, p in (getattr(result, "raw_probabilities", None) or probs).items()}
            if not all(math.isfinite(p) for p in [*probs.values(), *raw.values()]):
                rows.append(PredictionRow(f, None, "the model gave a non-finite probability"))
            else:
                rows.append(PredictionRow(f, probs, None, tuple(getattr(result, "flags", ()) or ()), raw,
                                          bool(getattr(result, "calibrated", False))))
    return rows


def submission_csv(rows: Sequence[PredictionRow]) -> str:
    """RSNA long format for the rows that have probabilities (image id = file stem, first wins)."""
    from hemorrhage_core.labels import LABELS

    lines = ["ID,Label"]
    seen: set[str] = set()
    for row in rows:
        if row.probabilities is None:
            continue
        image_id = Path(row.file).stem
        if image_id in seen:
            continue
        seen.add(image_id)
        lines.extend(f"{image_id}_{label},{row.probabilities[label]!r}" for label in LABELS)
    return "\n".join(lines) + "\n"


def _print_table(rows: Sequence[PredictionRow], stream) -> None:
    from hemorrhage_core.labels import LABELS

    short = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
             "subarachnoid": "SAH", "subdural": "SDH", "any": "any"}
    print("file\t" + "\t".join(short[label] for label in LABELS) + "\twarnings", file=stream)
    for row in rows:
        if row.probabilities is None:
            print(f"{row.file}\terror: {row.error}", file=stream)
        else:
            cells = [f"{row.probabilities[label]:.3f}" for label in LABELS]
            # flag texts hold ';' themselves, hence ' | ' between them
            print("\t".join([row.file, *cells, " | ".join(row.flags)]).rstrip("\t"), file=stream)


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.errors import HemorrhageError
    from hemorrhage_core.runs import atomic_write_text

    try:
        _, predictor = load_run_predictor(args.run)
    except HemorrhageError as exc:
        print(f"error: cannot use run {args.run}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback; details with --verbose
        log.debug("loading the run failed", exc_info=True)
        print(f"error: cannot use run {args.run}: internal error ({type(exc).__name__}); rerun with -v",
              file=sys.stderr)
        return EXIT_FAILED
    rows = predict_files(predictor, expand_inputs(args.files))
    if predictor.calibration is not None:
        print("note: probabilities are calibrated with the run's calibration.json (temperature scaling fitted on "
              "its validation set); --json also gives the model's raw values", file=sys.stderr)
    failed = sum(row.error is not None for row in rows)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2, allow_nan=False))
    else:
        _print_table(rows, sys.stdout)
    if args.submission:
        try:
            atomic_write_text(args.submission, submission_csv(rows))
        except OSError as exc:
            print(f"error: cannot write {args.submission}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
    flagged = sum(bool(row.flags) for row in rows)
    if flagged:
        print(
            f"warning: {flagged} of {len(rows)} predicted inputs do not look like a head CT slice (see their "
            "flags); check them before trusting their probabilities",
            file=sys.stderr,
        )
    if failed:
        print(f"{failed} of {len(rows)} inputs could not be predicted", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
