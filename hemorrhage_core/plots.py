"""Pure figure builders for the dashboard: plotly figures, PNG images and plain-language text.

Nothing here imports Shiny or reads files: each function takes tables or arrays and returns a
``plotly.graph_objects.Figure``, an image array, a ``data:`` URI or text, so all of it is tested
without a browser. Names that come from files (run ids) are HTML-escaped before plotly sees them,
because plotly renders legend and hover text as a subset of HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hemorrhage_core import metrics
from hemorrhage_core.labels import LABELS
from hemorrhage_core.windowing import Window

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
LABEL_COLORS: Mapping[str, str] = {
    "epidural": "#E69F00",
    "intraparenchymal": "#56B4E9",
    "intraventricular": "#009E73",
    "subarachnoid": "#CC79A7",
    "subdural": "#0072B2",
    "any": "#D55E00",
}
RUN_COLORS: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
RUN_DASHES: tuple[str, ...] = ("solid", "dash", "dot", "dashdot")
TEMPLATE = "plotly_white"


@dataclass(frozen=True)
class FigureStyle:
    """Sizes shared by the figures, so the dashboard looks the same from panel to panel."""

    height: int = 420
    small_height: int = 300
    font_size: int = 13
    margin: int = 40
    best_marker_size: int = 12


STYLE = FigureStyle()


def _safe(text: object) -> str:
    return html.escape(str(text), quote=True)


def _base_layout(fig: go.Figure, *, height: int | None = None, title: str | None = None) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        height=height or STYLE.height,
        font={"size": STYLE.font_size},
        margin={
            "l": STYLE.margin + 20,
            "r": STYLE.margin // 2,
            "t": STYLE.margin + (20 if title else 0),
            "b": STYLE.margin,
        },
        legend={"orientation": "v", "font": {"size": STYLE.font_size - 1}},
        title={"text": _safe(title)} if title else None,
    )
    return fig


def empty_figure(message: str, *, height: int | None = None) -> go.Figure:
    """A blank figure that says why it is blank (no runs selected, no predictions yet, ...)."""
    fig = go.Figure()
    fig.add_annotation(
        text=_safe(message),
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        showarrow=False,
        font={"size": STYLE.font_size + 2, "color": "#666"},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base_layout(fig, height=height or STYLE.small_height)


# ---------------------------------------------------------------- training curves (metrics.csv)

# (subplot title, [(column, trace suffix, dash)]): which metrics.csv columns each panel overlays.
TRAINING_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("Loss", (("train_loss", "train", "solid"), ("val_loss", "val", "dash"))),
    ("Accuracy (validation)", (("val_accuracy", "val", "solid"),)),
    (
        "Weighted log loss (validation)",
        (("val_weighted_log_loss", "slice", "solid"), ("val_zs_weighted_log_loss", "z-smoothed", "dot")),
    ),
    ("Mean ROC AUC (validation)", (("val_auc_mean", "mean", "solid"), ("val_auc_any", "any", "dot"))),
)


def _best_row(history: pd.DataFrame, best_epoch: int | None) -> pd.Series | None:
    if best_epoch is None or "epoch" not in history:
        return None
    rows = history[history["epoch"] == best_epoch]
    return None if rows.empty else rows.iloc[-1]


def training_curves(
    histories: Mapping[str, pd.DataFrame], best_epochs: Mapping[str, int | None] | None = None
) -> go.Figure:
    """Loss, accuracy, weighted log loss and mean AUC against epoch, one colour per run, best epoch starred.

    ``histories`` maps a display name to that run's metrics.csv table; missing columns are skipped.
    """
    if not histories:
        return empty_figure("Select one or more runs to see their training curves.")
    best_epochs = best_epochs or {}
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=[p[0] for p in TRAINING_PANELS],
        horizontal_spacing=0.08,
        vertical_spacing=0.16,
    )
    for run_index, (name, history) in enumerate(histories.items()):
        color = RUN_COLORS[run_index % len(RUN_COLORS)]
        best = _best_row(history, best_epochs.get(name))
        for panel_index, (_, series) in enumerate(TRAINING_PANELS):
            row, col = divmod(panel_index, 2)
            for column, suffix, dash in series:
                if column not in history or history[column].isna().all():
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=history["epoch"],
                        y=history[column],
                        mode="lines+markers",
                        name=f"{_safe(name)} · {suffix}",
                        legendgroup=_safe(name),
                        showlegend=panel_index == 0
                        or (panel_index > 0 and column == "val_zs_weighted_log_loss"),
                        line={"color": color, "dash": dash},
                        marker={"size": 5},
                        hovertemplate=f"{_safe(name)}<br>{column}: %{{y:.4f}}<br>epoch %{{x}}<extra></extra>",
                    ),
                    row=row + 1,
                    col=col + 1,
                )
                if best is not None and dash != "dot" and suffix != "train" and pd.notna(best.get(column)):
                    fig.add_trace(
                        go.Scatter(
                            x=[best["epoch"]],
                            y=[best[column]],
                            mode="markers",
                            legendgroup=_safe(name),
                            name=f"{_safe(name)} · best epoch",
                            showlegend=False,
                            marker={
                                "symbol": "star",
                                "size": STYLE.best_marker_size,
                                "color": color,
                                "line": {"color": "black", "width": 1},
                            },
                            hovertemplate=f"best epoch %{{x}}<br>{column}: %{{y:.4f}}<extra></extra>",
                        ),
                        row=row + 1,
                        col=col + 1,
                    )
    fig.update_xaxes(dtick=1 if _max_epoch(histories) <= 20 else None)
    fig.update_xaxes(title_text="epoch", row=2)
    _base_layout(fig, height=580)
    fig.update_layout(legend={"orientation": "h", "y": -0.12})
    return fig


def _max_epoch(histories: Mapping[str, pd.DataFrame]) -> int:
    epochs = [int(h["epoch"].max()) for h in histories.values() if "epoch" in h and len(h)]
    return max(epochs, default=0)


def per_class_auc_curves(
    histories: Mapping[str, pd.DataFrame],
    best_epochs: Mapping[str, int | None] | None = None,
    labels: Sequence[str] = LABELS,
) -> go.Figure:
    """Validation ROC AUC of each label against epoch (one subplot per label), runs overlaid."""
    if not histories:
        return empty_figure("Select one or more runs to see per-class AUC.")
    best_epochs = best_epochs or {}
    cols = 3
    rows = math.ceil(len(labels) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=list(labels),
        shared_yaxes=True,
        horizontal_spacing=0.05,
        vertical_spacing=0.16,
    )
    for run_index, (name, history) in enumerate(histories.items()):
        color = RUN_COLORS[run_index % len(RUN_COLORS)]
        best = _best_row(history, best_epochs.get(name))
        for i, label in enumerate(labels):
            column = f"val_auc_{label}"
            if column not in history:
                continue
            row, col = divmod(i, cols)
            fig.add_trace(
                go.Scatter(
                    x=history["epoch"],
                    y=history[column],
                    mode="lines+markers",
                    name=_safe(name),
                    legendgroup=_safe(name),
                    showlegend=i == 0,
                    line={"color": color},
                    marker={"size": 5},
                    hovertemplate=f"{_safe(name)}<br>AUC {label}: %{{y:.3f}}<br>epoch %{{x}}<extra></extra>",
                ),
                row=row + 1,
                col=col + 1,
            )
            if best is not None and pd.notna(best.get(column)):
                fig.add_trace(
                    go.Scatter(
                        x=[best["epoch"]],
                        y=[best[column]],
                        mode="markers",
                        showlegend=False,
                        legendgroup=_safe(name),
                        name=f"{_safe(name)} · best epoch",
                        marker={
                            "symbol": "star",
                            "size": STYLE.best_marker_size,
                            "color": color,
                            "line": {"color": "black", "width": 1},
                        },
                        hovertemplate="best epoch %{x}<br>AUC %{y:.3f}<extra></extra>",
                    ),
                    row=row + 1,
                    col=col + 1,
                )
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(dtick=1 if _max_epoch(histories) <= 20 else None)
    fig.update_xaxes(title_text="epoch", row=rows)
    _base_layout(fig, height=540)
    fig.update_layout(legend={"orientation": "h", "y": -0.14})
    return fig


# ---------------------------------------------------------------- ROC / PR (predictions.csv)


def _label_arrays(predictions: pd.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray] | None:
    truth, prob = f"true_{label}", f"prob_{label}"
    if truth not in predictions or prob not in predictions:
        return None
    frame = predictions[[truth, prob]].dropna()
    return frame[truth].to_numpy(dtype=int), frame[prob].to_numpy(dtype=float)


def _has_both_classes(y_true: np.ndarray) -> bool:
    return bool(y_true.size) and 0 < int(y_true.sum()) < y_true.size


def roc_figure(
    predictions: Mapping[str, pd.DataFrame],
    labels: Sequence[str] = LABELS,
    *,
    kind: str = "roc",
    legend: str = "right",
) -> go.Figure:
    """Per-class ROC (``kind="roc"``) or precision-recall (``kind="pr"``) curves with AUC / AP in the legend.

    One colour per label and one dash style per run, so two runs overlay legibly. A label without both
    classes in a run's validation set is listed as "n/a" rather than drawn. ``legend`` is "right" (wide
    cards) or "below" (narrow, side-by-side cards).
    """
    if kind not in ("roc", "pr"):
        raise ValueError(f"kind must be 'roc' or 'pr', got {kind!r}")
    if legend not in ("right", "below"):
        raise ValueError(f"legend must be 'right' or 'below', got {legend!r}")
    if not predictions:
        return empty_figure("Select a run with validation predictions.")
    fig = go.Figure()
    if kind == "roc":
        fig.add_trace(
            go.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                name="chance",
                line={"color": "#aaa", "dash": "dot", "width": 1},
                hoverinfo="skip",
            )
        )
    for run_index, (name, frame) in enumerate(predictions.items()):
        dash = RUN_DASHES[run_index % len(RUN_DASHES)]
        group = {"legendgroup": f"run{run_index}"}
        if len(predictions) > 1:
            group["legendgrouptitle_text"] = f"{_safe(name)} ({dash} lines)"
        for label in labels:
            arrays = _label_arrays(frame, label)
            if arrays is None:
                continue
            y_true, y_prob = arrays
            if not _has_both_classes(y_true):
                fig.add_trace(
                    go.Scatter(
                        x=[None],
                        y=[None],
                        mode="lines",
                        name=f"{label} (n/a)",
                        **group,
                        line={"color": LABEL_COLORS.get(label, "#333"), "dash": dash},
                    )
                )
                continue
            if kind == "roc":
                roc = metrics.roc_curve(y_true, y_prob)
                x, y, legend = roc.fpr, roc.tpr, f"{label} (AUC {roc.auc:.3f})"
            else:
                pr = metrics.pr_curve(y_true, y_prob)
                x, y, legend = pr.recall, pr.precision, f"{label} (AP {pr.average_precision:.3f})"
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    name=legend,
                    **group,
                    # PR curves are step functions (as sklearn draws them): no interpolation between points.
                    line={
                        "color": LABEL_COLORS.get(label, "#333"),
                        "dash": dash,
                        "width": 2,
                        "shape": "hv" if kind == "pr" else "linear",
                    },
                    hovertemplate=f"{_safe(name)}<br>{label}<br>%{{x:.3f}}, %{{y:.3f}}<extra></extra>",
                )
            )
    if kind == "roc":
        fig.update_xaxes(title_text="false positive rate (1 - specificity)", range=[0, 1])
        fig.update_yaxes(title_text="true positive rate (sensitivity)", range=[0, 1.02])
    else:
        fig.update_xaxes(title_text="recall (sensitivity)", range=[0, 1])
        fig.update_yaxes(title_text="precision (PPV)", range=[0, 1.02])
    if legend == "right":
        _base_layout(fig, height=STYLE.height + 40)
        fig.update_layout(
            legend={"x": 1.02, "y": 1, "xanchor": "left", "tracegroupgap": 8, "groupclick": "toggleitem"}
        )
    else:
        _base_layout(fig, height=STYLE.height + 120)
        fig.update_layout(legend={"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"})
    return fig


# ---------------------------------------------------------------- thresholds


def confusion_figure(tn: int, fp: int, fn: int, tp: int, *, label: str = "") -> go.Figure:
    """A 2x2 confusion matrix, rows = truth, columns = prediction, counts written in the cells."""
    z = [[tn, fp], [fn, tp]]
    text = [[f"TN<br>{tn}", f"FP<br>{fp}"], [f"FN<br>{fn}", f"TP<br>{tp}"]]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=["predicted negative", "predicted positive"],
            y=["truly negative", "truly positive"],
            text=text,
            texttemplate="%{text}",
            textfont={"size": STYLE.font_size + 4},
            colorscale="Blues",
            showscale=False,
            hovertemplate="%{y}, %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _base_layout(fig, height=STYLE.small_height, title=f"{label}" if label else None)


def threshold_sweep(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV of ``prob >= t`` for every t (NaN where undefined).

    Vectorised by sorting once, so a sweep over a large validation set stays cheap; it agrees with
    ``metrics.threshold_metrics`` at every threshold.
    """
    truth = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(y_prob, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    order = np.sort(prob)
    positives = np.sort(prob[truth == 1])
    # Counts of predictions >= t among all and among truly positive slices.
    predicted_pos = len(order) - np.searchsorted(order, t, side="left")
    tp = len(positives) - np.searchsorted(positives, t, side="left")
    fp = predicted_pos - tp
    n_pos, n_neg = len(positives), len(order) - len(positives)
    fn, tn = n_pos - tp, n_neg - fp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def threshold_sweep_figure(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float, *, label: str = ""
) -> go.Figure:
    """Sensitivity, specificity, PPV and NPV against the decision threshold, the chosen one marked."""
    grid = np.linspace(0.0, 1.0, 201)
    sweep = threshold_sweep(y_true, y_prob, grid)
    fig = go.Figure()
    for key, name, color in (
        ("sensitivity", "sensitivity", "#D55E00"),
        ("specificity", "specificity", "#0072B2"),
        ("ppv", "PPV", "#009E73"),
        ("npv", "NPV", "#CC79A7"),
    ):
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=sweep[key],
                mode="lines",
                name=name,
                line={"color": color},
                hovertemplate=f"{name} %{{y:.3f}} at %{{x:.3f}}<extra></extra>",
            )
        )
    fig.add_vline(
        x=threshold,
        line={"color": "#333", "dash": "dash"},
        annotation_text=f"threshold {threshold:.2f}",
        annotation_position="top",
    )
    fig.update_xaxes(title_text=f"threshold on P({_safe(label)})" if label else "threshold", range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _base_layout(fig, height=STYLE.small_height + 40)


# ---------------------------------------------------------------- compare two runs


def comparison_summary(table: pd.DataFrame, name_a: str, name_b: str) -> list[str]:
    """One plain-language sentence per label saying which run is better there, if either clearly is.

    "Clearly" means the 95% bootstrap interval of the AUC difference excludes zero.
    """
    sentences: list[str] = []
    wins_a, wins_b = [], []
    for row in table.itertuples(index=False):
        if pd.isna(row.auc_a) or pd.isna(row.auc_b):
            sentences.append(f"{row.label}: cannot compare (a run has no positive or no negative cases).")
            continue
        numbers = (
            f"AUC {row.auc_a:.3f} vs {row.auc_b:.3f}, difference {row.diff:+.3f}, "
            f"95% interval {row.diff_lo:+.3f} to {row.diff_hi:+.3f}"
        )
        if row.diff_lo > 0:
            wins_a.append(row.label)
            sentences.append(f"{row.label}: {name_a} is better ({numbers}).")
        elif row.diff_hi < 0:
            wins_b.append(row.label)
            sentences.append(f"{row.label}: {name_b} is better ({numbers}).")
        else:
            sentences.append(f"{row.label}: no clear difference ({numbers}).")
    if not wins_a and not wins_b:
        headline = "Neither run is clearly better on any label; the intervals all include zero."
    else:
        parts = []
        if wins_a:
            parts.append(f"{name_a} is clearly better on {', '.join(wins_a)}")
        if wins_b:
            parts.append(f"{name_b} is clearly better on {', '.join(wins_b)}")
        headline = "; ".join(parts) + "."
    return [headline, *sentences]


# ---------------------------------------------------------------- grid search


def params_label(value: object) -> str:
    """A parameter set (a dict, or its JSON text as grid_results.csv holds it) as ``key=value, ...``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def grid_scores_figure(results: pd.DataFrame, *, scoring: str = "score") -> go.Figure:
    """Mean cross-validated score (± std) for each parameter combination of sklearn's ``cv_results_``
    (as grid_results.csv holds it), the best one highlighted."""
    if results.empty or "mean_test_score" not in results:
        return empty_figure("This grid run has no results yet.")
    frame = results.reset_index(drop=True)
    names = [params_label(p) for p in frame["params"]] if "params" in frame else [str(i) for i in frame.index]
    best = (
        int(frame["rank_test_score"].idxmin())
        if "rank_test_score" in frame
        else int(frame["mean_test_score"].idxmax())
    )
    colors = [RUN_COLORS[1] if i == best else RUN_COLORS[0] for i in range(len(frame))]
    fig = go.Figure(
        go.Bar(
            x=[_safe(n) for n in names],
            y=frame["mean_test_score"],
            error_y={"type": "data", "array": frame.get("std_test_score", pd.Series([0] * len(frame)))},
            marker_color=colors,
            hovertemplate="%{x}<br>mean score %{y:.4f}<extra></extra>",
        )
    )
    fig.update_yaxes(title_text=f"mean {_safe(scoring)} over folds")
    fig.update_xaxes(tickangle=-20)
    return _base_layout(fig, height=STYLE.small_height + 60)


# Parameters with at most this many distinct values get one labelled tick per value.
PARCOORDS_MAX_TICKS = 12
# A numeric parameter whose positive values span this ratio or more is drawn on a log10 axis.
PARCOORDS_LOG_RATIO = 100.0
# The tick text of a combination that left a parameter unset (an empty grid_results.csv cell).
PARAM_UNSET = "(unset)"


def _unset(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param_text(value: object) -> str:
    if _unset(value):
        return PARAM_UNSET
    if _is_number(value):
        return f"{value:g}"
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def grid_param_frame(results: pd.DataFrame) -> pd.DataFrame:
    """The parameters of each grid combination: the ``param_<name>`` columns renamed to ``<name>``,
    or, when there are none, the ``params`` JSON text parsed into columns."""
    columns = [c for c in results.columns if str(c).startswith("param_")]
    if columns:
        return results[columns].rename(columns=lambda c: str(c)[len("param_") :])
    if "params" not in results:
        return pd.DataFrame(index=results.index)
    rows = []
    for value in results["params"]:
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        rows.append(dict(parsed) if isinstance(parsed, Mapping) else {})
    return pd.DataFrame(rows, index=results.index)


def _parcoords_dimension(name: str, values: Sequence[object]) -> dict:
    """One parallel-coordinates axis: numbers as numbers (log10 when they span decades), anything
    else (text, lists, unset cells) as integer codes named by tickvals/ticktext."""
    if values and all(_is_number(v) and math.isfinite(v) for v in values):
        numbers = np.asarray(values, dtype=float)
        log = bool(numbers.min() > 0 and numbers.max() / numbers.min() >= PARCOORDS_LOG_RATIO)
        plotted = np.log10(numbers) if log else numbers
        dimension: dict = {"label": _safe(name + (" (log scale)" if log else "")), "values": plotted}
        distinct = sorted(set(numbers.tolist()))
        if len(distinct) <= PARCOORDS_MAX_TICKS:
            dimension["tickvals"] = [math.log10(d) if log else d for d in distinct]
            dimension["ticktext"] = [f"{d:g}" for d in distinct]
        low, high = float(plotted.min()), float(plotted.max())
        if low == high:  # a constant parameter: centre its one value on the axis
            pad = abs(low) / 2 or 1.0
            dimension["range"] = [low - pad, high + pad]
        return dimension
    texts = [_param_text(v) for v in values]
    first: dict[str, object] = {}
    for value, text in zip(values, texts, strict=True):
        first.setdefault(text, value)

    def order(text: str) -> tuple[int, float, str]:
        # Unset first, then numbers in numeric order, then everything else alphabetically.
        if text == PARAM_UNSET:
            return (0, 0.0, "")
        value = first[text]
        return (1, float(value), "") if _is_number(value) else (2, 0.0, text)

    categories = sorted(first, key=order)
    code = {text: i for i, text in enumerate(categories)}
    return {
        "label": _safe(name),
        "values": [code[t] for t in texts],
        "tickvals": list(range(len(categories))),
        "ticktext": [_safe(t) for t in categories],
        "range": [-0.5, len(categories) - 0.5],
    }


def grid_parallel_figure(results: pd.DataFrame, *, scoring: str = "score") -> go.Figure:
    """Parallel coordinates of a grid search (sklearn ``cv_results_`` as grid_results.csv holds it):
    one axis per parameter in column order, then ``mean_test_score``; each line is one combination,
    coloured by that score, drawn worst first. Combinations without a finite score (failed fits)
    are left out."""
    if results is None or results.empty or "mean_test_score" not in results:
        return empty_figure("This grid run has no results yet.")
    scores = pd.to_numeric(results["mean_test_score"], errors="coerce")
    kept = results[np.isfinite(scores.to_numpy(dtype=float))]
    if kept.empty:
        return empty_figure("No parameter combination of this grid run has a score.")
    # Plotly draws lines in row order: best last, so the best combinations are on top.
    kept = kept.iloc[np.argsort(scores[kept.index].to_numpy(dtype=float), kind="stable")]
    params = grid_param_frame(kept)
    if params.shape[1] == 0:
        return empty_figure("The grid results do not name their parameters.")
    score_label = f"mean {scoring} (CV)"
    dimensions = [
        _parcoords_dimension(str(name), [None if _unset(v) else v for v in params[name].tolist()])
        for name in params.columns
    ]
    score_values = scores[kept.index].to_numpy(dtype=float)
    dimensions.append({"label": _safe(score_label), "values": score_values, "tickformat": ".3f"})
    fig = go.Figure(
        go.Parcoords(
            dimensions=dimensions,
            line={
                "color": score_values,
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": _safe(score_label), "side": "right"}},
            },
        )
    )
    dropped = len(results) - len(kept)
    title = f"Parameters against cross-validated {scoring}" + (
        f" ({dropped} failed combination{'s' if dropped != 1 else ''} not shown)" if dropped else ""
    )
    _base_layout(fig, height=STYLE.height, title=title)
    # Parcoords writes its axis names above the axes and tick labels beside the outer ones.
    fig.update_layout(margin={"l": 80, "r": 40, "t": 110, "b": 30})
    return fig


# ---------------------------------------------------------------- prediction


def probability_bars(probabilities: Mapping[str, float], labels: Sequence[str] = LABELS) -> go.Figure:
    """The six probabilities as horizontal bars, in label order, with the value written on each bar."""
    values = [float(probabilities.get(label, float("nan"))) for label in labels]
    fig = go.Figure(
        go.Bar(
            x=values,
            y=list(labels),
            orientation="h",
            marker_color=[LABEL_COLORS.get(lb, "#333") for lb in labels],
            text=[f"{v:.3f}" for v in values],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(range=[0, 1.1], title_text="probability")
    fig.update_yaxes(autorange="reversed")
    return _base_layout(fig, height=STYLE.small_height)


def z_profile_figure(
    z: Sequence[float],
    probabilities: Sequence[Mapping[str, float]],
    labels: Sequence[str] = LABELS,
    *,
    selected: int | None = None,
) -> go.Figure:
    """Probabilities of each label along z for the slices of one series (sorted by z by the caller)."""
    if not probabilities:
        return empty_figure("Upload several slices of one series to see probabilities along z.")
    fig = go.Figure()
    for label in labels:
        fig.add_trace(
            go.Scatter(
                x=list(z),
                y=[float(p.get(label, float("nan"))) for p in probabilities],
                mode="lines+markers",
                name=label,
                line={"color": LABEL_COLORS.get(label, "#333"), "width": 3 if label == "any" else 2},
            )
        )
    if selected is not None and 0 <= selected < len(z):
        fig.add_vline(x=z[selected], line={"color": "#333", "dash": "dot"})
    fig.update_xaxes(title_text="slice position z (mm)")
    fig.update_yaxes(title_text="probability", range=[0, 1.02])
    return _base_layout(fig, height=STYLE.small_height)


# ---------------------------------------------------------------- images


def window_hu(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU slice (H, W) -> uint8 greyscale for display under one centre/width window."""
    return np.rint(Window("display", float(center), float(width)).apply(hu) * 255.0).astype(np.uint8)


def chw_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) with 1 or 3 channels -> (H, W, 3) for display; other layouts are refused."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, H, W) image with 1 or 3 channels, got shape {image.shape}")
    hwc = np.transpose(image, (1, 2, 0))
    return np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else np.ascontiguousarray(hwc)


def heatmap_overlay(
    base: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, colormap: str = "turbo"
) -> np.ndarray:
    """Blend a [0, 1] saliency map over a greyscale (H, W) or RGB (H, W, 3) uint8 image -> RGB uint8.

    The heatmap is resized to the image when their sizes differ.
    """
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(base[..., None], 3, axis=2) if base.ndim == 2 else base
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if heat.shape != rgb.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colored = colormaps[colormap](heat)[..., :3] * 255.0
    # Weight the colour by the heat itself, so cold regions keep the anatomy visible.
    weight = (alpha * heat)[..., None]
    out = rgb.astype(np.float32) * (1.0 - weight) + colored * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: np.ndarray | bytes) -> str:
    """An image (array, or PNG bytes already encoded) as a ``data:image/png;base64`` URI for <img src>."""
    data = image if isinstance(image, bytes | bytearray) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
