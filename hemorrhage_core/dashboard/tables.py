"""Pure table builders behind the panels (pandas + hemorrhage_core.metrics; no Shiny, no files)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hemorrhage_core import metrics
from hemorrhage_core.eval_plots import p_text  # noqa: F401 - the panels' p-values read as the figures'
from hemorrhage_core.labels import LABELS
from hemorrhage_core.plots import params_label as params_text
from hemorrhage_core.runs import RunSummary

# 1.96: the normal quantile for a two-sided 95% interval (used only for unpaired comparisons).
_Z95 = 1.959963984540054

OUTCOMES: tuple[str, ...] = ("all", "correct", "false positive", "false negative")


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h 02m``; ``75`` -> ``1m 15s``; None -> ``""``."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


RUNS_TABLE_COLUMNS: tuple[str, ...] = (
    "run",
    "kind",
    "backbone",
    "stage",
    "images (train/val)",
    "status",
    "epoch",
    "best epoch",
    "best AUC (mean)",
    "best AUC (any)",
    "weighted log loss",
    "duration",
    "started (UTC)",
    "note",
)


# The runs table shows the start of a failure note; the run's details show all of it.
NOTE_CHARS = 90


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def runs_table(summaries: Iterable[RunSummary], *, params: bool = False) -> pd.DataFrame:
    """One display row per run, in the given order (newest first from RunIndex.snapshot).

    With ``params``, the configuration values that differ between the runs follow the fixed
    columns as ``config.<key>`` columns (see ``param_columns``).
    """
    summaries = list(summaries)
    rows = []
    for s in summaries:
        images = ""
        if s.n_images is not None:
            images = f"{s.n_images}"
            if s.n_train is not None and s.n_val is not None:
                images += f" ({s.n_train}/{s.n_val})"
        epoch = ""
        if s.last_epoch is not None:
            epoch = f"{s.last_epoch}" + (f"/{s.epochs_planned}" if s.epochs_planned else "")
        rows.append(
            {
                "run": s.path.name,
                "kind": s.kind or "",
                "backbone": s.backbone or "",
                "stage": "" if s.stage is None else str(s.stage),
                "images (train/val)": images,
                "status": s.status,
                "epoch": epoch,
                "best epoch": "" if s.best_epoch is None else str(s.best_epoch),
                "best AUC (mean)": _round(s.best_auc_mean),
                "best AUC (any)": _round(s.best_auc_any),
                "weighted log loss": _round(s.best_weighted_log_loss),
                "duration": format_duration(s.duration_s),
                "started (UTC)": (s.created or "").replace("T", " ").rstrip("Z"),
                "note": _shorten(s.reason or "", NOTE_CHARS),
            }
        )
    frame = pd.DataFrame(rows, columns=list(RUNS_TABLE_COLUMNS))
    if not params:
        return frame
    return pd.concat([frame, param_columns(summaries)], axis=1)


# Config keys never shown as parameter columns: where data and records go, how the machine runs the
# same computation (workers, threads, device, caching, memory format, progress bars), what is only
# reported (gallery size, z-smoothed metrics), the stage-1 run a stage-2 run starts from (its own
# path, always different), and what a fixed column shows already (backbone, stage).
RUN_PARAM_EXCLUDED: frozenset[str] = frozenset(
    {
        "data",
        "runs_dir",
        "init_from",
        "progress",
        "threads",
        "device",
        "num_workers",
        "cache",
        "channels_last",
        "eval_batch_size",
        "gallery_size",
        "z_smooth",
        "backbone",
        "stage",
    }
)
PARAM_PREFIX = "config."
_MISSING = object()


def flat_config(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """A run's config with nested mappings flattened to dotted keys (``{"a": {"b": 1}}`` -> ``a.b``)."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_key(value: Any) -> str:
    """Text equal for equal config values (1 and 1.0 alike, lists and mappings by content)."""
    if _number(value):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=str)


def compact_text(value: Any) -> str:
    """A config value as short cell text: ``[brain, subdural, bone]``, ``{a: 1}``; None -> ``""``."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(compact_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {compact_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def differing_params(
    configs: Iterable[Mapping[str, Any] | None], *, exclude: frozenset[str] = RUN_PARAM_EXCLUDED
) -> list[str]:
    """Flattened config keys whose values are not all equal across the configs, in first-seen order.

    Runs without a config (unreadable ones) are left out; a key some configs lack differs. A key
    is excluded when its top-level name is in ``exclude``.
    """
    flats = [flat_config(c) for c in configs if c is not None]
    keys = list(dict.fromkeys(k for flat in flats for k in flat if k.split(".", 1)[0] not in exclude))
    return [k for k in keys if len({_same_key(flat.get(k, _MISSING)) for flat in flats}) > 1]


def param_columns(summaries: Sequence[RunSummary]) -> pd.DataFrame:
    """``config.<key>`` columns (one row per summary) for the keys ``differing_params`` finds.

    Numeric parameters stay numbers (so the grid sorts and filters them as numbers, a missing or
    None value blank); any other parameter is compact text.
    """
    flats = [flat_config(s.config) if s.config is not None else None for s in summaries]
    columns: dict[str, pd.Series] = {}
    for key in differing_params(s.config for s in summaries):
        values = [None if flat is None else flat.get(key) for flat in flats]
        present = [v for v in values if v is not None]
        if present and all(_number(v) for v in present):
            whole = len(present) == len(values) and all(isinstance(v, int) for v in present)
            column = [math.nan if v is None else v for v in values]
            columns[PARAM_PREFIX + key] = pd.Series(column, dtype="int64" if whole else "float64")
        else:
            columns[PARAM_PREFIX + key] = pd.Series([compact_text(v) for v in values], dtype="str")
    return pd.DataFrame(columns, index=range(len(summaries)))


# ------------------------------------------------------------------------------ predictions helpers
def label_arrays(predictions: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(truth int array, probability float array) of one label, rows with a missing value dropped."""
    frame = predictions[[f"true_{label}", f"prob_{label}"]].apply(pd.to_numeric, errors="coerce").dropna()
    return frame.iloc[:, 0].to_numpy(dtype=int), frame.iloc[:, 1].to_numpy(dtype=float)


def threshold_table(result: metrics.ThresholdMetrics) -> pd.DataFrame:
    """The threshold panel's numbers as a two-column table (measure, value)."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    rows = [
        ("sensitivity (recall)", pct(result.sensitivity)),
        ("specificity", pct(result.specificity)),
        ("PPV (precision)", pct(result.ppv)),
        ("NPV", pct(result.npv)),
        ("accuracy", pct(result.accuracy)),
        ("true positives", str(result.tp)),
        ("false positives", str(result.fp)),
        ("true negatives", str(result.tn)),
        ("false negatives", str(result.fn)),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"])


# ------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Comparison:
    """Per-label AUCs of two runs with intervals and their difference (see comparison_table)."""

    table: pd.DataFrame
    paired: bool
    n_images_a: int
    n_images_b: int
    n_common: int


def comparison_table(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    *,
    labels: Sequence[str] = LABELS,
    n_resamples: int = 1000,
    seed: int = 0,
    min_overlap: float = 0.9,
) -> Comparison:
    """AUC of each label for runs A and B with patient-bootstrap intervals, and the difference A - B.

    When the two runs were validated on (nearly) the same images (shared ids cover ``min_overlap``
    of both sets), the comparison is paired on the shared images (``bootstrap_auc_difference``).
    Otherwise each run keeps its own validation set and the difference's interval combines the two
    intervals as independent normal errors, which is an approximation and is reported as unpaired.
    """
    a = pred_a.drop_duplicates("image_id").set_index("image_id")
    b = pred_b.drop_duplicates("image_id").set_index("image_id")
    common = a.index.intersection(b.index)
    paired = len(common) > 0 and len(common) >= min_overlap * max(len(a), len(b))
    rows = []
    for label in labels:
        row = {"label": label}
        if paired:
            ta, pa = (
                a.loc[common, f"true_{label}"].to_numpy(dtype=int),
                a.loc[common, f"prob_{label}"].to_numpy(float),
            )
            pb = b.loc[common, f"prob_{label}"].to_numpy(dtype=float)
            patients = a.loc[common, "patient"].astype(str).to_numpy()
            ci_a = metrics.bootstrap_auc(ta, pa, patients, n_resamples=n_resamples, seed=seed)
            ci_b = metrics.bootstrap_auc(ta, pb, patients, n_resamples=n_resamples, seed=seed)
            diff = metrics.bootstrap_auc_difference(ta, pa, pb, patients, n_resamples=n_resamples, seed=seed)
            row.update(_interval_cols(ci_a, "a"), **_interval_cols(ci_b, "b"))
            row.update(
                diff=_nan(diff and diff.difference),
                diff_lo=_nan(diff and diff.low),
                diff_hi=_nan(diff and diff.high),
                p_value=_nan(diff and diff.p_value),
            )
        else:
            ci_a = _own_interval(a, label, n_resamples, seed)
            ci_b = _own_interval(b, label, n_resamples, seed)
            row.update(_interval_cols(ci_a, "a"), **_interval_cols(ci_b, "b"))
            row.update(_unpaired_difference(ci_a, ci_b), p_value=float("nan"))
        rows.append(row)
    columns = [
        "label",
        "auc_a",
        "lo_a",
        "hi_a",
        "auc_b",
        "lo_b",
        "hi_b",
        "diff",
        "diff_lo",
        "diff_hi",
        "p_value",
    ]
    return Comparison(pd.DataFrame(rows, columns=columns), paired, len(a), len(b), len(common))


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _own_interval(frame: pd.DataFrame, label: str, n_resamples: int, seed: int) -> metrics.AucInterval | None:
    truth = frame[f"true_{label}"].to_numpy(dtype=int)
    prob = frame[f"prob_{label}"].to_numpy(dtype=float)
    return metrics.bootstrap_auc(
        truth, prob, frame["patient"].astype(str).to_numpy(), n_resamples=n_resamples, seed=seed
    )


def _interval_cols(ci: metrics.AucInterval | None, suffix: str) -> dict[str, float]:
    if ci is None:
        return {f"auc_{suffix}": math.nan, f"lo_{suffix}": math.nan, f"hi_{suffix}": math.nan}
    return {f"auc_{suffix}": ci.auc, f"lo_{suffix}": _nan(ci.low), f"hi_{suffix}": _nan(ci.high)}


def _unpaired_difference(
    ci_a: metrics.AucInterval | None, ci_b: metrics.AucInterval | None
) -> dict[str, float]:
    if ci_a is None or ci_b is None or None in (ci_a.low, ci_a.high, ci_b.low, ci_b.high):
        return {"diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan}
    se_a = (ci_a.high - ci_a.low) / (2 * _Z95)
    se_b = (ci_b.high - ci_b.low) / (2 * _Z95)
    diff = ci_a.auc - ci_b.auc
    half = _Z95 * math.sqrt(se_a**2 + se_b**2)
    return {"diff": diff, "diff_lo": diff - half, "diff_hi": diff + half}


# ---------------------------------------------------------------------------------------- gallery
def gallery_outcomes(frame: pd.DataFrame, label: str | None, threshold: float = 0.5) -> pd.Series:
    """Each gallery row's outcome at ``threshold``: correct, false positive or false negative.

    With ``label`` None every label counts: a row is a false negative if any label is missed, else a
    false positive if any label is wrongly called, else correct.
    """
    labels = LABELS if label is None else (label,)
    truth = np.stack([frame[f"true_{lb}"].to_numpy(dtype=float) for lb in labels], axis=1) > 0.5
    called = np.stack([frame[f"prob_{lb}"].to_numpy(dtype=float) for lb in labels], axis=1) >= threshold
    missed = (truth & ~called).any(axis=1)
    wrong = (~truth & called).any(axis=1)
    outcome = np.where(missed, "false negative", np.where(wrong, "false positive", "correct"))
    return pd.Series(outcome, index=frame.index, name="outcome")


def filter_gallery(
    frame: pd.DataFrame, *, label: str | None, outcome: str, threshold: float = 0.5
) -> pd.DataFrame:
    """Gallery rows showing ``label`` (truly positive or called positive; all rows for None) with ``outcome``."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    out = frame.assign(outcome=gallery_outcomes(frame, label, threshold))
    if label is not None:
        shows = (out[f"true_{label}"].astype(float) > 0.5) | (out[f"prob_{label}"].astype(float) >= threshold)
        if outcome in ("all", "correct"):
            out = out[shows]
        # A false positive / negative for the label is already about that label.
    if outcome != "all":
        out = out[out["outcome"] == outcome]
    return out


def parse_theta(text: object) -> np.ndarray | None:
    """The gallery's ``theta`` cell ("a b c d e f") as a 2x3 array, or None when unreadable."""
    try:
        values = [float(v) for v in str(text).split()]
    except ValueError:
        return None
    return np.array(values).reshape(2, 3) if len(values) == 6 and all(map(math.isfinite, values)) else None


# ------------------------------------------------------------------------------------ grid search
def grid_table(results: pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
    """Grid results in reading order (rank, parameters, mean ± std, per-split scores) and the best row.

    ``params`` holds JSON text (as RunWriter writes it); it becomes ``key=value`` text for display.
    """
    if results is None or results.empty:
        return pd.DataFrame(), None
    frame = results.copy()
    if "params" in frame:
        frame["params"] = [params_text(p) for p in frame["params"]]
    splits = sorted(
        (c for c in frame.columns if c.startswith("split") and c.endswith("_test_score")),
        key=lambda c: int("".join(ch for ch in c if ch.isdigit()) or 0),
    )
    ordered = [c for c in ("rank_test_score", "params", "mean_test_score", "std_test_score") if c in frame]
    ordered += splits + [c for c in ("mean_fit_time",) if c in frame]
    frame = frame[ordered]
    names = {
        "rank_test_score": "rank",
        "params": "parameters",
        "mean_test_score": "mean score",
        "std_test_score": "std",
        "mean_fit_time": "mean fit time (s)",
    }
    names.update({c: f"fold {i + 1}" for i, c in enumerate(splits)})
    for c in frame.columns:
        if pd.api.types.is_float_dtype(frame[c]):
            frame[c] = frame[c].round(4)
    if "rank_test_score" in frame:
        frame = frame.sort_values("rank_test_score", kind="stable").reset_index(drop=True)
        best = int(frame["rank_test_score"].idxmin())
    elif "mean_test_score" in frame:
        best = int(frame["mean_test_score"].idxmax())
    else:
        best = None
    return frame.rename(columns=names), best


# ------------------------------------------------------------------ saved evaluations (data selector)
LEVELS: tuple[str, ...] = ("slice", "study")


@dataclass(frozen=True)
class EvaluationComparison:
    """Two runs' predictions on one data set, compared at slice and study level.

    ``tables[level]`` has ``comparison_table``'s columns plus ``p_value`` (DeLong, paired only),
    ``p_holm`` (Holm over the labels) and ``positives``. ``result`` is ``paired_comparison``'s output
    when paired; ``reason`` says why the comparison is unpaired otherwise.
    """

    paired: bool
    tables: Mapping[str, pd.DataFrame]
    n_a: int
    n_b: int
    n_shared: int
    result: dict[str, Any] | None = None
    reason: str | None = None


def _series_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Study level as comparison_table reads it: one row per series, keyed by the series id."""
    from hemorrhage_core.evaluations import study_frame

    studies = study_frame(frame)
    return studies.assign(image_id=studies["series"])


def _paired_level_table(
    rows: Mapping[str, Mapping[str, Any]], fa: pd.DataFrame, fb: pd.DataFrame, *, n_resamples: int, seed: int
) -> pd.DataFrame:
    patients = fa["patient"].astype(str).to_numpy()
    out = []
    for label, row in rows.items():
        truth = fa[f"true_{label}"].to_numpy(dtype=int)
        intervals = {
            suffix: metrics.bootstrap_auc(
                truth, frame[f"prob_{label}"].to_numpy(dtype=float), patients, n_resamples=n_resamples, seed=seed
            )
            for suffix, frame in (("a", fa), ("b", fb))
        }
        low, high = row["ci"]
        out.append(
            {
                "label": label,
                **_interval_cols(intervals["a"], "a"),
                **_interval_cols(intervals["b"], "b"),
                "diff": _nan(row["diff"]),
                "diff_lo": _nan(low),
                "diff_hi": _nan(high),
                "p_value": _nan(row["p_value"]),
                "p_holm": _nan(row["p_holm"]),
                "positives": row["positives"],
            }
        )
    return pd.DataFrame(out)


def compare_evaluations(
    frame_a: pd.DataFrame, frame_b: pd.DataFrame, *, n_resamples: int = 1000, seed: int = 0
) -> EvaluationComparison:
    """Paired comparison (``comparison.paired_comparison``: DeLong, Holm, patient bootstrap of the
    difference, each run's AUC interval) on the images both frames hold; when they share none (or
    disagree on their labels), each run's own intervals and an approximate unpaired difference."""
    from hemorrhage_core.comparison import ComparisonError, paired_comparison, paired_frames
    from hemorrhage_core.evaluations import study_frame

    try:
        result = paired_comparison(frame_a, frame_b, n_resamples=n_resamples, seed=seed)
    except ComparisonError as exc:
        tables = {}
        for level, (a, b) in (("slice", (frame_a, frame_b)), ("study", (_series_rows(frame_a), _series_rows(frame_b)))):
            # min_overlap above 1 never pairs: these frames share no image, or disagree on the ones they share.
            table = comparison_table(a, b, n_resamples=n_resamples, seed=seed, min_overlap=2.0).table
            tables[level] = table.assign(p_holm=math.nan, positives=pd.NA)
        return EvaluationComparison(False, tables, len(frame_a), len(frame_b), 0, reason=str(exc))
    fa, fb = paired_frames(frame_a, frame_b)
    tables = {
        "slice": _paired_level_table(result["labels"], fa, fb, n_resamples=n_resamples, seed=seed),
        "study": _paired_level_table(
            result["study"]["labels"], study_frame(fa), study_frame(fb), n_resamples=n_resamples, seed=seed
        ),
    }
    return EvaluationComparison(True, tables, len(frame_a), len(frame_b), result["n_images"], result=result)


def _with_interval(value: float, low: float, high: float, *, signed: bool = False) -> str:
    if pd.isna(value):
        return "n/a"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    if pd.isna(low) or pd.isna(high):
        return text
    return f"{text} [{low:+.3f}, {high:+.3f}]" if signed else f"{text} [{low:.3f}, {high:.3f}]"


def comparison_display(table: pd.DataFrame, *, paired: bool) -> pd.DataFrame:
    """An EvaluationComparison table as text cells: AUCs and the difference with their 95% intervals,
    and (paired) the positives and the DeLong and Holm p-values."""
    out = pd.DataFrame({"class": table["label"]})
    if paired:
        out["positives"] = table["positives"].astype(int).astype(str)
    out["AUC A [95% CI]"] = [_with_interval(r.auc_a, r.lo_a, r.hi_a) for r in table.itertuples()]
    out["AUC B [95% CI]"] = [_with_interval(r.auc_b, r.lo_b, r.hi_b) for r in table.itertuples()]
    out["A − B [95% CI]"] = [_with_interval(r.diff, r.diff_lo, r.diff_hi, signed=True) for r in table.itertuples()]
    if paired:
        out["p (DeLong)"] = [p_text(p) for p in table["p_value"]]
        out["p (Holm)"] = [p_text(p) for p in table["p_holm"]]
    return out


def calibration_table(
    y_true: np.ndarray,
    raw: np.ndarray,
    calibrated: np.ndarray | None = None,
    temperatures: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Per class: positives, ECE (15 equal-width bins) and Brier score of the (N, 6) raw probabilities
    and, when given, of the calibrated ones with each class's temperature."""
    from hemorrhage_core.calibration import ECE_BINS, brier, expected_calibration_error

    rows = []
    for j, label in enumerate(LABELS):
        row: dict[str, Any] = {"class": label, "positives": int(y_true[:, j].sum())}
        sides = [("raw", raw)] + ([("calibrated", calibrated)] if calibrated is not None else [])
        for name, prob in sides:
            suffix = f" ({name})" if calibrated is not None else ""
            row[f"ECE{suffix}"] = _round(expected_calibration_error(y_true[:, j], prob[:, j], n_bins=ECE_BINS))
            row[f"Brier{suffix}"] = _round(brier(y_true[:, j], prob[:, j]))
        if temperatures is not None:
            row["temperature"] = _round(temperatures.get(label), 3)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if calibrated is not None:  # before beside after, measure by measure
        order = ["class", "positives", "ECE (raw)", "ECE (calibrated)", "Brier (raw)", "Brier (calibrated)"]
        frame = frame[order + (["temperature"] if temperatures is not None else [])]
    return frame


def gallery_outcomes_at(frame: pd.DataFrame, label: str | None, thresholds: Mapping[str, float]) -> pd.Series:
    """``gallery_outcomes`` with one threshold per class (e.g. the run's own operating points)."""
    labels = LABELS if label is None else (label,)
    truth = np.stack([frame[f"true_{lb}"].to_numpy(dtype=float) for lb in labels], axis=1) > 0.5
    called = np.stack(
        [frame[f"prob_{lb}"].to_numpy(dtype=float) >= float(thresholds[lb]) for lb in labels], axis=1
    )
    missed = (truth & ~called).any(axis=1)
    wrong = (~truth & called).any(axis=1)
    outcome = np.where(missed, "false negative", np.where(wrong, "false positive", "correct"))
    return pd.Series(outcome, index=frame.index, name="outcome")


def filter_gallery_at(
    frame: pd.DataFrame, *, label: str | None, outcome: str, thresholds: Mapping[str, float]
) -> pd.DataFrame:
    """``filter_gallery`` with one threshold per class."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    out = frame.assign(outcome=gallery_outcomes_at(frame, label, thresholds))
    if label is not None and outcome in ("all", "correct"):
        called = out[f"prob_{label}"].astype(float) >= float(thresholds[label])
        out = out[(out[f"true_{label}"].astype(float) > 0.5) | called]
    if outcome != "all":
        out = out[out["outcome"] == outcome]
    return out
