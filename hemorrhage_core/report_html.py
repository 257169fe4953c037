"""The report of a runs folder (``hemorrhage_core.report``) as one self-contained HTML file.

Figures are inline SVG ``data:`` URIs (``hemorrhage_core.report_figures``), styles inline, no script,
and a Content-Security-Policy that forbids any load: the file opens offline, prints, and shows the same
thing anywhere. Numeric table cells carry their exact value in ``data-value``; rows on validation data
are marked ``optimistic``. The research-use disclaimer opens and closes the page.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

from hemorrhage_core.comparison import summary_sentences
from hemorrhage_core.dashboard.config import DISCLAIMER
from hemorrhage_core.evaluations import VALIDATION
from hemorrhage_core.report import (
    ReportContent,
    ReportTable,
    calibration_data,
    collect_report,
    data_label,
    raw_frame,
    report_tables,
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1c2733;
       margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; line-height: 1.45; }
header { border-bottom: 3px solid #1f3b57; margin-bottom: 12px; }
h1 { font-size: 1.7rem; margin: 24px 0 4px; color: #1f3b57; }
h2 { font-size: 1.3rem; margin-top: 36px; border-bottom: 1px solid #d5dde5; padding-bottom: 4px; color: #1f3b57; }
h3 { font-size: 1.05rem; margin: 22px 0 6px; }
.meta { color: #5b6b7b; font-size: 0.9rem; margin: 0 0 12px; }
.disclaimer { background: #fff4e5; border: 1px solid #f0b35b; border-radius: 6px; padding: 10px 14px;
              margin: 14px 0; font-weight: 600; }
nav ol { columns: 2; font-size: 0.93rem; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 6px 0 4px; }
th, td { border-bottom: 1px solid #e1e6eb; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id { white-space: nowrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.78rem; }
tr.optimistic td { color: #6b7785; font-style: italic; }
.scroll { overflow-x: auto; }
.note { color: #5b6b7b; font-size: 0.87rem; margin: 2px 0 10px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
.figures.single { grid-template-columns: minmax(0, 920px); }
figure { margin: 8px 0; }
figure img { width: 100%; border: 1px solid #e1e6eb; border-radius: 4px; background: #fff; }
figcaption { font-size: 0.85rem; color: #5b6b7b; }
.summary li { margin: 2px 0; }
details summary { cursor: pointer; color: #1f3b57; }
.notes li { color: #8a4b00; }
@media print { nav { display: none; } h2 { break-before: auto; } figure { break-inside: avoid; } }
"""
_METHOD_HEADINGS = (("ci", "95% CI"), ("p_value", "p (DeLong)"), ("p_holm", "p (Holm)"), ("study", "study level"))
_ID_COLUMNS = frozenset({"run id", "git commit", "started (UTC)"})  # never broken across lines
# Nothing may load from anywhere: images are data: URIs and the styles are inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def format_cell(column: str, value: Any) -> str:
    """A table cell's text: 3 decimals, p-values 4 (``<0.0001`` below), '–' for missing."""
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return str(int(value))
    if isinstance(value, float) or hasattr(value, "dtype"):
        v = float(value)
        if column.startswith("p ("):
            return "<0.0001" if v < 1e-4 else f"{v:.4f}"
        if column == "duration (s)":
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(value)


def table_html(table: ReportTable, *, css_class: str = "") -> str:
    """A report table as HTML: numeric cells right-aligned with their exact value in ``data-value``,
    rows on validation data marked ``optimistic``."""
    frame = table.frame
    columns = [c for c in frame.columns if c not in table.html_hidden]
    numeric_columns = {c for c in columns if any(_is_number(v) and v == v for v in frame[c])}
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for column in columns:
            value, text = row[column], _e(format_cell(column, row[column]))
            if _is_number(value) and value == value:  # NaN != NaN: a missing number
                cells.append(f'<td class="num" data-value="{_e(repr(float(value)))}">{text}</td>')
            elif column in numeric_columns and _missing(value):  # stays in its right-aligned column
                cells.append(f'<td class="num">{text}</td>')
            elif column in _ID_COLUMNS:
                cells.append(f'<td class="id">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
        optimistic = str(row.get("data", "")).startswith(VALIDATION)
        body.append(('<tr class="optimistic">' if optimistic else "<tr>") + "".join(cells) + "</tr>")
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    css = f' class="{_e(css_class)}"' if css_class else ""
    return (f'<div class="scroll"><table id="table-{_e(table.key)}"{css}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>{note}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _figure(uri: str, caption: str, alt: str) -> str:
    return (f'<figure><img class="report-figure" src="{uri}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _by_key(tables: Iterable[ReportTable]) -> dict[str, ReportTable]:
    return {t.key: t for t in tables}


def _data_section(content: ReportContent, tables: Mapping[str, ReportTable]) -> str:
    parts = ['<h2 id="data">Data</h2>']
    if len(tables["test_set"].frame):
        parts += ["<h3>Held-out test set</h3>",
                  table_html(tables["test_set"]),
                  '<p class="note">No run trained, validated or chose its epoch on these patients.</p>']
    else:
        parts.append(f'<p class="note">No pipeline.json: the held-out data are each run\'s saved evaluation '
                     f'{_e(content.evaluation)} where it has one.</p>')
    parts += ["<h3>Data of each run</h3>", table_html(tables["data"]),
              '<p class="note">Counts from each run.json; patients are counted, never named '
              "(identifiers are one-way hashes in the runs and appear nowhere in this report).</p>"]
    return "".join(parts)


def _runs_section(tables: Mapping[str, ReportTable]) -> str:
    config = tables["config"]
    differing = ReportTable(config.key + "-differs", "", config.frame[config.frame["differs"] == "yes"]
                            .drop(columns="differs").reset_index(drop=True))
    parts = ['<h2 id="runs">Runs and configurations</h2>', table_html(tables["runs"]),
             "<h3>Code and machine</h3>", table_html(tables["environment"]),
             "<h3>Settings that differ between the runs</h3>",
             table_html(differing) if len(differing.frame) else '<p class="note">None: the runs share every setting.</p>',
             "<details><summary>All settings</summary>", table_html(config), "</details>"]
    return "".join(parts)


def _roc_section(content: ReportContent, tables: Mapping[str, ReportTable]) -> str:
    from hemorrhage_core.report_figures import roc_svg

    parts = ['<h2 id="roc">Discrimination: ROC per class</h2>', table_html(tables["auc"]),
             f"<h3>{_e(tables['subtypes'].title)}</h3>", table_html(tables["subtypes"]),
             f"<h3>{_e(tables['subtype_pairs'].title)}</h3>", table_html(tables["subtype_pairs"]),
             f"<h3>{_e(tables['along_z'].title)}</h3>", table_html(tables["along_z"])]
    for name in dict.fromkeys([content.evaluation, VALIDATION]):
        shown = [(item, item.data[name]) for item in content.runs if name in item.data]
        if not shown:
            continue
        heading = (f"Held-out data: evaluation '{name}'" if name != VALIDATION
                   else "Validation (optimistic: the split that chose each run's best epoch)")
        parts.append(f"<h3>{_e(heading)}</h3><div class=\"figures\">")
        for item, data in shown:
            title = f"{item.run.name}, {data_label(name)}"
            size = f"{data.n_images} images, {data.n_patients} patients, {data.n_studies} series"
            parts.append(_figure(roc_svg(data.predictions, title), f"{item.run.id} · {size}",
                                 f"ROC curves of {item.run.name} on {name}"))
        parts.append("</div>")
    return "".join(parts)


def _comparison_section(content: ReportContent, tables: Mapping[str, ReportTable]) -> str:
    from hemorrhage_core.report_figures import difference_svg

    parts = ['<h2 id="comparison">Paired comparison of the final models</h2>']
    result = content.comparison
    if result is None:
        return "".join(parts + ['<p class="note">Not available (see the notes at the end).</p>'])
    a, b = result["a"], result["b"]
    parts.append(f"<p>A = {_e(a.name)} <code>{_e(a.id)}</code>, B = {_e(b.name)} <code>{_e(b.id)}</code>, "
                 f"on the images both were evaluated on in '{_e(result['evaluation'])}': "
                 f"{result['n_images']} images, {result['n_patients']} patients, {result['n_studies']} series.</p>")
    parts.append(table_html(tables["comparison"]))
    method = result.get("method", {})
    parts.append('<p class="note">' + "; ".join(
        f"{_e(heading)}: {_e(method[key])}" for key, heading in _METHOD_HEADINGS if key in method) + ".</p>")
    parts.append('<div class="figures">')
    for level, rows in (("slice", result["labels"]), ("study", result["study"]["labels"])):
        sentences = summary_sentences(result, f"A ({a.name})", f"B ({b.name})", level=level)
        parts.append(f'<div><h3>{level.capitalize()} level</h3><ul class="summary">'
                     + "".join(f"<li>{_e(sentence)}</li>" for sentence in sentences) + "</ul>")
        if any(row.get("diff") is not None for row in rows.values()):
            parts.append(_figure(difference_svg(rows, f"{level} level", "A", "B"),
                                 f"AUC(A) - AUC(B) at {level} level with its 95% patient-bootstrap interval",
                                 f"AUC differences at {level} level"))
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _calibration_section(content: ReportContent, tables: Mapping[str, ReportTable]) -> str:
    from hemorrhage_core.report_figures import reliability_svg

    parts = ['<h2 id="calibration">Calibration</h2>',
             '<p class="note">Brier score and expected calibration error (ECE, 15 equal-width bins) of the '
             "model's own probabilities and, for a run with a calibration (temperature scaling per label, "
             "fitted on its validation set), of the calibrated ones. Lower is better.</p>",
             table_html(tables["calibration"]), '<div class="figures single">']
    for item in content.runs:
        found = calibration_data(item, content.evaluation)
        if found is None:
            continue
        name, data = found
        calibrated = data.predictions if data.calibration is not None else None
        title = f"{item.run.name}, {data_label(name)}"
        caption = (f"{item.run.id}: reliability before (grey, dashed) and after calibration"
                   if calibrated is not None else f"{item.run.id}: reliability (no calibration)")
        parts.append(_figure(reliability_svg(raw_frame(item, name, data), calibrated, title), caption,
                             f"reliability diagrams of {item.run.name}"))
    parts.append("</div>")
    return "".join(parts)


def _thresholds_section(tables: Mapping[str, ReportTable]) -> str:
    return "".join(['<h2 id="thresholds">Operating points</h2>',
                    table_html(tables["thresholds"])])


def render_report(content: ReportContent, tables: Sequence[ReportTable] | None = None) -> str:
    """The report as one HTML document (UTF-8 text) that loads nothing from anywhere."""
    by_key = _by_key(tables if tables is not None else report_tables(content))
    sections = [
        ("data", "Data"), ("runs", "Runs and configurations"), ("roc", "Discrimination: ROC per class"),
        ("comparison", "Paired comparison"), ("calibration", "Calibration"), ("thresholds", "Operating points"),
        ("notes", "Notes and disclaimer"),
    ]
    notes = "".join(f"<li>{_e(n)}</li>" for n in content.notes) or "<li>None.</li>"
    body = [
        "<header>",
        "<h1>Hemorrhage CT: model report</h1>",
        f'<p class="meta">Runs folder “{_e(content.runs_dir.name)}”: {len(content.runs)} runs '
        f"({'the pipeline' if content.pipeline is not None else 'every finished run'}), held-out evaluation "
        f"'{_e(content.evaluation)}'. Generated {_e(content.generated)}.</p>",
        f'<p class="disclaimer" id="disclaimer-top">{_e(DISCLAIMER)} The models have not been validated for '
        "patient care.</p>",
        "</header>",
        "<nav><ol>" + "".join(f'<li><a href="#{k}">{_e(t)}</a></li>' for k, t in sections) + "</ol></nav>",
        _data_section(content, by_key),
        _runs_section(by_key),
        _roc_section(content, by_key),
        _comparison_section(content, by_key),
        _calibration_section(content, by_key),
        _thresholds_section(by_key),
        f'<h2 id="notes">Notes and disclaimer</h2><ul class="notes">{notes}</ul>',
        f'<p class="disclaimer" id="disclaimer">{_e(DISCLAIMER)} Numbers measured on the data named above; '
        "they say nothing about other scanners, hospitals or patients.</p>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Hemorrhage CT report · research use only</title><style>{_CSS}</style></head>\n<body>"
        + "\n".join(body) + "\n</body></html>\n"
    )


def message_page(text: str) -> str:
    """A report page that only says why there is no report (e.g. an empty runs folder)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>Hemorrhage CT report · research use only</title><style>{_CSS}</style></head>\n<body>"
        f'<h1>Hemorrhage CT: model report</h1><p>{_e(text)}</p><p class="disclaimer">{_e(DISCLAIMER)}</p>'
        "</body></html>\n"
    )


def build_report(runs_dir: str | PathLike, **options: Any) -> str:
    """``render_report(collect_report(runs_dir, **options))``: the HTML text of a runs folder's report."""
    return render_report(collect_report(runs_dir, **options))
