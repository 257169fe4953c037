"""``evaluate --run RUN_DIR --data DIR [--json]``: a run's model on every usable image of a data set.

Labels and file paths come from the data set's index (``hemorrhage_core.data.build_index``); the
probabilities from the one Predictor. ``--json`` prints one object with the keys
``n_images, skipped, auc {label: value|null}, weighted_log_loss, accuracy`` (plus ``auc_mean``,
``accuracy_kind``, ``log_loss``, ``average_precision``, ``positives``, ``zsmoothed`` (the same after
z-smoothing along each series), ``flagged`` (slices whose HU content the Predictor found unlike a head
CT: predicted and counted, not dropped) and the run's ``run``/``backbone``/``stage``). ``skipped`` lists
the ids of images that could not be read (missing file, refused header or pixel data, refused input).
Exit 0 on success, 2 when the run or the data set cannot be used or no image could be read.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model is evaluated")
    parser.add_argument("--data", required=True, metavar="DIR", help="data set in the RSNA layout (labels + images)")
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


def evaluate(run_dir: str, data_dir: str, *, batch_size: int = 32, workers: int | None = None) -> dict[str, Any]:
    """Evaluate a run's model on a data set and return the JSON object described above."""
    import numpy as np
    import torch

    from hemorrhage_core import metrics
    from hemorrhage_core.data import build_index
    from hemorrhage_core.errors import DatasetError
    from hemorrhage_core.labels import LABELS
    from training.predict_cmd import load_run_predictor

    # Bulk evaluation is where a GPU pays off; the Predictor moves model and batches to it.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record, predictor = load_run_predictor(run_dir, batch_size=batch_size, device=device)
    index = build_index(data_dir, workers=workers, progress=sys.stderr.isatty())
    data_info = record.info.get("data")
    trained_on = data_info.get("dir") if isinstance(data_info, dict) else None
    if trained_on and Path(trained_on).resolve() == Path(data_dir).resolve():
        log.warning("evaluating on the data set this run was trained on: the numbers are optimistic")
    table = index.table
    paths = [Path(data_dir) / rel for rel in table["path"]]
    probs, failures, flagged = _predict_probabilities(predictor, paths, batch_size)
    ok = np.array([i not in failures for i in range(len(table))], dtype=bool)
    report = index.report
    skipped = sorted(set(report.missing_ids) | set(report.unreadable) | set(table["image_id"][~ok]))
    if failures:
        log.warning("%d images could not be predicted and are skipped", len(failures))
    if not ok.any():
        raise DatasetError(f"none of the {len(table)} images of {data_dir} could be predicted")

    y_true = table.loc[ok, list(LABELS)].to_numpy(dtype=np.int64)
    y_prob = probs[ok]
    stage = record.stage
    stage1_pred = metrics.stage1_probs_from_labels(y_prob) if stage == 1 else None
    result: dict[str, Any] = {"n_images": int(ok.sum()), "skipped": skipped}
    result.update(metrics.summarise(y_true, y_prob, stage1_pred))
    smoothed = metrics.zsmooth(y_prob, table.loc[ok, "series_uid"].to_numpy(), table.loc[ok, "z"].to_numpy())
    zs = metrics.summarise(y_true, smoothed)
    result["zsmoothed"] = {k: zs[k] for k in ("auc", "auc_mean", "weighted_log_loss")}
    # Flagged slices (HU unlike a head CT) are predicted and counted, not dropped.
    result.update(flagged=flagged, run=record.id, backbone=record.info.get("backbone"), stage=stage)
    return result


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_report(result: dict[str, Any], stream) -> None:
    from hemorrhage_core.labels import LABELS

    print(f"run {result['run']} ({result['backbone']}, stage {result['stage']}): "
          f"{result['n_images']} images, {len(result['skipped'])} skipped", file=stream)
    print(f"{'label':<18}{'positives':>10}{'AUC':>9}{'AP':>9}{'log loss':>10}{'AUC z-sm':>10}", file=stream)
    for label in LABELS:
        print(
            f"{label:<18}{result['positives'][label]:>10}{_fmt(result['auc'][label]):>9}"
            f"{_fmt(result['average_precision'][label]):>9}{_fmt(result['log_loss'][label]):>10}"
            f"{_fmt(result['zsmoothed']['auc'][label]):>10}",
            file=stream,
        )
    print(f"weighted log loss {_fmt(result['weighted_log_loss'])} "
          f"(z-smoothed {_fmt(result['zsmoothed']['weighted_log_loss'])})", file=stream)
    print(f"accuracy {_fmt(result['accuracy'])} ({result['accuracy_kind']})", file=stream)
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
        result = evaluate(args.run, args.data, batch_size=args.batch_size, workers=args.workers)
    except HemorrhageError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
