"""Pure figure builders for evaluations: reliability diagrams and paired AUC comparisons (plotly).

No Shiny and no files, as in ``hemorrhage_core.plots`` (whose style, colours and sizes these share).
Text that may come from files (run names) is HTML-escaped, because plotly renders a subset of HTML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hemorrhage_core.calibration import ECE_BINS, Reliability, reliability
from hemorrhage_core.labels import LABELS
from hemorrhage_core.plots import LABEL_COLORS, RUN_COLORS, STYLE, TEMPLATE, _safe, empty_figure

# Before calibration in grey, after in blue: the same two colours in every label's diagram.
SERIES_COLORS: tuple[str, ...] = ("#7f7f7f", "#0072B2", "#D55E00", "#009E73")
SIGNIFICANT = 0.05  # Holm-adjusted p below this counts as a difference (as comparison.significant)
MARKER_MIN, MARKER_MAX = 5.0, 16.0


# ---------------------------------------------------------------------------------- reliability
def reliability_bins(
    y_true: np.ndarray, probabilities: Mapping[str, np.ndarray], label: str, n_bins: int = ECE_BINS
) -> dict[str, Reliability]:
    """Each series' reliability bins for one label; ``y_true`` and the arrays are (N, 6) in LABELS order."""
    j = LABELS.index(label)
    return {name: reliability(y_true[:, j], prob[:, j], n_bins) for name, prob in probabilities.items()}


def _marker_sizes(count: np.ndarray, largest: int) -> np.ndarray:
    # Area grows with the bin's count, so a bin of 3 slices does not look as sure as one of 300.
    return MARKER_MIN + (MARKER_MAX - MARKER_MIN) * np.sqrt(count / max(largest, 1))


def reliability_figure(
    y_true: np.ndarray,
    probabilities: Mapping[str, np.ndarray],
    *,
    labels: Sequence[str] = LABELS,
    n_bins: int = ECE_BINS,
    columns: int = 3,
    unit: str = "slices",
) -> go.Figure:
    """Reliability diagrams, one per label: observed frequency against mean predicted probability.

    ``probabilities`` maps a series name (e.g. "raw", "calibrated") to (N, 6) probabilities for the
    (N, 6) ``y_true``. Each diagram has ``n_bins`` equal-width bins on [0, 1], marker size by the bin's
    count, the diagonal of perfect calibration, and under it a bar strip of the counts. Its title gives
    the label's positives and each series' ECE (same bins), first to last. Empty bins are left out.
    """
    if not probabilities or len(y_true) == 0:
        return empty_figure("No predictions to draw a reliability diagram of.")
    labels = list(labels)
    rows = -(-len(labels) // columns)
    fig = make_subplots(rows=2 * rows, cols=columns, horizontal_spacing=0.07)
    width = 1.0 / n_bins
    # Each label's block: the diagram, a small gap, its count strip; a larger gap (for titles) between blocks.
    block_gap, inner_gap, title_room = 0.09, 0.02, 0.055
    block = (1.0 - title_room - (rows - 1) * block_gap) / rows
    for k, label in enumerate(labels):
        j = LABELS.index(label)
        r, col = k // columns, k % columns + 1
        row = 2 * r + 1
        top = 1.0 - title_room - r * (block + block_gap)
        strip = 0.22 * block
        diagram = fig.get_subplot(row, col)
        counts = fig.get_subplot(row + 1, col)
        diagram.yaxis.domain = [top - block + strip + inner_gap, top]
        counts.yaxis.domain = [top - block, top - block + strip]
        fig.add_trace(
            go.Scatter(
                x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", legendgroup="diag",
                showlegend=k == 0, line={"color": "#bbb", "dash": "dot", "width": 1}, hoverinfo="skip",
            ),
            row=row,
            col=col,
        )
        bins = reliability_bins(y_true, probabilities, label, n_bins)
        largest = max(int(b.count.max()) for b in bins.values())
        for s, (name, b) in enumerate(bins.items()):
            color = SERIES_COLORS[s % len(SERIES_COLORS)]
            shown = b.count > 0
            centres = (b.bin_lower + b.bin_upper) / 2
            custom = np.stack([b.bin_lower, b.bin_upper, b.count], axis=1)
            fig.add_trace(
                go.Scatter(
                    x=b.mean_predicted[shown],
                    y=b.fraction_positive[shown],
                    mode="lines+markers",
                    name=_safe(name),
                    legendgroup=f"series{s}",
                    showlegend=k == 0,
                    line={"color": color, "width": 1.5, "dash": "dash" if s == 0 and len(bins) > 1 else "solid"},
                    marker={"color": color, "size": _marker_sizes(b.count[shown], largest), "line": {"width": 0}},
                    customdata=custom[shown],
                    hovertemplate=(
                        f"{_safe(name)} · {label}<br>bin %{{customdata[0]:.2f}}–%{{customdata[1]:.2f}}: "
                        f"%{{customdata[2]}} {unit}<br>mean predicted %{{x:.3f}}<br>observed %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=row,
                col=col,
            )
            fig.add_trace(
                go.Bar(
                    x=centres + (s - (len(bins) - 1) / 2) * width / len(bins),
                    y=b.count,
                    width=width / len(bins),
                    name=f"{_safe(name)} count",
                    legendgroup=f"series{s}",
                    showlegend=False,
                    marker={"color": color, "opacity": 0.75},
                    customdata=np.stack([b.bin_lower, b.bin_upper], axis=1),
                    hovertemplate=(
                        f"{_safe(name)} · {label}<br>bin %{{customdata[0]:.2f}}–%{{customdata[1]:.2f}}: "
                        f"%{{y}} {unit}<extra></extra>"
                    ),
                ),
                row=row + 1,
                col=col,
            )
        eces = " → ".join(_num(b.ece) for b in bins.values())
        fig.add_annotation(
            text=f"<b>{label}</b> · {int(y_true[:, j].sum())} positive of {len(y_true)}<br>ECE {eces}",
            x=sum(diagram.xaxis.domain) / 2,
            y=top,
            xref="paper",
            yref="paper",
            xanchor="center",
            yanchor="bottom",
            showarrow=False,
            font={"size": STYLE.font_size - 1},
        )
        fig.update_xaxes(range=[0, 1], showticklabels=False, row=row, col=col)
        fig.update_yaxes(range=[-0.02, 1.02], row=row, col=col, title_text="observed" if col == 1 else None)
        fig.update_xaxes(range=[0, 1], row=row + 1, col=col, title_text="predicted", title_standoff=4)
        fig.update_yaxes(row=row + 1, col=col, title_text=unit if col == 1 else None, rangemode="tozero", nticks=3)
    fig.update_layout(
        template=TEMPLATE,
        height=440 * rows + 80,
        font={"size": STYLE.font_size},
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "h", "x": 0, "y": 1.0, "yref": "container", "yanchor": "top"},
        bargap=0,
    )
    return fig


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -------------------------------------------------------------------------------- paired AUCs
def _difference_colour(row: pd.Series, paired: bool) -> str:
    """A's colour when A is significantly better, B's when B is, grey otherwise.

    Paired rows decide by the Holm-adjusted p (none: not testable, grey, whatever the interval says);
    unpaired rows, which have no p, by the interval excluding zero.
    """
    if pd.isna(row["diff"]):
        return "#999"
    if paired:
        p = row.get("p_holm")
        if p is None or pd.isna(p):
            return "#999"
        better = p < SIGNIFICANT
    else:
        lo, hi = row.get("diff_lo"), row.get("diff_hi")
        if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
            return "#999"
        better = lo > 0 or hi < 0
    if not better:
        return "#777"
    return RUN_COLORS[0] if row["diff"] > 0 else RUN_COLORS[1]


def p_text(value: object) -> str:
    """A p-value as shown: ``< 0.001`` below that, three decimals otherwise, ``n/a`` when undefined."""
    if value is None or pd.isna(value):
        return "n/a"
    return "< 0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def _p_note(row: pd.Series) -> str:
    if row.get("p_value") is None or pd.isna(row.get("p_value")):
        return "not testable"
    return f"p {p_text(row.get('p_value'))} ({p_text(row.get('p_holm'))})"


def comparison_figure(table: pd.DataFrame, name_a: str, name_b: str, *, unit: str = "images") -> go.Figure:
    """Per-class AUC of A and B with 95% intervals (left) and the difference A − B (right).

    ``table`` has one row per label: label, auc_a, lo_a, hi_a, auc_b, lo_b, hi_b, diff, diff_lo,
    diff_hi and, for a paired comparison, p_value (DeLong) and p_holm (NaN when unpaired). A difference
    is coloured by its run when Holm's p < 0.05 (paired) or its interval excludes zero (unpaired), and
    its p-values are written beside it ("not testable" where DeLong's test is undefined).
    """
    if table.empty:
        return empty_figure("Pick two runs to compare.")
    paired = "p_holm" in table and table["p_holm"].notna().any()
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.04,
        subplot_titles=[
            f"ROC AUC with 95% interval (bootstrap by patient, {unit})",
            f"difference {_safe(name_a)} − {_safe(name_b)}" + (" · p DeLong (Holm)" if paired else ""),
        ],
    )
    labels = list(table["label"])
    y = np.arange(len(labels), dtype=float)
    for suffix, name, color, offset in (("a", name_a, RUN_COLORS[0], -0.15), ("b", name_b, RUN_COLORS[1], 0.15)):
        auc = table[f"auc_{suffix}"].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=auc,
                y=y + offset,
                mode="markers",
                name=_safe(name),
                marker={"color": color, "size": 10},
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": table[f"hi_{suffix}"].to_numpy(dtype=float) - auc,
                    "arrayminus": auc - table[f"lo_{suffix}"].to_numpy(dtype=float),
                },
                customdata=labels,
                hovertemplate=f"{_safe(name)}<br>%{{customdata}}: AUC %{{x:.3f}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    diff = table["diff"].to_numpy(dtype=float)
    notes = [_p_note(row) if paired else "" for _, row in table.iterrows()]
    fig.add_trace(
        go.Scatter(
            x=diff,
            y=y,
            mode="markers+text" if paired else "markers",
            text=notes,
            textposition="top center",
            textfont={"size": STYLE.font_size - 2, "color": "#444"},
            cliponaxis=False,
            name="difference",
            showlegend=False,
            marker={
                "color": [_difference_colour(row, paired) for _, row in table.iterrows()],
                "size": 10,
                "symbol": "diamond",
            },
            error_x={
                "type": "data",
                "symmetric": False,
                "array": table["diff_hi"].to_numpy(dtype=float) - diff,
                "arrayminus": diff - table["diff_lo"].to_numpy(dtype=float),
                "color": "#555",
            },
            customdata=np.stack([labels, notes], axis=1),
            hovertemplate="%{customdata[0]}: difference %{x:+.3f}<br>%{customdata[1]}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_vline(x=0, line={"color": "#888", "dash": "dot"}, row=1, col=2)
    fig.update_yaxes(tickvals=list(y), ticktext=labels, autorange="reversed", range=[-0.6, len(labels) - 0.4],
                     row=1, col=1)
    fig.update_xaxes(title_text="ROC AUC", row=1, col=1)
    fig.update_xaxes(title_text="AUC difference (95% interval)", row=1, col=2)
    fig.update_layout(
        template=TEMPLATE,
        height=STYLE.height + 20,
        font={"size": STYLE.font_size},
        margin={"l": 130, "r": 20, "t": 60, "b": 40},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


# ------------------------------------------------------------------------------ operating point
def mark_threshold(fig: go.Figure, value: float, text: str) -> go.Figure:
    """Add a labelled vertical line at ``value`` (the run's own operating point) to a threshold figure."""
    fig.add_vline(
        x=value,
        line={"color": LABEL_COLORS["any"], "dash": "dot", "width": 2},
        annotation_text=_safe(text),
        annotation_position="bottom right",
        annotation_font={"color": LABEL_COLORS["any"]},
    )
    return fig
