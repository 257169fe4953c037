"""A run's model evaluated on a data set: the work behind ``evaluate`` and the pipeline's test step.

``evaluate`` returns the JSON object that ``python -m training evaluate --json`` prints (see
``training.evaluate_cmd``) and, given ``save``, writes it as one of the run's saved evaluations.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _predict_probabilities(predictor, paths: list[Path], batch_size: int):
    """(N, 6) probabilities (NaN rows for failures), failure messages by position, count of flagged."""
    import numpy as np
    from tqdm import tqdm

    from hemorrhage_core.labels import LABELS
    from training.prediction import predict_rows

    probs = np.full((len(paths), len(LABELS)), np.nan)
    failures: dict[int, str] = {}
    flagged = 0
    entries: list[tuple[str, str | None]] = [(str(p), None) for p in paths]
    rows = predict_rows(predictor, entries, batch_size=batch_size)
    bar = tqdm(total=len(paths), unit="img", desc="evaluate", file=sys.stderr, disable=not sys.stderr.isatty())
    for i, row in enumerate(rows):
        if row.probabilities is None:
            failures[i] = row.error or "unknown error"
        else:  # the model's own values: evaluate calibrates them itself, and scores each label's output
            probs[i] = [(row.raw_probabilities or row.probabilities)[label] for label in LABELS]
            flagged += bool(row.flags)
        bar.update(1)
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
    device: str = "auto",
    by_size: bool = False,
    by_site: bool = False,
) -> dict[str, Any]:
    """Evaluate a run's model on a data set and return the JSON object ``evaluate --json`` prints
    (its keys: ``training.evaluate_cmd``).

    ``index`` (the data set's DataIndex) and ``rows`` (the index rows to evaluate) let a caller that
    evaluates several runs on one data set build them once. ``by_size`` (a synthetic set only) adds
    ``by_size``: each label's AUC by blood-area group of its positives (``evaluations.auc_by_size``);
    ``by_site`` (a synthetic set only) adds ``by_site``: each subtype's AUC by where its blood lies
    (``evaluations.auc_by_site``).
    """
    import numpy as np

    from hemorrhage_core import evaluations as ev
    from hemorrhage_core import metrics
    from hemorrhage_core.data import build_index
    from hemorrhage_core.errors import DatasetError
    from hemorrhage_core.labels import LABELS
    from training.prediction import load_run_predictor
    from training.trainer import predictions_frame

    if save is not None:
        ev.check_name(save)
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
    if by_size:
        from hemorrhage_core.synthetic.truth import blood_areas

        areas = blood_areas(data_dir, frame["image_id"].astype(str).tolist())
        result["by_size"] = ev.auc_by_size(frame, areas)
    if by_site:
        from hemorrhage_core.synthetic.truth import lesion_sites

        result["by_site"] = ev.auc_by_site(frame, lesion_sites(data_dir, frame["image_id"].astype(str).tolist()))
    if save is not None:
        folder = ev.write_evaluation(record.path, save, frame, result)
        log.info("saved the evaluation in %s", folder)
    return result
