"""``evaluate --run RUN_DIR --data DIR [--split all|test] [--save NAME] [--calibrate] [--json]``.

A run's model on every usable image of a data set (``--split test``: only the patients the run held
out as its test set). Labels and file paths come from the data set's index; the probabilities from the
one Predictor, calibrated when the run has a calibration (``--calibrate`` fits one on the run's
validation predictions first). ``--json`` prints one object with the keys ``n_images, skipped, auc
{label: value|null}, weighted_log_loss, accuracy`` plus, each a ``{label: value}`` map,
``average_precision, brier, ece`` (15 equal-width bins), ``threshold`` (chosen on validation by Youden's
J), ``sensitivity, specificity, ppv, npv`` (at that threshold), ``n_patients``, ``n_studies``, ``study``
(the same maps with one row per series, the maximum over its slices), ``calibration`` (applied or not;
Brier, ECE and log loss before and after), ``zsmoothed``, ``flagged`` and the run's
``run``/``backbone``/``stage``. ``--save NAME`` also writes RUN/evaluations/NAME/ (predictions.csv,
metrics.json) atomically. Exit 0 on success, 2 when the run or the data set cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 2
# Predictions are made in chunks so only probabilities, not each Prediction's images, pile up in memory.
CHUNK_IMAGES = 512
SPLITS = ("all", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model is evaluated")
    parser.add_argument("--data", required=True, metavar="DIR", help="data set in the RSNA layout (labels + images)")
    parser.add_argument(
        "--split", choices=SPLITS, default="all",
        help="all usable images (default), or only the patients the run held out as its test set",
    )
    parser.add_argument("--save", metavar="NAME", help="save the evaluation as RUN_DIR/evaluations/NAME/")
    parser.add_argument(
        "--calibrate", action="store_true",
        help="fit per-label temperature scaling on the run's validation predictions (if it has none) and apply it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="processes that read the DICOM headers when the data set's index is (re)built (default: auto)",
    )


def _predict_probabilities(predictor, paths: list[Path], batch_size: int):
    """(N, 6) probabilities (NaN rows for failures), failure messages by position, count of flagged."""
    import numpy as np
    from tqdm import tqdm

    from hemorrhage_core.labels import LABELS
    from training.predict_cmd import predict_files

    probs = np.full((len(paths), len(LABELS)), np.nan)
    failures: dict[int, str] = {}
    flagged = 0
    bar = tqdm(total=len(paths), unit="img", desc="evaluate", file=sys.stderr, disable=not sys.stderr.isatty())
    for start in range(0, len(paths), CHUNK_IMAGES):
        chunk = [(str(p), None) for p in paths[start : start + CHUNK_IMAGES]]
        for offset, row in enumerate(predict_files(predictor, chunk, batch_size=batch_size)):
            if row.probabilities is None:
                failures[start + offset] = row.error or "unknown error"
            else:
                probs[start + offset] = [row.probabilities[label] for label in LABELS]
                flagged += bool(row.flags)
        bar.update(len(chunk))
    bar.close()
    return probs, failures, flagged


def heldout_rows(record, table):
    """The rows of ``table`` (a data set's index) that the run held out as its test patients."""
    from hemorrhage_core.errors import DatasetError
    from training.config import ConfigError, TrainConfig
    from training.trainer import holdout_test

    try:
        config = TrainConfig.from_dict(record.info.get("config") or {})
    except ConfigError as exc:
        raise DatasetError(f"run {record.id}: its config cannot be read ({exc})") from None
    if config.test_fraction <= 0:
        raise DatasetError(f"run {record.id} held out no test set (test_fraction 0); use --split all")
    return holdout_test(config, table)[1]


def evaluate(
    run_dir: str,
    data_dir: str,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    split: str = "all",
    calibrate: bool = False,
    save: str | None = None,
    index=None,
    rows=None,
) -> dict[str, Any]:
    """Evaluate a run's model on a data set and return the JSON object described above.

    ``index`` (the data set's DataIndex) and ``rows`` (the index rows to evaluate) let a caller that
    evaluates several runs on one data set build them once.
    """
    import numpy as np
    import torch

    from hemorrhage_core import evaluations as ev
    from hemorrhage_core import metrics
    from hemorrhage_core.data import build_index
    from hemorrhage_core.errors import DatasetError
    from hemorrhage_core.labels import LABELS
    from training.predict_cmd import load_run_predictor
    from training.trainer import predictions_frame

    if save is not None:
        ev.check_name(save)
    # Bulk evaluation is where a GPU pays off; the Predictor moves model and batches to it.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Raw probabilities from the Predictor: this command calibrates them itself, keeping both.
    record, predictor = load_run_predictor(run_dir, calibrated=False, batch_size=batch_size, device=device)
    calibration = ev.read_calibration(record.path)
    if calibration is None and calibrate:
        calibration = ev.fit_calibration(record.path)
        log.info("fitted temperature scaling on the validation predictions of %s", record.id)
    thresholds = ev.run_thresholds(record.path, calibration)
    if index is None:
        index = build_index(data_dir, workers=workers, progress=sys.stderr.isatty())
    table = index.table if rows is None else rows
    if rows is None and split == "test":
        table = heldout_rows(record, index.table)
    data_info = record.info.get("data")
    trained_on = data_info.get("dir") if isinstance(data_info, dict) else None
    if split == "all" and rows is None and trained_on and Path(trained_on).resolve() == Path(data_dir).resolve():
        log.warning("evaluating on the data set this run was trained on: the numbers are optimistic "
                    "(--split test keeps to the patients it held out)")
    table = table.reset_index(drop=True)
    paths = [Path(data_dir) / rel for rel in table["path"]]
    probs, failures, flagged = _predict_probabilities(predictor, paths, batch_size)
    ok = np.array([i not in failures for i in range(len(table))], dtype=bool)
    skipped = set(table["image_id"][~ok])
    if rows is None and split == "all":  # files the index could not read belong to no known patient
        skipped |= set(index.report.missing_ids) | set(index.report.unreadable)
    skipped = sorted(skipped)
    if failures:
        log.warning("%d images could not be predicted and are skipped", len(failures))
    if not ok.any():
        raise DatasetError(f"none of the {len(table)} images of {data_dir} could be predicted")

    kept = table.loc[ok]
    y_true = kept[list(LABELS)].to_numpy(dtype=np.int64)
    raw = probs[ok]
    y_prob = raw if calibration is None else calibration.apply(raw)
    frame = predictions_frame(kept, y_true, y_prob)
    result: dict[str, Any] = {"n_images": int(ok.sum()), "skipped": skipped}
    result.update(ev.evaluation_metrics(frame, thresholds, stage=record.stage))
    if calibration is None:
        result["calibration"] = {"applied": False}
    else:
        result["calibration"] = {"applied": True, **calibration.to_dict(), **ev.calibration_report(y_true, raw, y_prob)}
    smoothed = metrics.zsmooth(y_prob, kept["series_uid"].to_numpy(), kept["z"].to_numpy())
    zs = metrics.summarise(y_true, smoothed)
    result["zsmoothed"] = {k: zs[k] for k in ("auc", "auc_mean", "weighted_log_loss")}
    # Flagged slices (HU unlike a head CT) are predicted and counted, not dropped.
    result.update(flagged=flagged, run=record.id, backbone=record.info.get("backbone"), stage=record.stage)
    result["data"] = {"dir": str(data_dir), "split": split}
    if save is not None:
        folder = ev.write_evaluation(record.path, save, frame, result)
        log.info("saved the evaluation in %s", folder)
    return result


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_report(result: dict[str, Any], stream) -> None:
    from hemorrhage_core.labels import LABELS

    print(f"run {result['run']} ({result['backbone']}, stage {result['stage']}): {result['n_images']} images, "
          f"{result['n_patients']} patients, {result['n_studies']} series, {len(result['skipped'])} skipped",
          file=stream)
    for level, block in (("slice", result), ("study (max over each series)", result["study"])):
        print(f"\n{level} level; threshold chosen on validation (Youden's J)", file=stream)
        print(f"{'label':<18}{'pos':>6}{'AUC':>8}{'AP':>8}{'Brier':>8}{'ECE':>8}{'thresh':>8}{'sens':>8}"
              f"{'spec':>8}{'PPV':>8}{'NPV':>8}", file=stream)
        for label in LABELS:
            cells = [_fmt(block[key][label], 3) for key in
                     ("auc", "average_precision", "brier", "ece", "threshold", "sensitivity", "specificity", "ppv", "npv")]
            print(f"{label:<18}{block['positives'][label]:>6}" + "".join(f"{c:>8}" for c in cells), file=stream)
        print(f"weighted log loss {_fmt(block['weighted_log_loss'])}", file=stream)
    print(f"\nz-smoothed: weighted log loss {_fmt(result['zsmoothed']['weighted_log_loss'])}, "
          f"AUC any {_fmt(result['zsmoothed']['auc']['any'])}", file=stream)
    print(f"accuracy {_fmt(result['accuracy'])} ({result['accuracy_kind']})", file=stream)
    cal = result.get("calibration") or {}
    if cal.get("applied"):
        before, after = cal["before"], cal["after"]
        print(f"calibrated (temperature per label, fitted on validation): weighted log loss "
              f"{_fmt(before['weighted_log_loss'])} -> {_fmt(after['weighted_log_loss'])}", file=stream)
    if result["skipped"]:
        shown = ", ".join(result["skipped"][:10])
        more = f" and {len(result['skipped']) - 10} more" if len(result["skipped"]) > 10 else ""
        print(f"skipped: {shown}{more}", file=stream)


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.errors import HemorrhageError

    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_FAILED
    try:
        result = evaluate(args.run, args.data, batch_size=args.batch_size, workers=args.workers,
                          split=args.split, calibrate=args.calibrate, save=args.save)
    except HemorrhageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback; details with --verbose
        log.debug("evaluate failed", exc_info=True)
        print(f"error: internal error while evaluating ({type(exc).__name__}); rerun with -v for details",
              file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print_report(result, sys.stdout)
    return EXIT_OK
