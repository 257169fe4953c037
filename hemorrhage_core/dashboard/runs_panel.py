"""Runs panel: every run in the folder, updating by itself while runs train; details of the chosen one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from htmltools import Tag
from shiny import module, reactive, render, ui

from hemorrhage_core.dashboard import tables
from hemorrhage_core.dashboard.common import AppContext, help_text, message
from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.dashboard.tables import format_duration

STATUS_CLASSES = {
    "running": "status-running",
    "finished": "status-finished",
    "failed": "status-failed",
    "interrupted": "status-interrupted",
    "malformed": "status-malformed",
}
LOG_TAIL_LINES = 15


@module.ui
def runs_ui() -> Tag:
    return ui.div(
        ui.output_ui("counts"),
        ui.card(
            ui.card_header("Runs"),
            help_text(
                "All runs in the runs folder, newest first. The table refreshes by itself while runs "
                "train. Click a row for its details, a column header to sort, and type in the boxes "
                "under the headers to filter (a range for numbers). The config.* columns are the "
                "hyper-parameters that differ between the runs listed."
            ),
            ui.output_data_frame("runs_grid"),
            full_screen=True,
        ),
        ui.output_ui("details"),
        class_="panel-stack",
    )


def _status_styles(frame: pd.DataFrame) -> list[dict[str, Any]]:
    if frame.empty:
        return []
    col = list(frame.columns).index("status")
    styles = []
    for status, css in STATUS_CLASSES.items():
        rows = [int(i) for i in frame.index[frame["status"] == status]]
        if rows:
            styles.append({"rows": rows, "cols": [col], "class": css})
    return styles


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key in sorted(value):
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], out)
    elif isinstance(value, list) and len(value) > 8:
        out[prefix] = f"[{len(value)} items]"
    else:
        out[prefix] = value


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _definition_table(items: Mapping[str, Any]) -> Tag:
    rows = [ui.tags.tr(ui.tags.th(str(k)), ui.tags.td("" if v is None else str(v))) for k, v in items.items()]
    return ui.tags.table(ui.tags.tbody(*rows), class_="table table-sm definition-table")


def run_details(info: Mapping[str, Any], log_tail: str) -> Tag:
    """The details card of one run: outcome, data, split, configuration, versions and the log's tail."""
    data = info.get("data") if isinstance(info.get("data"), Mapping) else {}
    split = info.get("split") if isinstance(info.get("split"), Mapping) else {}
    best = info.get("best") if isinstance(info.get("best"), Mapping) else {}
    overview = {
        "run": info.get("id"),
        "kind": info.get("kind"),
        "backbone": info.get("backbone"),
        "stage": info.get("stage"),
        "parent run": info.get("parent_run"),
        "status": info.get("status"),
        "error": info.get("error"),
        "started (UTC)": info.get("created"),
        "finished (UTC)": info.get("finished"),
        "duration": format_duration(
            info.get("duration_s") if isinstance(info.get("duration_s"), int | float) else None
        ),
        "epochs": f"{info.get('last_epoch')} of {info.get('epochs_planned')}",
        "best": f"epoch {best.get('epoch')}: {best.get('metric')} = {_number(best.get('value'))}"
        if best
        else "none yet",
        "device": f"{info.get('device')} × {info.get('world_size')}",
    }
    # Hashed patient lists and the data folder's path are left out: not needed to read a run.
    data_rows = {
        k: data.get(k)
        for k in ("n_images", "n_train", "n_val", "n_patients_train", "n_patients_val", "fingerprint")
    }
    data_rows["skipped images"] = len(data.get("skipped") or [])
    data_rows["split seed"] = split.get("seed")
    data_rows["validation fraction"] = split.get("val_fraction")
    config: dict[str, Any] = {}
    _flatten("", info.get("config") or {}, config)
    versions = dict(info.get("versions") or {})
    versions["git commit"] = info.get("git_commit")
    grid_rows = {}
    if info.get("kind") == "grid":
        grid_rows = {
            "scoring": info.get("scoring"),
            "folds": info.get("folds"),
            "best parameters": info.get("best_params"),
            "best score": info.get("best_score"),
        }
    lines = log_tail.strip().splitlines()[-LOG_TAIL_LINES:]
    return ui.card(
        ui.card_header(f"Run {info.get('id')}"),
        ui.layout_columns(
            ui.div(ui.h6("Outcome"), _definition_table(overview)),
            ui.div(
                ui.h6("Data"),
                _definition_table(data_rows),
                *([ui.h6("Grid search"), _definition_table(grid_rows)] if grid_rows else []),
                ui.h6("Versions"),
                _definition_table(versions),
            ),
            ui.div(ui.h6("Configuration"), ui.div(_definition_table(config), class_="scroll-box")),
            col_widths=(4, 4, 4),
        ),
        ui.h6(f"train.log (last {LOG_TAIL_LINES} lines)"),
        ui.tags.pre("\n".join(lines) if lines else "(no log lines yet)", class_="log-tail"),
    )


def runs_data_grid(frame: pd.DataFrame) -> render.DataGrid:
    """The runs table as the grid the panel shows: one row selectable, every column sortable and
    filterable (text columns by substring, numeric ones by range), statuses coloured."""
    note = list(frame.columns).index("note")
    styles = [
        {"cols": [0], "class": "run-id-cell"},
        {"cols": [note], "class": "note-cell"},
        *_status_styles(frame),
    ]
    return render.DataGrid(
        frame,
        selection_mode="row",
        filters=True,
        styles=styles,
        width="100%",
        height="60vh" if len(frame) > 12 else None,
        summary=False,
    )


@module.server
def runs_server(input, output, session, ctx: AppContext) -> None:
    shown = reactive.value(tables.runs_table((), params=True), name="runs_table")

    # Redraw the grid only when what it shows changed, as a redraw resets the user's sorting, filters
    # and selection: a poll that saw only logs, gallery or predictions change keeps them.
    @reactive.effect(priority=100)
    def _follow_table() -> None:
        frame = tables.runs_table(ctx.snapshot().summaries, params=True)
        with reactive.isolate():
            same = frame.equals(shown.get()) and list(frame.columns) == list(shown.get().columns)
        if not same:
            shown.set(frame)

    def table() -> pd.DataFrame:
        return shown.get()

    @render.ui
    def counts() -> Tag:
        summaries = ctx.snapshot().summaries
        n = {status: sum(s.status == status for s in summaries) for status in STATUS_CLASSES}
        boxes = [
            ui.value_box("Runs", str(len(summaries)), theme="bg-light"),
            ui.value_box("Training now", str(n["running"]), theme="bg-light"),
            ui.value_box("Finished", str(n["finished"]), theme="bg-light"),
            ui.value_box(
                "Failed, interrupted or unreadable",
                str(n["failed"] + n["interrupted"] + n["malformed"]),
                theme="bg-light",
            ),
        ]
        if not summaries:
            return ui.div(
                message(
                    ui.span(
                        "No runs yet in the runs folder. Train one with ",
                        ui.code("python -m training train ..."),
                        " or ",
                        ui.code("python -m training pipeline ..."),
                        "; it appears here as soon as it starts.",
                    )
                ),
            )
        return ui.layout_columns(*boxes, col_widths=(3, 3, 3, 3), class_="count-row")

    @render.data_frame
    def runs_grid():
        return runs_data_grid(table())

    @reactive.calc
    def selected_run() -> str | None:
        rows = runs_grid.cell_selection().get("rows") or ()
        frame = table()
        if not rows or rows[0] >= len(frame):
            return None
        return str(frame.iloc[rows[0]]["run"])

    @render.ui
    def details() -> Tag | None:
        run_id = selected_run()
        if run_id is None:
            return None
        ctx.snapshot()  # refresh while the run writes
        try:
            record = ctx.index.record(run_id)
        except Exception as exc:  # noqa: BLE001 - a damaged run must not break the page
            return message(
                f"Run {run_id} cannot be read: {user_message(exc, context='run details')}", kind="warning"
            )
        return run_details(record.info, record.log_text(max_bytes=20_000))
