"""``predict --run RUN_DIR FILE_OR_FOLDER... [--json] [--submission OUT.csv [--smooth]] [--workers K]``.

Each input (a file, or a folder searched recursively for ``.dcm``/``.dicom`` files, sorted) is predicted
by the run's model through the one Predictor, calibrated with the run's calibration.json when it has
one (temperature scaling fitted on its validation set; a damaged file refuses the run). Inputs stream
through in bounded chunks, and every output is written as it comes, so memory stays flat however many
files there are (``benchmarks/bench_submission.py``). ``--workers K``: K threads read and preprocess
ahead of the model (same probabilities as one).

``--json`` prints a list, one object per input in order: ``{"file", "probabilities": {label: p} or
null, "error": null or message, "flags": [warnings], "raw_probabilities": {label: p} or null,
"calibrated": bool}`` (flags: the Predictor's notes on HU content unlike a head CT; the slice is still
predicted; raw_probabilities: the model's own values, equal to probabilities when the run has no
calibration). The table shows the flags in a last column, and either way stderr says how many predicted
inputs were flagged, so an odd slice is never predicted silently, and names the inputs that failed.

``--submission`` writes the RSNA long format (``hemorrhage_core.submission``, docs/cli.md): six rows
``ID_<image>_<label>,p`` per requested image (image id = file stem), the table's probabilities, or
``--smooth``ed along z within each series (the weights evaluate uses; the table and JSON stay per
slice). An image that could not be predicted gets fallback probabilities (the label prevalence of the
run's validation set, else RSNA's) and a line in ``OUT.failed.csv``. Both files appear only complete.
Exit 0 when every input was predicted (flagged or not); 2 when any failed (the others are still
predicted and written), the run cannot be used or the submission's path cannot be written; 1 when
writing fails midway (disk full); 130 on Ctrl-C, with no submission written (``training.exits``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import TextIO

from training.exits import EXIT_BAD_INPUT, EXIT_OK, CommandError, os_error_code

log = logging.getLogger(__name__)

# Failed inputs named on stderr before "and N more": the full list is in the side file or the output.
FAILURES_SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model predicts")
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM files, or folders searched for *.dcm")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--submission", metavar="OUT.csv", help="also write an RSNA long-format submission CSV")
    parser.add_argument(
        "--smooth", action="store_true",
        help="smooth the submission's probabilities along z within each series (as evaluate's z-smoothed metrics)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="threads reading and preprocessing files ahead of the model (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images per forward pass (default 16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default auto: the CUDA GPU when there is one)")


class _Table:
    """The tab-separated table, a row at a time."""

    def __init__(self, stream: TextIO) -> None:
        from hemorrhage_core.labels import LABELS, SHORT_NAMES

        self.stream, self.labels = stream, LABELS
        print("file\t" + "\t".join(SHORT_NAMES[label] for label in LABELS) + "\twarnings", file=stream)

    def add(self, row) -> None:
        if row.probabilities is None:
            print(f"{row.file}\terror: {row.error}", file=self.stream)
            return
        cells = [f"{row.probabilities[label]:.3f}" for label in self.labels]
        # flag texts hold ';' themselves, hence ' | ' between them
        print("\t".join([row.file, *cells, " | ".join(row.flags)]).rstrip("\t"), file=self.stream)

    def close(self) -> None:
        pass


class _JsonList:
    """``json.dumps(rows, indent=2)``, byte for byte, written an item at a time."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.n = stream, 0

    def add(self, row) -> None:
        item = textwrap.indent(json.dumps(row.to_dict(), indent=2, allow_nan=False), "  ")
        self.stream.write(("[\n" if self.n == 0 else ",\n") + item)
        self.n += 1

    def close(self) -> None:
        self.stream.write("\n]\n" if self.n else "[]\n")


def _image_id(file: str) -> str | None:
    """The submission's image id of an input: its stem (RSNA files are ID_<hex>.dcm); None for a folder."""
    path = Path(file)
    return None if path.is_dir() else path.stem


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from hemorrhage_core.errors import HemorrhageError
    from hemorrhage_core.labels import LABELS
    from hemorrhage_core.submission import SubmissionWriter, fallback_probabilities
    from training.prediction import expand_inputs, load_run_predictor, predict_rows

    if args.smooth and not args.submission:
        raise CommandError("--smooth smooths the submission: give --submission OUT.csv too")
    if args.workers < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise CommandError("--workers and --batch-size must be at least 1")
    options = {"device": args.device} | ({} if args.batch_size is None else {"batch_size": args.batch_size})
    try:
        record, predictor = load_run_predictor(args.run, **options)
    except HemorrhageError as exc:
        raise CommandError(f"cannot use run {args.run}: {exc}") from exc
    if predictor.calibration is not None:
        print("note: probabilities are calibrated with the run's calibration.json (temperature scaling fitted on "
              "its validation set); --json also gives the model's raw values", file=sys.stderr)
    entries = expand_inputs(args.files)
    writer, source = None, ""
    if args.submission:
        fallback, source = fallback_probabilities(_validation_predictions(record))
        writer = SubmissionWriter(args.submission, fallback, smooth=args.smooth)
    failures = _Failures()
    flagged = 0
    try:
        with writer or nullcontext():
            printer = _JsonList(sys.stdout) if args.json else _Table(sys.stdout)
            for row in predict_rows(predictor, entries, workers=args.workers):
                printer.add(row)
                if row.error is not None:
                    failures.add(row.file, row.error)
                    if writer is not None:
                        writer.add_failed(row.file, row.error, _image_id(row.file))
                    continue
                flagged += bool(row.flags)
                if writer is not None:
                    writer.add(_image_id(row.file), [row.probabilities[label] for label in LABELS],
                               series=row.series, z=row.z)
    except BrokenPipeError:
        raise
    except OSError as exc:
        if writer is None:
            raise
        raise CommandError(f"cannot write {args.submission}: {exc.strerror or exc}", os_error_code(exc)) from exc
    printer.close()
    _report(len(entries), failures, flagged, writer, source)
    return EXIT_BAD_INPUT if failures.count else EXIT_OK


def _validation_predictions(record):
    """The run's validation predictions (for the fallback), or None when it has none readable."""
    from hemorrhage_core.errors import HemorrhageError

    try:
        return record.predictions
    except (HemorrhageError, OSError, ValueError) as exc:  # a damaged file must not sink the submission
        log.warning("run %s: predictions.csv cannot be read (%s); the fallback is RSNA's prevalence", record.id, exc)
        return None


class _Failures:
    """How many inputs failed, and the first few to name on stderr (the rest are in the outputs)."""

    def __init__(self) -> None:
        self.count, self.shown = 0, []

    def add(self, file: str, error: str) -> None:
        self.count += 1
        if len(self.shown) < FAILURES_SHOWN:
            self.shown.append((file, error))


def _report(n_inputs: int, failures: _Failures, flagged: int, writer, source: str) -> None:
    """The stderr summary: flagged slices, failed inputs (named), what the submission did with them."""
    if flagged:
        print(f"warning: {flagged} of {n_inputs} predicted inputs do not look like a head CT slice (see their "
              "flags); check them before trusting their probabilities", file=sys.stderr)
    if writer is not None and writer.n_duplicates:
        print(f"warning: {writer.n_duplicates} inputs repeat an image id already in the submission; the first "
              "file of each id was kept", file=sys.stderr)
    if not failures.count:
        return
    for file, error in failures.shown:
        print(f"failed: {file}: {error}", file=sys.stderr)
    if failures.count > len(failures.shown):
        print(f"... and {failures.count - len(failures.shown)} more", file=sys.stderr)
    print(f"{failures.count} of {n_inputs} inputs could not be predicted", file=sys.stderr)
    if writer is not None:
        print(f"the submission gives them the fallback probabilities ({source}); all are listed in "
              f"{writer.failed_path}", file=sys.stderr)
