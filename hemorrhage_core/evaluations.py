"""Saved evaluations of a run and the metrics every evaluation reports (no torch, no Shiny).

A run's model evaluated on a data set leaves, inside the run::

    RUN/evaluations/NAME/predictions.csv   # PREDICTION_COLUMNS, the probabilities as evaluated
    RUN/evaluations/NAME/metrics.json      # written last: a folder without it is incomplete
    RUN/thresholds.json                    # operating points chosen on validation (Youden's J)
    RUN/calibration.json                   # per-label temperatures fitted on validation (optional)

``VALIDATION`` names the run's own predictions.csv (the split that chose the best epoch, so its
numbers are optimistic) as one more data set beside the saved ones. Study level means one row per
series, the maximum over its slices for each label (truth and probability alike).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.calibration import ECE_BINS, Calibration, brier, expected_calibration_error
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.fileio import atomic_write_text
from hemorrhage_core.labels import LABEL_WEIGHTS, LABELS, SUBTYPES, consistent_labels
from hemorrhage_core.runs import PREDICTION_COLUMNS, PREDICTIONS_CSV, dumps_json, read_csv_tolerant

EVALUATIONS_DIR = "evaluations"
EVALUATION_METRICS = "metrics.json"
THRESHOLDS_JSON = "thresholds.json"
CALIBRATION_JSON = "calibration.json"
VALIDATION = "validation"  # the run's own validation predictions, offered beside saved evaluations
TEST = "test"  # the name the pipeline saves its held-out test evaluation under
DEFAULT_THRESHOLD = 0.5  # used for a label whose validation data cannot choose one (one class only)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TRUE_COLUMNS = [f"true_{label}" for label in LABELS]
PROB_COLUMNS = [f"prob_{label}" for label in LABELS]


class EvaluationError(HemorrhageError):
    """A saved evaluation, threshold or calibration file that is missing, incomplete or damaged."""


# ------------------------------------------------------------------------------------ frames
def check_name(name: str) -> str:
    """An evaluation name is a plain folder name (letters, digits, ``._-``); ``validation`` is reserved."""
    if not isinstance(name, str) or not _NAME.match(name) or name == VALIDATION:
        raise EvaluationError(
            f"evaluation name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (and not {VALIDATION!r})"
        )
    return name


def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true (N, 6) int, y_prob (N, 6) float) of a predictions frame, in LABELS order."""
    return frame[TRUE_COLUMNS].to_numpy(dtype=np.int64), frame[PROB_COLUMNS].to_numpy(dtype=np.float64)


def study_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per series: ``series``, ``patient``, ``n_slices`` and the maximum of each true_/prob_ column."""
    grouped = frame.groupby("series", sort=True)
    out = grouped[TRUE_COLUMNS + PROB_COLUMNS].max()
    out.insert(0, "patient", grouped["patient"].first())
    out.insert(1, "n_slices", grouped.size())
    return out.reset_index()


def with_probabilities(frame: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """A copy of a predictions frame with its prob_ columns replaced by ``probs`` (N, 6)."""
    out = frame.copy()
    out[PROB_COLUMNS] = probs
    return out


# ---------------------------------------------------------------------------------- metrics
def choose_thresholds(frame: pd.DataFrame) -> dict[str, Any]:
    """Operating points from (validation) predictions: Youden's J per label, slice and study level.

    A label whose data have one class only gets ``DEFAULT_THRESHOLD``, named in ``defaulted``.
    """
    out: dict[str, Any] = {"method": "youden_j", "default": DEFAULT_THRESHOLD}
    for level, data in (("slice", frame), ("study", study_frame(frame))):
        t, p = arrays(data)
        chosen = {label: metrics.youden_threshold(t[:, j], p[:, j]) for j, label in enumerate(LABELS)}
        out[level] = {label: DEFAULT_THRESHOLD if v is None else v for label, v in chosen.items()}
        out[f"{level}_defaulted"] = [label for label, v in chosen.items() if v is None]
    return out


def binary_report(y_true: np.ndarray, y_prob: np.ndarray, thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Per-label maps for (N, 6) truth and probabilities: discrimination, calibration, operating point."""
    report: dict[str, Any] = {
        "auc": metrics.per_label_auc(y_true, y_prob),
        "average_precision": {},
        "brier": {},
        "ece": {},
        "threshold": {},
        "sensitivity": {},
        "specificity": {},
        "ppv": {},
        "npv": {},
        "positives": {},
    }
    report["auc_mean"] = metrics.mean_defined(report["auc"])
    for j, label in enumerate(LABELS):
        t, p = y_true[:, j], y_prob[:, j]
        at = metrics.threshold_metrics(t, p, float(thresholds[label]))
        report["average_precision"][label] = metrics.average_precision(t, p)
        report["brier"][label] = brier(t, p)
        report["ece"][label] = expected_calibration_error(t, p, n_bins=ECE_BINS)
        report["threshold"][label] = float(thresholds[label])
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            report[key][label] = getattr(at, key)
        report["positives"][label] = int(t.sum())
    report["weighted_log_loss"] = metrics.weighted_log_loss(y_true, y_prob)
    return report


def evaluation_metrics(frame: pd.DataFrame, thresholds: Mapping[str, Any], *, stage: int | None) -> dict[str, Any]:
    """The metrics object of an evaluation (see docs/run-format.md), from its predictions frame.

    Keeps the evaluate command's historic keys (``n_images``, ``auc``, ``weighted_log_loss``,
    ``accuracy``, ...) and adds the calibration and operating-point maps, ``n_patients``,
    ``n_studies`` and ``study`` (the same maps over one row per series, maxima over its slices).
    """
    y_true, y_prob = arrays(frame)
    stage1_pred = metrics.stage1_probs_from_labels(y_prob) if stage == 1 else None
    out = metrics.summarise(y_true, y_prob, stage1_pred)
    out.update(binary_report(y_true, y_prob, thresholds["slice"]))
    out["ece_bins"] = ECE_BINS
    out["n_patients"] = int(frame["patient"].nunique())
    studies = study_frame(frame)
    out["n_studies"] = len(studies)
    st_true, st_prob = arrays(studies)
    out["study"] = {"n_studies": len(studies), **binary_report(st_true, st_prob, thresholds["study"])}
    out["thresholds_from"] = {
        "method": thresholds.get("method", "youden_j"), "data": thresholds.get("data", VALIDATION),
        "defaulted": {"slice": thresholds.get("slice_defaulted", []), "study": thresholds.get("study_defaulted", [])},
    }
    out["consistent"] = consistent_report(y_true, y_prob)
    out["auc_given_any"] = subtype_auc_given_any(y_true, y_prob)
    out["subtype_pairs"] = subtype_pair_auc(y_true, y_prob)
    out["along_z"] = along_z(frame)
    # Each subtype's output too: does it peak on the slices of its own type within a series?
    out["along_z_subtypes"] = {label: along_z(frame, label) for label in SUBTYPES}
    return out


def along_z(frame: pd.DataFrame, label: str = "any") -> dict[str, Any]:
    """Whether ``label``'s probability rises on a series' bleed slices: over every series holding both
    slices with and without it, ``n_series``, ``rising`` (how many score their bleed slices higher on
    average), ``separated`` (how many score every bleed slice above every other slice), and the means
    of the within-series AUC and of the gap (mean over bleed slices minus mean over the others).

    A slice-level AUC pools all patients, so a model could reach it by scoring patients, not slices;
    this asks the clinician's question, whether the curve along z peaks where the blood is."""
    n = rising = separated = 0
    aucs: list[float] = []
    gaps: list[float] = []
    for _, part in frame.groupby("series", sort=True):
        truth = part[f"true_{label}"].to_numpy() == 1
        prob = part[f"prob_{label}"].to_numpy(dtype=np.float64)
        if truth.all() or not truth.any():
            continue
        n += 1
        gap = float(prob[truth].mean() - prob[~truth].mean())
        rising += gap > 0
        separated += bool(prob[truth].min() > prob[~truth].max())
        aucs.append(metrics.roc_auc(truth.astype(np.int64), prob))
        gaps.append(gap)
    return {
        "label": label, "n_series": n, "rising": rising, "separated": separated,
        "auc_mean": float(np.mean(aucs)) if aucs else None, "gap_mean": float(np.mean(gaps)) if gaps else None,
    }


def subtype_auc_given_any(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float | None]:
    """Each subtype's AUC among the slices that bleed (true ``any`` = 1): how well the outputs tell the
    types apart once blood is there. A subtype's plain AUC mixes that with blood against no blood, which
    ``any`` already measures; None where the bleed slices hold one class of the subtype only."""
    bleeds = y_true[:, LABELS.index("any")] == 1
    return {label: metrics.roc_auc(y_true[bleeds, j], y_prob[bleeds, j])
            for j, label in enumerate(LABELS) if label != "any"}


def subtype_pair_auc(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, dict[str, float | None]]:
    """``{A: {B: AUC}}``: subtype A's output on the slices holding A against the slices holding B but not
    A, for every other subtype B. Below 0.5 the output ranks B's slices above A's own: A is taken for B
    (a lens of epidural blood read as "blood under the skull" rates the longer subdural crescents
    higher). Slices holding both count as A's positives only. None where either side is empty."""
    out: dict[str, dict[str, float | None]] = {}
    for a in SUBTYPES:
        j = LABELS.index(a)
        held = y_true[:, j] == 1
        row: dict[str, float | None] = {}
        for b in SUBTYPES:
            if b == a:
                continue
            other = (y_true[:, LABELS.index(b)] == 1) & (y_true[:, j] == 0)
            pick = held | other
            row[b] = metrics.roc_auc(held[pick].astype(np.int64), y_prob[pick, j])
        out[a] = row
    return out


def auc_by_size(frame: pd.DataFrame, areas: pd.DataFrame, bins: int = 3) -> dict[str, list[dict[str, Any]] | None]:
    """Each label's AUC with its positive slices split into ``bins`` equal-count groups by blood area.

    ``frame``: an evaluation's predictions (``image_id``, ``true_*``, ``prob_*``); ``areas``: mm² per
    slice and label (``synthetic.truth.blood_areas``: phantoms only, a real archive has no areas).
    Each group is scored against every negative slice (``auc``) and, for a subtype, against the
    negatives that bleed (``auc_given_any``), which separates "too small to see" from "seen but taken
    for another type". None for a label with fewer positives than groups or no negatives.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    merged = frame.merge(areas, on="image_id", how="inner", validate="one_to_one", suffixes=("", "_area"))
    out: dict[str, list[dict[str, Any]] | None] = {}
    for label in LABELS:
        truth = merged[f"true_{label}"].to_numpy()
        pos, neg = merged[truth == 1], merged[truth == 0]
        if len(pos) < bins or neg.empty:
            out[label] = None
            continue
        area = pos[label].to_numpy(dtype=np.float64)
        # Equal-count groups by rank, so tied areas cannot leave a group empty.
        group = np.minimum((np.argsort(np.argsort(area, kind="stable"), kind="stable") * bins) // len(area), bins - 1)
        bleeding = neg[neg["true_any"] == 1] if label != "any" else None
        rows = []
        for g in range(bins):
            part = pos[group == g]
            rows.append({"n": int(len(part)), "area_mm2": [float(part[label].min()), float(part[label].max())],
                         "auc": _auc_against(part, neg, label), "auc_given_any": _auc_against(part, bleeding, label)})
        out[label] = rows
    return out


def auc_by_site(frame: pd.DataFrame, sites: pd.DataFrame) -> dict[str, list[dict[str, Any]] | None]:
    """Each subtype's AUC with its positive slices grouped by where the blood lies.

    ``frame``: an evaluation's predictions; ``sites``: per slice and subtype the site of its blood, ""
    where the label is 0 (``synthetic.truth.lesion_sites``: phantoms only). Each site's positives are
    scored against every negative slice (``auc``) and against the negatives that bleed
    (``auc_given_any``), as ``auc_by_size`` does; the sites in order of their count, largest first (ties
    by name). None for a subtype without positives or negatives; ``any`` has no site and is left out.
    """
    named = sites.rename(columns={label: f"{label}_site" for label in SUBTYPES})
    merged = frame.merge(named, on="image_id", how="inner", validate="one_to_one")
    out: dict[str, list[dict[str, Any]] | None] = {}
    for label in SUBTYPES:
        truth = merged[f"true_{label}"].to_numpy()
        pos, neg = merged[truth == 1], merged[truth == 0]
        if pos.empty or neg.empty:
            out[label] = None
            continue
        bleeding = neg[neg["true_any"] == 1]
        counts = pos[f"{label}_site"].value_counts()
        order = sorted(counts.index, key=lambda site: (-int(counts[site]), str(site)))
        rows = []
        for site in order:
            here = pos[pos[f"{label}_site"] == site]
            rows.append({"site": str(site), "n": int(len(here)), "auc": _auc_against(here, neg, label),
                         "auc_given_any": _auc_against(here, bleeding, label)})
        out[label] = rows
    return out


def _auc_against(positives: pd.DataFrame, negatives: pd.DataFrame | None, label: str) -> float | None:
    """AUC of ``label``'s probability for these positives against these negatives (None: no negatives)."""
    if negatives is None or negatives.empty:
        return None
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return metrics.roc_auc(y, np.r_[positives[f"prob_{label}"], negatives[f"prob_{label}"]])


def consistent_report(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, Any]:
    """Every label scored as predictions report it (``labels.consistent_labels``: no subtype above
    ``any``) beside the model's own outputs: per-label AUC and the weighted log loss, and per subtype
    the share of slices the rule ``lowered``."""
    ruled = consistent_labels(y_prob)

    def scores(p: np.ndarray) -> dict[str, Any]:
        return {"auc": metrics.per_label_auc(y_true, p),
                "weighted_log_loss": metrics.weighted_log_loss(y_true, p, weights=LABEL_WEIGHTS)}

    lowered = {label: float(np.mean(ruled[:, j] < y_prob[:, j])) for j, label in enumerate(SUBTYPES)}
    return {"own": scores(y_prob), "rule": scores(ruled), "lowered": lowered}


def calibration_report(y_true: np.ndarray, raw: np.ndarray, calibrated: np.ndarray) -> dict[str, Any]:
    """Brier, ECE and the weighted log loss before and after calibration, per label."""

    def side(p: np.ndarray) -> dict[str, Any]:
        return {
            "brier": {label: brier(y_true[:, j], p[:, j]) for j, label in enumerate(LABELS)},
            "ece": {label: expected_calibration_error(y_true[:, j], p[:, j], n_bins=ECE_BINS)
                    for j, label in enumerate(LABELS)},
            "weighted_log_loss": metrics.weighted_log_loss(y_true, p, weights=LABEL_WEIGHTS),
        }

    return {"before": side(raw), "after": side(calibrated)}


# ------------------------------------------------------------------------ run-level files
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvaluationError(f"{what} is damaged (not valid JSON)") from None
    if not isinstance(value, dict):
        raise EvaluationError(f"{what} is damaged (not a JSON object)")
    return value


def read_calibration(run_dir: str | PathLike) -> Calibration | None:
    """The run's calibration.json, or None when the run has none; EvaluationError when it is damaged."""
    path = Path(run_dir) / CALIBRATION_JSON
    if not path.is_file():
        return None
    try:
        return Calibration.from_dict(_read_json(path, CALIBRATION_JSON))
    except (ValueError, TypeError, KeyError) as exc:
        raise EvaluationError(f"{CALIBRATION_JSON} is damaged: {exc}") from None


def validation_frame(run_dir: str | PathLike) -> pd.DataFrame:
    """The run's validation predictions (predictions.csv) as written by training, uncalibrated."""
    path = Path(run_dir) / PREDICTIONS_CSV
    if not path.is_file():
        raise EvaluationError("the run has no validation predictions yet (predictions.csv)")
    return _checked_predictions(path, PREDICTIONS_CSV)


def fit_calibration(run_dir: str | PathLike) -> Calibration:
    """Fit temperature scaling on the run's validation predictions; write calibration.json and the
    thresholds chosen on the calibrated validation probabilities."""
    frame = validation_frame(run_dir)
    y_true, y_prob = arrays(frame)
    calibration = Calibration.fit(y_true, y_prob, fitted_on=VALIDATION)
    atomic_write_text(Path(run_dir) / CALIBRATION_JSON, dumps_json(calibration.to_dict()))
    write_thresholds(run_dir, calibration)
    return calibration


def write_thresholds(run_dir: str | PathLike, calibration: Calibration | None) -> dict[str, Any]:
    """Choose the operating points on the run's validation predictions and save them (thresholds.json)."""
    frame = validation_frame(run_dir)
    if calibration is not None:
        frame = with_probabilities(frame, calibration.apply(arrays(frame)[1]))
    chosen = {**choose_thresholds(frame), "calibrated": calibration is not None, "data": VALIDATION}
    atomic_write_text(Path(run_dir) / THRESHOLDS_JSON, dumps_json(chosen))
    return chosen


def run_thresholds(run_dir: str | PathLike, calibration: Calibration | None) -> dict[str, Any]:
    """The run's operating points: thresholds.json when it matches the calibration in use, else
    chosen again from the validation predictions (the same rule, so the same values)."""
    path = Path(run_dir) / THRESHOLDS_JSON
    if path.is_file():
        try:
            saved = _read_json(path, THRESHOLDS_JSON)
            if bool(saved.get("calibrated")) == (calibration is not None) and all(
                isinstance(saved.get(level), dict) and all(
                    isinstance(saved[level].get(label), (int, float)) for label in LABELS)
                for level in ("slice", "study")
            ):
                return saved
        except EvaluationError:
            pass  # damaged: chosen again below
    try:
        frame = validation_frame(run_dir)
    except EvaluationError:  # no validation predictions to choose on (a run from outside training)
        fixed = dict.fromkeys(LABELS, DEFAULT_THRESHOLD)
        return {"method": "default", "default": DEFAULT_THRESHOLD, "calibrated": calibration is not None,
                "data": None, "slice": fixed, "study": dict(fixed),
                "slice_defaulted": list(LABELS), "study_defaulted": list(LABELS)}
    if calibration is not None:
        frame = with_probabilities(frame, calibration.apply(arrays(frame)[1]))
    return {**choose_thresholds(frame), "calibrated": calibration is not None, "data": VALIDATION}


# ---------------------------------------------------------------------- saved evaluations
def evaluation_dir(run_dir: str | PathLike, name: str) -> Path:
    return Path(run_dir) / EVALUATIONS_DIR / check_name(name)


def write_evaluation(run_dir: str | PathLike, name: str, frame: pd.DataFrame, result: Mapping[str, Any]) -> Path:
    """Save an evaluation atomically: predictions.csv first, then metrics.json (the completion mark)."""
    folder = evaluation_dir(run_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}")
    buf = io.StringIO()
    frame[list(PREDICTION_COLUMNS)].to_csv(buf, index=False, lineterminator="\n")
    # A reader that finds metrics.json finds the predictions it describes (written first).
    atomic_write_text(folder / PREDICTIONS_CSV, buf.getvalue())
    atomic_write_text(folder / EVALUATION_METRICS, dumps_json(dict(result)))
    return folder


@dataclass(frozen=True)
class EvaluationStatus:
    """What a run folder holds under a data name: usable (``ok``) or why not (``problem``)."""

    name: str
    ok: bool
    n_images: int | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        if self.name == VALIDATION:
            return f"validation ({self.n_images} images; chose the epoch, optimistic)"
        if not self.ok:
            return f"{self.name} (unusable: {self.problem})"
        return f"{self.name} ({self.n_images} images)"


def _status(folder: Path) -> EvaluationStatus:
    name = folder.name
    if not (folder / EVALUATION_METRICS).is_file():
        return EvaluationStatus(name, False, problem="incomplete (no metrics.json; interrupted while saving?)")
    try:
        saved = _read_json(folder / EVALUATION_METRICS, "metrics.json")
    except EvaluationError as exc:
        return EvaluationStatus(name, False, problem=str(exc))
    n = saved.get("n_images")
    if not (folder / PREDICTIONS_CSV).is_file():
        return EvaluationStatus(name, False, problem="predictions.csv is missing")
    return EvaluationStatus(name, True, n_images=n if isinstance(n, int) else None)


def list_evaluations(run_dir: str | PathLike) -> list[EvaluationStatus]:
    """The run's data choices: saved evaluations (``test`` first, then by name), then validation.

    Damaged or incomplete folders are listed with ``ok=False`` and the reason, never raised.
    """
    root = Path(run_dir) / EVALUATIONS_DIR
    found: list[EvaluationStatus] = []
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))
    except OSError:
        entries = []
    for folder in entries:
        found.append(_status(folder))
    found.sort(key=lambda s: (s.name != TEST, s.name))
    val_path = Path(run_dir) / PREDICTIONS_CSV
    if val_path.is_file():
        try:
            n_val = sum(1 for _ in val_path.open("rb")) - 1
        except OSError:
            n_val = None
        found.append(EvaluationStatus(VALIDATION, True, n_images=n_val))
    return found


def _checked_predictions(path: Path, what: str) -> pd.DataFrame:
    try:
        frame = read_csv_tolerant(path, PREDICTION_COLUMNS)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a damaged file, said in words
        raise EvaluationError(f"{what} cannot be read ({type(exc).__name__})") from None
    if frame.empty:
        raise EvaluationError(f"{what} holds no predictions")
    try:
        frame["image_id"] = frame["image_id"].astype(str)
        frame["patient"] = frame["patient"].astype(str)
        frame["series"] = frame["series"].astype(str)
        frame["z"] = pd.to_numeric(frame["z"], errors="coerce")
        truth = frame[TRUE_COLUMNS].apply(pd.to_numeric, errors="coerce")
        probs = frame[PROB_COLUMNS].apply(pd.to_numeric, errors="coerce")
    except (KeyError, ValueError, TypeError):
        raise EvaluationError(f"{what} is damaged (columns missing or not numbers)") from None
    if truth.isna().any().any() or not truth.isin([0, 1]).all().all():
        raise EvaluationError(f"{what} is damaged (truth columns must hold 0 or 1)")
    if probs.isna().any().any() or (probs.to_numpy() < 0).any() or (probs.to_numpy() > 1).any():
        raise EvaluationError(f"{what} is damaged (probabilities must be numbers in [0, 1])")
    frame[TRUE_COLUMNS] = truth.astype(np.int64)
    frame[PROB_COLUMNS] = probs.astype(np.float64)
    return frame


@dataclass(frozen=True)
class EvaluationData:
    """Predictions of one run on one data set, as every panel and report should use them.

    ``predictions`` hold calibrated probabilities when the run has a calibration (``calibration``);
    ``raw`` gives the model's own. ``saved`` is the evaluation's metrics.json (None for validation).
    """

    run_dir: Path
    name: str
    predictions: pd.DataFrame
    calibration: Calibration | None
    saved: dict[str, Any] | None

    @property
    def optimistic(self) -> bool:
        return self.name == VALIDATION

    @property
    def n_images(self) -> int:
        return len(self.predictions)

    @property
    def n_patients(self) -> int:
        return int(self.predictions["patient"].nunique())

    @property
    def n_studies(self) -> int:
        return int(self.predictions["series"].nunique())

    def describe(self) -> str:
        """One line naming the data set and its size (and, for validation, why it flatters)."""
        size = f"{self.n_images} images, {self.n_patients} patients, {self.n_studies} series"
        if self.optimistic:
            return f"validation set ({size}): the split that chose the best epoch, so its numbers are optimistic"
        return f"saved evaluation '{self.name}' ({size})"

    def raw(self) -> pd.DataFrame:
        """The predictions before calibration (identical to ``predictions`` when uncalibrated)."""
        if self.calibration is None:
            return self.predictions
        return with_probabilities(self.predictions, self.calibration.invert(arrays(self.predictions)[1]))

    def thresholds(self) -> dict[str, Any]:
        """The run's operating points on the probability scale of ``predictions``."""
        return run_thresholds(self.run_dir, self.calibration)

    def metrics(self, stage: int | None = None) -> dict[str, Any]:
        """The evaluation's metrics: metrics.json when saved, else computed the same way."""
        if self.saved is not None:
            return self.saved
        return evaluation_metrics(self.predictions, self.thresholds(), stage=stage)


def load_evaluation(run_dir: str | PathLike, name: str) -> EvaluationData:
    """Predictions of a run on data ``name`` (``validation`` or a saved evaluation); EvaluationError
    with a reason when it is missing, incomplete or damaged."""
    run_dir = Path(run_dir)
    if name == VALIDATION:
        calibration = read_calibration(run_dir)
        frame = validation_frame(run_dir)
        if calibration is not None:
            frame = with_probabilities(frame, calibration.apply(arrays(frame)[1]))
        return EvaluationData(run_dir, name, frame, calibration, None)
    folder = evaluation_dir(run_dir, name)
    status = _status(folder) if folder.is_dir() else EvaluationStatus(name, False, problem="no such evaluation")
    if not status.ok:
        raise EvaluationError(f"evaluation {name!r}: {status.problem}")
    saved = _read_json(folder / EVALUATION_METRICS, "metrics.json")
    frame = _checked_predictions(folder / PREDICTIONS_CSV, f"evaluation {name!r} predictions.csv")
    calibration = None
    applied = saved.get("calibration")
    if isinstance(applied, dict) and applied.get("applied"):
        try:
            calibration = Calibration.from_dict(applied)
        except (ValueError, TypeError, KeyError) as exc:
            raise EvaluationError(f"evaluation {name!r}: its calibration record is damaged: {exc}") from None
    return EvaluationData(run_dir, name, frame, calibration, saved)
