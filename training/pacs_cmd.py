"""``pacs find|predict|watch --url URL``: a DICOMweb server (a PACS) as the source of studies and the
destination of results (docs/pacs.md).

* ``find [--modality CT] [--since YYYYMMDD] [--limit N] [--json]``: the studies, as ``{"study_uid",
  "study_date", "description", "modalities", "n_series", "n_instances"}``; no patient name or id.
* ``predict --study UID [--series UID] --run RUN [--push] [--json]``: the study's axial CT series (or
  the one given; non-CT series and localizers are refused) fetched and predicted slice by slice with the
  run's Predictor (calibrated as ``predict`` is); prints ``{"study_uid", "series_uid", "slices":
  [{"sop_instance_uid", "z", "probabilities", "warnings", "error"}], "study": {label: max probability},
  "pushed": {"sop_instance_uid", "series_uid"} or null}``. ``--push`` stores a Comprehensive 3D SR
  (TID 1500) into the same study, only when every slice was predicted.
* ``watch --run RUN [--interval S] [--push] [--state FILE]``: polls for new CT studies and predicts
  (and pushes) each once; Ctrl-C or SIGTERM stops it; a server that goes away is retried with back-off.

Credentials come from the environment (``HEMORRHAGE_DICOMWEB_USER`` / ``_PASSWORD`` or ``_TOKEN``; a CA
bundle in ``HEMORRHAGE_DICOMWEB_CA_BUNDLE``), never from the command line.

Exit codes (``training.exits``): 0 done; 1 the server cannot be reached, timed out or failed (HTTP 5xx);
2 something given cannot be used (URL, credentials refused, unknown study or series, no usable CT
series, a run that cannot be used) or some slices could not be predicted (the others are still
reported, nothing is pushed); 130 interrupted (``watch`` ends so).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from training.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CommandError

log = logging.getLogger(__name__)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


# hemorrhage_core.pacs.client's defaults, repeated so that building the parser imports nothing heavy
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_LIMIT = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True, help="DICOMweb base address, e.g. http://pacs:8042/dicom-web "
                        "(credentials: HEMORRHAGE_DICOMWEB_USER/HEMORRHAGE_DICOMWEB_PASSWORD or "
                        "HEMORRHAGE_DICOMWEB_TOKEN in the environment)")
    common.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"seconds to wait for each answer of the server (default {DEFAULT_TIMEOUT_S:g})")
    sub = parser.add_subparsers(dest="pacs_command", metavar="ACTION")
    sub.required = True

    find = sub.add_parser("find", parents=[common], help="list the studies on the server (no patient names or ids)",
                          description="List the studies on a DICOMweb server, newest first.")
    find.add_argument("--modality", default="CT", help="only studies holding this modality (default CT; "
                      "'any' for all)")
    find.add_argument("--since", metavar="YYYYMMDD", help="only studies from this date on")
    find.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"at most N studies (default {DEFAULT_LIMIT})")
    find.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    predict = sub.add_parser("predict", parents=[common], help="predict a study's axial CT series, optionally "
                             "storing the result as a DICOM SR", description="Predict every slice of a study's "
                             "axial CT series with a run's model; --push stores a DICOM SR into the study.")
    predict.add_argument("--study", required=True, metavar="STUDY_UID", help="Study Instance UID")
    predict.add_argument("--series", metavar="SERIES_UID", help="this series instead of the one chosen")
    predict.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model predicts")
    predict.add_argument("--push", action="store_true", help="store a Comprehensive 3D SR with the study-level "
                         "probabilities into the study (only when every slice was predicted)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")

    watch = sub.add_parser("watch", parents=[common], help="predict each new CT study on the server once",
                           description="Poll for new CT studies and predict (and with --push store the SR of) "
                           "each once. Ctrl-C stops.")
    watch.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model predicts")
    watch.add_argument("--interval", type=_positive, default=60.0, metavar="S", help="seconds between polls "
                       "(default 60; doubled per failed poll up to 300 while the server is unavailable)")
    watch.add_argument("--push", action="store_true", help="store each study's SR")
    watch.add_argument("--state", metavar="FILE", help="state file (default: one per server and run in the "
                       "user's state folder)")
    watch.add_argument("--include-existing", action="store_true", help="also predict the CT studies already on "
                       "the server at the first poll (default: only those that arrive later)")
    watch.add_argument("--json", action="store_true", help="print one JSON object per study done")


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.errors import PacsUnavailableError

    action = {"find": _find, "predict": _predict, "watch": _watch}[args.pacs_command]
    try:
        return action(args)
    except PacsUnavailableError as exc:  # the server, not the input: trying later may work
        raise CommandError(str(exc), EXIT_FAILED) from None


def _client(args: argparse.Namespace):
    from hemorrhage_core.pacs import PacsClient

    return PacsClient.from_url(args.url, timeout_s=args.timeout)


def _load_run(run_dir: str):
    from hemorrhage_core.errors import HemorrhageError
    from training.prediction import load_run_predictor

    try:
        return load_run_predictor(run_dir)
    except HemorrhageError as exc:
        raise CommandError(f"cannot use run {run_dir}: {exc}", EXIT_BAD_INPUT) from None


# ------------------------------------------------------------------------------------------------ find
def _find(args: argparse.Namespace) -> int:
    modality = None if str(args.modality).lower() == "any" else args.modality
    with _client(args) as client:
        studies = client.find_studies(modality=modality, since=args.since, limit=args.limit)
    if args.json:
        print(json.dumps([s.to_dict() for s in studies], indent=2))
        return EXIT_OK
    print("study_uid\tstudy_date\tmodalities\tseries\tinstances\tdescription")
    for s in studies:
        print("\t".join([s.study_uid, s.study_date or "", ",".join(s.modalities),
                         "" if s.n_series is None else str(s.n_series),
                         "" if s.n_instances is None else str(s.n_instances), s.description or ""]))
    print(f"{len(studies)} studies", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- predict
def _print_prediction(result, pushed, stream) -> None:
    from hemorrhage_core.labels import LABELS, SHORT_NAMES

    print(f"study {result.study_uid}, series {result.series_uid}", file=stream)
    print("sop_instance_uid\tz\t" + "\t".join(SHORT_NAMES[label] for label in LABELS) + "\twarnings", file=stream)
    for s in result.slices:
        z = "" if s.z is None else f"{s.z:g}"
        if s.probabilities is None:
            print(f"{s.sop_instance_uid}\t{z}\terror: {s.error}", file=stream)
        else:
            cells = [f"{s.probabilities[label]:.3f}" for label in LABELS]
            print("\t".join([s.sop_instance_uid, z, *cells, " | ".join(s.warnings)]).rstrip("\t"), file=stream)
    study = result.study
    if study is not None:
        print("study (max)\t\t" + "\t".join(f"{study[label]:.3f}" for label in LABELS), file=stream)
    if pushed is not None:
        print(f"stored SR {pushed.sop_instance_uid} in series {pushed.series_uid}", file=stream)


def _report_slices(result) -> None:
    flagged = sum(bool(s.warnings) for s in result.slices)
    if flagged:
        print(f"warning: {flagged} of {len(result.slices)} slices do not look like a head CT slice (see their "
              "warnings); check them before trusting their probabilities", file=sys.stderr)
    for s in result.failed:
        print(f"slice {s.sop_instance_uid}: {s.error}", file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from hemorrhage_core.errors import PacsError, PacsUnavailableError
    from hemorrhage_core.pacs import predict_study, push_result

    with _client(args) as client:
        record, predictor = _load_run(args.run)
        result = predict_study(client, predictor, args.study, series_uid=args.series, run_id=record.id)
        pushed, push_error = None, None
        if args.push and not result.failed:
            try:
                pushed = push_result(client, result, run_id=record.id)
            except PacsError as exc:
                push_error = exc
    if args.json:
        print(json.dumps(result.to_dict(pushed.to_dict() if pushed else None), indent=2, allow_nan=False))
    else:
        _print_prediction(result, pushed, sys.stdout)
    if predictor.calibration is not None:
        print("note: probabilities are calibrated with the run's calibration.json", file=sys.stderr)
    _report_slices(result)
    if result.failed:
        print(f"{len(result.failed)} of {len(result.slices)} slices could not be predicted"
              + ("; nothing was stored" if args.push else ""), file=sys.stderr)
        return EXIT_BAD_INPUT
    if push_error is not None:
        print(f"error: the SR was not stored: {push_error}", file=sys.stderr)
        return EXIT_FAILED if isinstance(push_error, PacsUnavailableError) else EXIT_BAD_INPUT
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- watch
def _outcome_printer(as_json: bool):
    def show(outcome: Any) -> None:
        if as_json:
            result = outcome.prediction.to_dict(outcome.pushed.to_dict() if outcome.pushed else None) \
                if outcome.prediction is not None else None
            line = json.dumps({"study_uid": outcome.study_uid, "status": outcome.status, "message": outcome.message,
                               "result": result}, allow_nan=False)
        else:
            study = outcome.prediction.study if outcome.prediction is not None else None
            cells = [outcome.study_uid, outcome.status]
            if study is not None:
                cells.append(f"any={study['any']:.3f}")
            if outcome.pushed is not None:
                cells.append(f"SR {outcome.pushed.sop_instance_uid}")
            if outcome.message:
                cells.append(outcome.message)
            line = "\t".join(cells)
        print(line, flush=True)

    return show


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def _watch(args: argparse.Namespace) -> int:
    from hemorrhage_core.pacs import Watcher, WatchState, default_state_path

    with _client(args) as client:
        record, predictor = _load_run(args.run)
        state_path = args.state or default_state_path(client.url, record.id)
        state = WatchState.load(state_path, url=client.url, run_id=record.id)
        watcher = Watcher(client, predictor, state, run_id=record.id, push=args.push, interval_s=args.interval,
                          include_existing=args.include_existing, on_outcome=_outcome_printer(args.json))
        print(f"watching {client.url} every {args.interval:g} s with run {record.id}"
              f"{' (storing SRs)' if args.push else ''}; state in {state.path}; Ctrl-C stops", file=sys.stderr)
        # SIGTERM (a service manager stopping the watch) ends it as Ctrl-C does; only the main thread may.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if in_main else None
        try:
            watcher.run()
        except KeyboardInterrupt:
            print(f"watch stopped; what was done is in {state.path}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
    return EXIT_OK
