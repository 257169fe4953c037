"""What the report of a runs folder says: its runs, their evaluations and tables (no Shiny, no
training import). ``hemorrhage_core.report_html`` turns it into one self-contained HTML file.

``collect_report(runs_dir)`` gathers the pipeline's four runs (pipeline.json) or, without one, the
finished train runs; each run's held-out evaluation (``test`` by default) and its validation
predictions (marked optimistic: they chose the best epoch); the paired comparison of the two final
models. ``report_tables(content)`` gives its tables as DataFrames, in the order the report shows them
(the dashboard's Report tab shows them too and offers each as CSV). Patient identifiers appear
nowhere; folders in the configurations are shown by their last component.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any

import pandas as pd

from hemorrhage_core.comparison import ComparisonError, paired_comparison
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.evaluations import (
    TEST,
    VALIDATION,
    EvaluationData,
    EvaluationError,
    along_z,
    arrays,
    calibration_report,
    load_evaluation,
    subtype_auc_given_any,
    subtype_pair_auc,
    validation_frame,
)
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.metrics import mean_defined, per_label_auc, weighted_log_loss
from hemorrhage_core.runs import RunFormatError, list_runs, read_run
from hemorrhage_core.windowing import WindowStack

PIPELINE_JSON = "pipeline.json"  # written by `python -m training pipeline` (see docs/run-format.md)
PIPELINE_ROLES: tuple[tuple[str, str, str], ...] = (
    ("phase1", "stage1", "phase 1 · stage 1"),
    ("phase1", "stage2", "phase 1 · stage 2"),
    ("phase2", "stage1", "phase 2 · stage 1"),
    ("phase2", "stage2", "phase 2 · stage 2"),
)
# Config values that are folders on the machine that trained: the last component says enough.
PATH_SETTINGS = frozenset({"data", "runs_dir", "init_from", "test_data"})
N_RESAMPLES = 1000


class ReportError(HemorrhageError):
    """A runs folder with nothing to report (missing, empty, or no finished run)."""


@dataclass(frozen=True)
class ReportRun:
    """One run in the report, with its role in a pipeline ('' outside one) and its run.json."""

    id: str
    path: Path
    role: str
    info: dict[str, Any]

    @property
    def stage(self) -> int | None:
        stage = self.info.get("stage")
        return stage if isinstance(stage, int) else None

    @property
    def name(self) -> str:
        """A short display name: role and backbone, or backbone, stage and the id's suffix."""
        backbone = self.info.get("backbone") or "?"
        if self.role:
            return f"{self.role} ({backbone})"
        return f"{backbone} s{self.stage if self.stage is not None else '?'} · {self.id.rsplit('-', 1)[-1]}"


@dataclass
class RunEvaluations:
    """A run with the data sets it was evaluated on: the held-out evaluation first, then validation."""

    run: ReportRun
    data: dict[str, EvaluationData] = field(default_factory=dict)


@dataclass
class ReportContent:
    """Everything the report shows, gathered once (the HTML and the dashboard read it)."""

    runs_dir: Path
    source: str  # "pipeline.json" or "finished runs"
    pipeline: dict[str, Any] | None
    evaluation: str
    runs: list[RunEvaluations]
    comparison: dict[str, Any] | None = None  # paired_comparison's result, with "a" and "b" ReportRuns
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    generated: str = ""


@dataclass(frozen=True)
class ReportTable:
    """One table of the report: a stable key (HTML id, CSV file name), a title and its frame."""

    key: str
    title: str
    frame: pd.DataFrame
    note: str = ""
    html_hidden: tuple[str, ...] = ("run id",)  # columns the CSV keeps but the page leaves out


# ------------------------------------------------------------------------------------ gathering
def _read_pipeline(runs_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    path = runs_dir / PIPELINE_JSON
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        notes.append("pipeline.json cannot be read (damaged?): the report lists the finished runs instead.")
        return None
    if not isinstance(value, dict):
        notes.append("pipeline.json is not a JSON object: the report lists the finished runs instead.")
        return None
    return value


def select_runs(runs_dir: str | PathLike) -> tuple[list[ReportRun], dict[str, Any] | None, list[str]]:
    """(runs, pipeline.json or None, notes): the pipeline's runs in recipe order when the folder has a
    pipeline.json naming any, else its finished train runs oldest first. ReportError when there is none."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"no runs folder at {runs_dir}")
    notes: list[str] = []
    pipeline = _read_pipeline(root, notes)
    runs: list[ReportRun] = []
    if pipeline is not None:
        for phase, stage, role in PIPELINE_ROLES:
            entry = pipeline.get(phase)
            run_id = entry.get(stage) if isinstance(entry, dict) else None
            if not isinstance(run_id, str):
                notes.append(f"pipeline.json names no {role} run (not started yet?).")
                continue
            try:
                record = read_run(root / Path(run_id).name)  # a name inside the folder, never a path
            except (RunFormatError, OSError) as exc:
                notes.append(f"{role} run {run_id} cannot be read: {exc}")
                continue
            if record.status != "finished":
                notes.append(f"{role} run {run_id} is {record.status}.")
            runs.append(ReportRun(record.id, record.path, role, record.info))
    if not runs:
        pipeline = None
        finished = [s for s in list_runs(root) if s.status == "finished" and s.kind == "train"]
        for summary in reversed(finished):  # list_runs gives newest first
            try:
                record = read_run(summary.path)
            except (RunFormatError, OSError) as exc:
                notes.append(f"run {summary.id} cannot be read: {exc}")
                continue
            runs.append(ReportRun(record.id, record.path, "", record.info))
    if not runs:
        raise ReportError(f"{runs_dir} holds no finished run and no pipeline.json: nothing to report")
    return runs, pipeline, notes


def _comparison_pair(runs: Sequence[RunEvaluations], pipeline: dict | None, evaluation: str):
    """The two final models: the pipeline's two stage-2 runs, else the two newest stage-2 runs that
    hold the evaluation (A = the older, as the pipeline's phase 1 comes first)."""
    if pipeline is not None:
        finals = [r for r in runs if r.run.role in ("phase 1 · stage 2", "phase 2 · stage 2")]
    else:
        finals = [r for r in runs if r.run.stage == 2 and evaluation in r.data][-2:]
    return tuple(finals) if len(finals) == 2 else None


def collect_report(
    runs_dir: str | PathLike,
    *,
    evaluation: str | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> ReportContent:
    """Gather the report of a runs folder; ReportError when it has no run. Missing or damaged
    evaluations are noted in ``notes``, never raised."""
    runs, pipeline, notes = select_runs(runs_dir)
    test_entry = (pipeline or {}).get("test")
    if evaluation is None:
        evaluation = test_entry.get("evaluation", TEST) if isinstance(test_entry, dict) else TEST
    names = list(dict.fromkeys([evaluation, VALIDATION]))
    gathered = []
    for run in runs:
        item = RunEvaluations(run)
        for name in names:
            try:
                item.data[name] = load_evaluation(run.path, name)
            except EvaluationError as exc:
                notes.append(f"{run.name}, {run.id}: {exc}")
        gathered.append(item)
    content = ReportContent(
        runs_dir=Path(runs_dir),
        source="pipeline.json" if pipeline is not None else "finished runs",
        pipeline=pipeline,
        evaluation=evaluation,
        runs=gathered,
        notes=notes,
        generated=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    pair = _comparison_pair(gathered, pipeline, evaluation)
    if pair is None:
        notes.append("No pair of final (stage-2) models to compare.")
    elif not all(evaluation in item.data for item in pair):
        notes.append(f"The final models cannot be compared: both need the evaluation {evaluation!r}.")
    else:
        a, b = pair
        try:
            result = paired_comparison(
                a.data[evaluation].predictions, b.data[evaluation].predictions, n_resamples=n_resamples, seed=seed
            )
        except ComparisonError as exc:
            notes.append(f"The final models cannot be compared: {exc}")
        else:
            content.comparison = {**result, "a": a.run, "b": b.run, "evaluation": evaluation}
    return content


# --------------------------------------------------------------------------------------- tables
def data_label(name: str) -> str:
    """How a data set is named in the report: validation is marked optimistic (it chose the epoch)."""
    return "validation (optimistic)" if name == VALIDATION else f"{name} (held out)"


def _setting_text(key: str, value: Any) -> str:
    """A configuration value as written in the run (not rounded); folders by their last component."""
    if value is None:
        return ""
    if key in PATH_SETTINGS and isinstance(value, str) and value:
        return Path(value).name
    if key == "windows" and isinstance(value, list):
        # Stage 1 records preset names, stage 2 the windows its checkpoint resolved: one text for both.
        try:
            return WindowStack.from_list(value).key()
        except (ValueError, KeyError, TypeError):
            pass  # not a window list the project reads: shown as written
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping


def test_set_table(content: ReportContent) -> pd.DataFrame:
    """The pipeline's test entry as (item, value) rows; empty without a pipeline."""
    entry = _get(content.pipeline, "test")
    if not isinstance(entry, dict):
        return pd.DataFrame(columns=["item", "value"])
    source = {
        "holdout": "patients held out of the training data (patient-disjoint, stratified on any)",
        "test_data": "a separate data set",
    }.get(entry.get("source"), str(entry.get("source")))
    rows = [("source", source), ("patients", entry.get("n_patients")), ("images", entry.get("n_images"))]
    if "fraction" in entry:
        rows += [("fraction of patients held out", entry.get("fraction")), ("seed", entry.get("seed"))]
    rows.append(("saved as evaluation", entry.get("evaluation")))
    return pd.DataFrame(rows, columns=["item", "value"])


def data_table(content: ReportContent) -> pd.DataFrame:
    """Per run, the data section of its run.json (counts only, no identifiers)."""
    rows = []
    for item in content.runs:
        d = item.run.info.get("data") if isinstance(item.run.info.get("data"), dict) else {}
        skipped = d.get("skipped")
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "images": d.get("n_images"),
            "train images": d.get("n_train"),
            "train patients": d.get("n_patients_train"),
            "validation images": d.get("n_val"),
            "validation patients": d.get("n_patients_val"),
            "test images": d.get("n_test"),
            "test patients": d.get("n_patients_test"),
            "unreadable files": len(skipped) if isinstance(skipped, list) else None,
            "data fingerprint": d.get("fingerprint"),
        })
    return pd.DataFrame(rows)


def runs_table(content: ReportContent) -> pd.DataFrame:
    """Per run: what it is and where it stands."""
    names = {item.run.id: item.run.name for item in content.runs}
    rows = []
    for item in content.runs:
        info = item.run.info
        best = info.get("best") if isinstance(info.get("best"), dict) else {}
        calibrated = any(d.calibration is not None for d in item.data.values())
        parent = info.get("parent_run")
        created = info.get("created")
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "backbone": info.get("backbone"),
            "stage": info.get("stage"),
            "status": info.get("status"),
            "started from": names.get(parent, parent),  # the stage-1 run a stage-2 run began from
            "started (UTC)": created.replace("T", " ").rstrip("Z") if isinstance(created, str) else None,
            "duration (s)": info.get("duration_s"),
            "best epoch": best.get("epoch"),
            "epochs": info.get("last_epoch"),
            "calibrated": "yes" if calibrated else "no",
        })
    return pd.DataFrame(rows)


def environment_table(content: ReportContent) -> pd.DataFrame:
    """Per run: the code (git commit, versions) and the machine it ran on."""
    rows = []
    for item in content.runs:
        info = item.run.info
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "git commit": info.get("git_commit"),
            "hemorrhage_core": _get(info, "versions", "hemorrhage_core"),
            "torch": _get(info, "versions", "torch"),
            "torchvision": _get(info, "versions", "torchvision"),
            "python": _get(info, "versions", "python"),
            "device": info.get("device"),
            "processes": info.get("world_size"),
        })
    return pd.DataFrame(rows)


def config_table(content: ReportContent) -> pd.DataFrame:
    """Every configuration setting (rows) of every run (columns, by run name); settings that differ first."""
    configs = {item.run.name: item.run.info.get("config") or {} for item in content.runs}
    keys = sorted({k for c in configs.values() if isinstance(c, dict) for k in c})
    rows = []
    for key in keys:
        values = {name: _setting_text(key, c.get(key)) if isinstance(c, dict) else ""
                  for name, c in configs.items()}
        differs = len(set(values.values())) > 1
        rows.append({"setting": key, "differs": "yes" if differs else "", **values})
    frame = pd.DataFrame(rows, columns=["setting", "differs", *configs])
    return frame.sort_values(["differs", "setting"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _ordered_data(content: ReportContent) -> list[tuple[RunEvaluations, str, EvaluationData]]:
    """(run, data name, data): the held-out evaluation of every run first, then their validation."""
    out = []
    for name in dict.fromkeys([content.evaluation, VALIDATION]):
        out += [(item, name, item.data[name]) for item in content.runs if name in item.data]
    return out


def auc_table(content: ReportContent) -> pd.DataFrame:
    """ROC AUC per label on each data set (held-out evaluation first), with the RSNA weighted log loss."""
    rows = []
    for item, name, data in _ordered_data(content):
        y_true, y_prob = arrays(data.predictions)
        auc = per_label_auc(y_true, y_prob)
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "data": data_label(name),
            "images": data.n_images,
            **{f"AUC {label}": auc[label] for label in LABELS},
            "AUC mean": mean_defined(auc),
            "weighted log loss": weighted_log_loss(y_true, y_prob),
        })
    return pd.DataFrame(rows)


def subtype_table(content: ReportContent) -> pd.DataFrame:
    """Each subtype's AUC among the slices that bleed (``evaluations.subtype_auc_given_any``), per run
    and data set: the types told apart once blood is there, which the plain AUC mixes with blood or not."""
    rows = []
    for item, name, data in _ordered_data(content):
        y_true, y_prob = arrays(data.predictions)
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "data": data_label(name),
            "bleed slices": int(y_true[:, LABELS.index("any")].sum()),
            **{f"AUC {label}": value for label, value in subtype_auc_given_any(y_true, y_prob).items()},
        })
    return pd.DataFrame(rows)


def subtype_pairs_table(content: ReportContent) -> pd.DataFrame:
    """Each subtype output against each other type (``evaluations.subtype_pair_auc``), one row per run,
    data set and output: which type an output takes for its own."""
    rows = []
    for item, name, data in _ordered_data(content):
        pairs = subtype_pair_auc(*arrays(data.predictions))
        for label in SUBTYPES:
            rows.append({
                "run": item.run.name,
                "run id": item.run.id,
                "data": data_label(name),
                "output": label,
                **{f"against {other}": pairs[label].get(other) for other in SUBTYPES},
            })
    return pd.DataFrame(rows)


def along_z_table(content: ReportContent) -> pd.DataFrame:
    """Whether ``any`` rises on each series' bleed slices (``evaluations.along_z``), per run and data
    set: the curve along z a clinician reads, which a pooled slice AUC does not show."""
    rows = []
    for item, name, data in _ordered_data(content):
        out = along_z(data.predictions)
        rows.append({
            "run": item.run.name,
            "run id": item.run.id,
            "data": data_label(name),
            "series with and without blood": out["n_series"],
            "rising": out["rising"],
            "separated": out["separated"],
            "within-series AUC (mean)": out["auc_mean"],
            "gap (mean)": out["gap_mean"],
        })
    return pd.DataFrame(rows)


COMPARISON_COLUMNS = ("level", "label", "positives", "AUC A", "AUC B", "A − B", "95% CI low", "95% CI high",
                      "p (DeLong)", "p (Holm)")


def comparison_table(content: ReportContent) -> pd.DataFrame:
    """The paired comparison's rows, slice level then study level (A minus B)."""
    result = content.comparison
    rows = []
    if result is not None:
        for level, labels in (("slice", result["labels"]), ("study", result["study"]["labels"])):
            for label, row in labels.items():
                rows.append(dict(zip(COMPARISON_COLUMNS, (
                    level, label, row["positives"], row["auc_a"], row["auc_b"], row["diff"],
                    row["ci"][0], row["ci"][1], row["p_value"], row["p_holm"],
                ), strict=True)))
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def calibration_data(item: RunEvaluations, evaluation: str) -> tuple[str, EvaluationData] | None:
    """(name, data) of the data a run's calibration is shown on: the held-out evaluation, else validation."""
    for name in (evaluation, VALIDATION):
        if name in item.data:
            return name, item.data[name]
    return None


def raw_frame(item: RunEvaluations, name: str, data: EvaluationData) -> pd.DataFrame:
    """The model's own probabilities: validation's are on disk as such; a saved evaluation holds the
    calibrated ones, turned back (exact but where a calibrated value rounded to 0 or 1)."""
    return validation_frame(item.run.path) if name == VALIDATION else data.raw()


def calibration_table(content: ReportContent) -> pd.DataFrame:
    """Per run and label on the held-out data (validation where there is none): Brier and ECE of the
    model's own probabilities and, for a calibrated run, of the calibrated ones, with its temperature.
    A saved evaluation's numbers are those evaluate measured (metrics.json)."""
    rows = []
    for item in content.runs:
        found = calibration_data(item, content.evaluation)
        if found is None:
            continue
        name, data = found
        cal = data.calibration
        saved = _get(data.saved, "calibration")
        if not (isinstance(saved, dict) and saved.get("applied") and isinstance(saved.get("before"), dict)):
            y_true, raw = arrays(raw_frame(item, name, data))
            saved = calibration_report(y_true, raw, arrays(data.predictions)[1])
        for label in LABELS:
            rows.append({
                "run": item.run.name,
                "run id": item.run.id,
                "data": data_label(name),
                "label": label,
                "temperature": None if cal is None else cal.temperatures[label],
                "Brier (model)": _get(saved, "before", "brier", label),
                "Brier (calibrated)": None if cal is None else _get(saved, "after", "brier", label),
                "ECE (model)": _get(saved, "before", "ece", label),
                "ECE (calibrated)": None if cal is None else _get(saved, "after", "ece", label),
            })
    return pd.DataFrame(rows)


def thresholds_table(content: ReportContent) -> pd.DataFrame:
    """Operating points chosen on validation (Youden's J) and what they give on the held-out data
    (validation where there is none): sensitivity, specificity, PPV and NPV, slice and study level."""
    rows = []
    for item in content.runs:
        found = calibration_data(item, content.evaluation)
        if found is None:
            continue
        name, data = found
        try:
            result = data.metrics(item.run.stage)
        except EvaluationError:
            continue
        for level, block in (("slice", result), ("study", result.get("study") or {})):
            for label in LABELS:
                rows.append({
                    "run": item.run.name,
                    "run id": item.run.id,
                    "data": data_label(name),
                    "level": level,
                    "label": label,
                    "positives": _get(block, "positives", label),
                    "threshold": _get(block, "threshold", label),
                    "sensitivity": _get(block, "sensitivity", label),
                    "specificity": _get(block, "specificity", label),
                    "PPV": _get(block, "ppv", label),
                    "NPV": _get(block, "npv", label),
                })
    return pd.DataFrame(rows)


# key -> (title, builder, note), in the order the report shows them.
_TABLES = {
    "test_set": ("Held-out test set", test_set_table, ""),
    "data": ("Data of each run", data_table, ""),
    "runs": ("Runs", runs_table, ""),
    "environment": ("Code and machine", environment_table, ""),
    "config": ("Configuration", config_table, "Settings that differ between the runs first."),
    "auc": ("ROC AUC per class", auc_table, "Validation chose each run's best epoch, so its numbers are optimistic."),
    "subtypes": ("Subtypes among the slices that bleed", subtype_table,
                 "Each subtype's AUC on the slices with blood only: how well the outputs tell the types apart."),
    "subtype_pairs": ("Which type each subtype output takes for its own", subtype_pairs_table,
                      "A subtype's output on its own slices against the slices of one other type without it; "
                      "under 0.5 it rates the other type's slices higher."),
    "along_z": ("Along z: does any rise on each series' bleed slices", along_z_table,
                "Over the series holding slices with and without blood: rising, their bleed slices score higher "
                "on average; separated, every bleed slice above every other slice; the gap is the mean over "
                "the bleed slices minus the mean over the others."),
    "comparison": ("Paired comparison of the final models (A minus B)", comparison_table, ""),
    "calibration": ("Calibration", calibration_table, ""),
    "thresholds": ("Operating points", thresholds_table,
                   "Thresholds chosen on validation (Youden's J), applied to the held-out data."),
}
TABLE_TITLES: dict[str, str] = {key: title for key, (title, _, _) in _TABLES.items()}


def report_tables(content: ReportContent) -> list[ReportTable]:
    """The report's tables in the order it shows them (the dashboard offers each as CSV)."""
    return [
        ReportTable(key, title, build(content), note, html_hidden=() if key == "runs" else ("run id",))
        for key, (title, build, note) in _TABLES.items()
    ]
