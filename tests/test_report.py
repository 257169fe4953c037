"""The HTML report (``hemorrhage_core.report``, ``report_html``, ``python -m training report``): one self-contained file
whose numbers are the library's own (paired comparison, AUC, calibration, operating points), with the
disclaimer and every run; refusals and exit codes of the command."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from dashboard_fixtures import write_report_runs
from sklearn.metrics import roc_auc_score

from hemorrhage_core.calibration import brier
from hemorrhage_core.comparison import paired_comparison
from hemorrhage_core.dashboard.config import DISCLAIMER
from hemorrhage_core.evaluations import PROB_COLUMNS, TEST, TRUE_COLUMNS, load_evaluation
from hemorrhage_core.labels import LABELS
from hemorrhage_core.report import COMPARISON_COLUMNS, ReportError, collect_report, report_tables
from hemorrhage_core.report_html import build_report, format_cell
from training import cli

ROLES = ("phase1_stage1", "phase1_stage2", "phase2_stage1", "phase2_stage2")


class _Page(HTMLParser):
    """Every tag with its attributes, the text, and each table's rows of (text, data-value) cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell, self._value = [], attributes.get("data-value")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell), self._value))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    return write_report_runs(tmp_path_factory.mktemp("report") / "runs")


@pytest.fixture(scope="module")
def html(pipeline) -> str:
    return build_report(pipeline["runs"])


def test_the_report_loads_nothing_from_anywhere(html):
    page = _parse(html)
    # No element points outside the file: images are data: URIs, links are in-page anchors, no script.
    for tag, attributes in page.tags:
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value[:80])
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    assert "http://" not in html and "https://" not in html  # not even as text
    csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    images = [a["src"] for t, a in page.tags if t == "img"]
    # ROC per run on test and on validation, two comparison panels at most, a reliability figure per run.
    assert len(images) >= 4 * 2 + 4 and all(src.startswith("data:image/svg+xml;base64,") for src in images)


def test_the_report_names_every_run_and_says_research_use_only(html, pipeline):
    text = "".join(_parse(html).text)
    assert text.count(DISCLAIMER) >= 2  # at the top and at the end
    for role in ROLES:
        assert pipeline[role].name in text
    assert "ID_" not in text  # image ids are not shown, and patients only as counts
    patients = load_evaluation(pipeline["phase1_stage1"], TEST).predictions["patient"].unique()
    assert not any(p in html for p in patients)  # not even hashed


def _row_predictions(pipeline, row):
    """The saved predictions a report table's row was built from (its run and data set)."""
    name = TEST if row["data"].startswith(TEST) else "validation"
    return load_evaluation(pipeline["runs"] / row["run id"], name).predictions


def test_the_comparison_numbers_are_paired_comparisons(html, pipeline):
    a = load_evaluation(pipeline["phase1_stage2"], TEST).predictions
    b = load_evaluation(pipeline["phase2_stage2"], TEST).predictions
    expected = paired_comparison(a, b)
    rows = _parse(html).tables["table-comparison"][1:]  # the first row is the header's
    assert len(rows) == 2 * len(LABELS)
    keys = ("positives", "auc_a", "auc_b", "diff", "ci_low", "ci_high", "p_value", "p_holm")
    for cells, (level, label) in zip(rows, [(lv, lb) for lv in ("slice", "study") for lb in LABELS], strict=True):
        assert [c[0] for c in cells[:2]] == [level, label]
        row = (expected["labels"] if level == "slice" else expected["study"]["labels"])[label]
        want = dict(row, ci_low=row["ci"][0], ci_high=row["ci"][1])
        for key, column, (shown, value) in zip(keys, COMPARISON_COLUMNS[2:], cells[2:], strict=True):
            if want[key] is None:
                assert shown == "–" and value is None
            else:
                assert float(value) == pytest.approx(want[key], rel=1e-12, abs=1e-15)
                assert shown == format_cell(column, want[key])
    text = "".join(_parse(html).text)
    from hemorrhage_core.comparison import summary_sentences

    for sentence in summary_sentences(expected, "A (phase 1 · stage 2 (vgg16_bn))", "B (phase 2 · stage 2 (inception_v3))"):
        assert sentence in text


def test_auc_rows_put_the_held_out_test_first_and_mark_validation_optimistic(pipeline):
    content = collect_report(pipeline["runs"], n_resamples=20)
    auc = {t.key: t for t in report_tables(content)}["auc"].frame
    assert list(auc["data"]) == ["test (held out)"] * 4 + ["validation (optimistic)"] * 4
    assert list(auc["run id"][:4]) == [pipeline[r].name for r in ROLES]
    for _, row in auc.iterrows():
        frame = _row_predictions(pipeline, row)
        for label in LABELS:
            assert row[f"AUC {label}"] == pytest.approx(roc_auc_score(frame[f"true_{label}"], frame[f"prob_{label}"]))
    html = build_report(pipeline["runs"], n_resamples=20)
    rows = [r for r in html.split("<tr") if "validation (optimistic)" in r and "AUC" not in r]
    assert rows and all(r.startswith(' class="optimistic"') for r in rows)


def test_subtype_pair_rows_are_the_evaluations_pair_aucs(pipeline):
    from hemorrhage_core.evaluations import arrays, subtype_pair_auc
    from hemorrhage_core.labels import SUBTYPES

    content = collect_report(pipeline["runs"], n_resamples=20)
    table = {t.key: t for t in report_tables(content)}["subtype_pairs"].frame
    assert len(table) == 8 * len(SUBTYPES) and list(table["output"][:5]) == list(SUBTYPES)
    for _, row in table.iterrows():
        pairs = subtype_pair_auc(*arrays(_row_predictions(pipeline, row)))
        for other in SUBTYPES:
            value, expected = row[f"against {other}"], pairs[row["output"]].get(other)
            assert (value is None or np.isnan(value)) if expected is None else value == pytest.approx(expected)
    html = build_report(pipeline["runs"], n_resamples=20)
    assert 'id="table-subtype_pairs"' in html and 'id="table-subtypes"' in html


def test_along_z_rows_count_the_series_that_rise_on_their_bleed_slices(pipeline):
    content = collect_report(pipeline["runs"], n_resamples=20)
    table = {t.key: t for t in report_tables(content)}["along_z"].frame
    assert list(table["data"]) == ["test (held out)"] * 4 + ["validation (optimistic)"] * 4
    for _, row in table.iterrows():
        frame = _row_predictions(pipeline, row)
        mixed = [part for _, part in frame.groupby("series") if part["true_any"].nunique() == 2]
        rising = sum(part.loc[part["true_any"] == 1, "prob_any"].mean()
                     > part.loc[part["true_any"] == 0, "prob_any"].mean() for part in mixed)
        assert row["series with and without blood"] == len(mixed) > 0
        assert row["rising"] == rising and 0 <= row["separated"] <= rising
    html = build_report(pipeline["runs"], n_resamples=20)
    assert 'id="table-along_z"' in html


def test_subtype_rows_score_the_bleed_slices_of_each_evaluation(pipeline):
    content = collect_report(pipeline["runs"], n_resamples=20)
    table = {t.key: t for t in report_tables(content)}["subtypes"].frame
    assert list(table["data"]) == ["test (held out)"] * 4 + ["validation (optimistic)"] * 4
    for _, row in table.iterrows():
        frame = _row_predictions(pipeline, row)
        bleeds = frame[frame["true_any"] == 1]
        assert row["bleed slices"] == len(bleeds)
        for label in LABELS[:-1]:
            if bleeds[f"true_{label}"].nunique() < 2:
                assert row[f"AUC {label}"] is None or np.isnan(row[f"AUC {label}"])
            else:
                assert row[f"AUC {label}"] == pytest.approx(roc_auc_score(bleeds[f"true_{label}"], bleeds[f"prob_{label}"]))
        assert "AUC any" not in row


def test_calibration_before_and_after_agree_with_the_saved_evaluation(pipeline):
    content = collect_report(pipeline["runs"], n_resamples=20)
    table = {t.key: t for t in report_tables(content)}["calibration"].frame
    for role in ROLES:
        run = pipeline[role]
        saved = json.loads((run / "evaluations" / TEST / "metrics.json").read_text())["calibration"]
        rows = table[table["run id"] == run.name].set_index("label")
        assert list(rows.index) == list(LABELS)
        frame = load_evaluation(run, TEST).predictions
        for label in LABELS:
            if saved["applied"]:  # what evaluate measured before and after calibration
                assert rows.loc[label, "Brier (model)"] == saved["before"]["brier"][label]
                assert rows.loc[label, "ECE (model)"] == saved["before"]["ece"][label]
                assert rows.loc[label, "Brier (calibrated)"] == saved["after"]["brier"][label]
                assert rows.loc[label, "ECE (calibrated)"] == saved["after"]["ece"][label]
                assert rows.loc[label, "Brier (calibrated)"] == pytest.approx(
                    brier(frame[f"true_{label}"], frame[f"prob_{label}"]))
                assert rows.loc[label, "temperature"] == saved["temperatures"][label]
            else:  # the model's own probabilities are the saved ones
                assert np.isnan(rows.loc[label, "Brier (calibrated)"]) and np.isnan(rows.loc[label, "temperature"])
                assert rows.loc[label, "Brier (model)"] == pytest.approx(
                    brier(frame[f"true_{label}"], frame[f"prob_{label}"]))


def test_operating_points_are_the_saved_evaluations(pipeline):
    content = collect_report(pipeline["runs"], n_resamples=20)
    table = {t.key: t for t in report_tables(content)}["thresholds"].frame
    for role in ROLES:
        saved = json.loads((pipeline[role] / "evaluations" / TEST / "metrics.json").read_text())
        rows = table[table["run id"] == pipeline[role].name]
        assert len(rows) == 2 * len(LABELS)
        for _, row in rows.iterrows():
            block = saved if row["level"] == "slice" else saved["study"]
            for column, key in (("threshold", "threshold"), ("sensitivity", "sensitivity"),
                                ("specificity", "specificity"), ("PPV", "ppv"), ("NPV", "npv")):
                want = block[key][row["label"]]
                assert (np.isnan(row[column]) if want is None else row[column] == pytest.approx(want))


def test_without_pipeline_json_the_finished_runs_are_reported(pipeline, tmp_path):
    runs = Path(shutil.copytree(pipeline["runs"], tmp_path / "runs"))
    (runs / "pipeline.json").unlink()
    content = collect_report(runs, n_resamples=20)
    assert content.pipeline is None and {item.run.id for item in content.runs} == {pipeline[r].name for r in ROLES}
    # The two newest stage-2 runs are compared (the fixture makes them within a second: no order).
    assert {content.comparison["a"].id, content.comparison["b"].id} == {
        pipeline["phase1_stage2"].name, pipeline["phase2_stage2"].name}


def test_a_missing_evaluation_is_a_note_not_a_failure(pipeline, tmp_path):
    runs = Path(shutil.copytree(pipeline["runs"], tmp_path / "runs"))
    shutil.rmtree(runs / pipeline["phase2_stage2"].name / "evaluations" / TEST)
    content = collect_report(runs, n_resamples=20)
    assert content.comparison is None
    assert any("no such evaluation" in note for note in content.notes)
    assert "cannot be compared" in " ".join(content.notes)
    html = build_report(runs, n_resamples=20)
    assert "no such evaluation" in html


def test_report_refuses_an_empty_or_missing_runs_folder(tmp_path):
    with pytest.raises(ReportError, match="nothing to report"):
        collect_report(tmp_path)
    with pytest.raises(ReportError, match="no runs folder"):
        collect_report(tmp_path / "absent")


# ------------------------------------------------------------------------------------------- CLI
def test_report_command_writes_the_file_and_prints_its_path(pipeline, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    out.parent.mkdir()
    code = cli.main(["report", "--runs-dir", str(pipeline["runs"]), "--out", str(out), "--resamples", "50"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and DISCLAIMER in text
    assert all(pipeline[role].name in text for role in ROLES)


def test_report_command_refuses_an_empty_runs_folder_in_one_line(tmp_path, capsys):
    empty = tmp_path / "runs"
    empty.mkdir()
    for folder in (empty, tmp_path / "absent"):
        code = cli.main(["report", "--runs-dir", str(folder)])
        stdout, stderr = capsys.readouterr()
        assert code == 2 and stdout == ""
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
        assert "Traceback" not in stderr
    assert not (empty / "report.html").exists()


def test_report_command_with_an_evaluation_no_run_has(pipeline, tmp_path, capsys):
    out = tmp_path / "r.html"
    code = cli.main(["report", "--runs-dir", str(pipeline["runs"]), "--out", str(out), "--evaluation", "external"])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    text = "".join(_parse(out.read_text()).text)
    assert "evaluation 'external': no such evaluation" in text
    assert "table-comparison" not in out.read_text() and "cannot be compared" in text


# ------------------------------------------------------------------------- a real pipeline's runs
@pytest.mark.slow
def test_report_of_a_real_tiny_pipeline(tmp_path, capsys):
    from dashboard_fixtures import write_tiny_pipeline

    runs = write_tiny_pipeline(tmp_path)
    out = tmp_path / "report.html"
    assert cli.main(["report", "--runs-dir", str(runs["runs"]), "--out", str(out)]) == 0, capsys.readouterr().err
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and DISCLAIMER in text
    for role in ROLES:
        assert runs[role].name in text
    record = json.loads((runs["runs"] / "pipeline.json").read_text())
    a = load_evaluation(runs["phase1_stage2"], TEST).predictions
    b = load_evaluation(runs["phase2_stage2"], TEST).predictions
    expected = paired_comparison(a, b)
    rows = _parse(text).tables["table-comparison"][1:]
    for cells, label in zip(rows[: len(LABELS)], LABELS, strict=True):
        want = expected["labels"][label]["diff"]
        assert (cells[5][1] is None) if want is None else float(cells[5][1]) == pytest.approx(want, rel=1e-12)
    # The test set's size comes from pipeline.json.
    test_rows = {cells[0][0]: cells[1][0] for cells in _parse(text).tables["table-test_set"][1:]}
    assert test_rows["images"] == str(record["test"]["n_images"]) and test_rows["patients"] == str(
        record["test"]["n_patients"])
    assert set(TRUE_COLUMNS + PROB_COLUMNS) <= set(a.columns)


def test_windows_named_or_resolved_read_the_same_in_the_settings_table():
    from hemorrhage_core.report import _setting_text

    named = _setting_text("windows", ["brain", "subdural", "bone"])
    resolved = _setting_text("windows", [{"name": "brain", "center": 40.0, "width": 80.0},
                                         {"name": "subdural", "center": 80.0, "width": 200.0},
                                         {"name": "bone", "center": 600.0, "width": 2800.0}])
    assert named == resolved == "brain40x80-subdural80x200-bone600x2800"
    assert _setting_text("windows", ["brain", {"name": "blood", "center": 60, "width": 40}]) == "brain40x80-blood60x40"
    assert _setting_text("windows", ["no-such-window"]) == '["no-such-window"]'  # shown as written
