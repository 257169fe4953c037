"""``python -m training inspect``: JSON schema and order, folders, summary, exit codes, no identifiers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hemorrhage_core.dicom import new_uid, write_ct_slice
from training import inspect_cmd
from training.cli import main

KEYS = ["file", "ok", "modality", "rows", "columns", "hu_min", "hu_max", "hu_mean", "error"]
PATIENT_MARKER = "PID-INSPECT-CANARY"


def _slice(path: Path, low: int = -1000, high: int = 1000, **kwargs) -> Path:
    stored = np.linspace(low, high, 16 * 24).round().astype(np.int16).reshape(16, 24)
    write_ct_slice(
        path,
        stored,
        patient_id=PATIENT_MARKER,
        study_uid=new_uid("study"),
        series_uid=new_uid("series"),
        sop_uid=new_uid(str(path)),
        z=0.0,
        instance_number=1,
        extra={"PatientName": "Canary^Inspect"},
        **kwargs,
    )
    return path


def _truncated(path: Path, source: Path) -> Path:
    path.write_bytes(source.read_bytes()[:-50])
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_schema_order_values_and_exit_code(tmp_path, capsys):
    good_a = _slice(tmp_path / "a.dcm", -1000, 1000)
    good_b = _slice(tmp_path / "b.dcm", 0, 80)
    bad = _truncated(tmp_path / "cut.dcm", good_a)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file")
    order = [str(good_b), str(bad), str(text), str(good_a)]  # deliberately not sorted

    code, out, _ = _run(capsys, *order, "--json")
    records = json.loads(out)
    assert code == 2
    assert [r["file"] for r in records] == order
    assert all(list(r) == KEYS for r in records)
    assert [r["ok"] for r in records] == [True, False, False, True]

    b, cut, notes, a = records
    # HU = stored - 1024 (writer's default intercept)
    assert (b["hu_min"], b["hu_max"]) == (0.0 - 1024, 80.0 - 1024)
    assert (a["hu_min"], a["hu_max"], a["hu_mean"]) == (-2024.0, -24.0, pytest.approx(-1024.0, abs=0.01))
    assert (a["modality"], a["rows"], a["columns"], a["error"]) == ("CT", 16, 24, None)
    for refused in (cut, notes):
        assert refused["hu_min"] is None and refused["hu_max"] is None and refused["hu_mean"] is None
        assert isinstance(refused["error"], str) and refused["error"]
    assert "truncated" in cut["error"] and (cut["modality"], cut["rows"], cut["columns"]) == ("CT", 16, 24)
    assert "not a DICOM file" in notes["error"] and notes["modality"] is None


def test_exit_zero_when_every_file_is_usable(tmp_path, capsys):
    files = [str(_slice(tmp_path / f"{i}.dcm")) for i in range(2)]
    code, out, _ = _run(capsys, *files, "--json")
    assert code == 0 and all(r["ok"] for r in json.loads(out))


def test_folder_expands_to_its_sorted_dcm_files(tmp_path, capsys):
    folder = tmp_path / "stage_2_train"
    folder.mkdir()
    for name in ("ID_c.dcm", "ID_a.dcm", "ID_b.DCM"):
        _slice(folder / name)
    (folder / "readme.txt").write_text("ignored")
    (folder / "sub.dcm").mkdir()  # a folder named like a file is not a file
    lone = _slice(tmp_path / "lone.dcm")

    code, out, _ = _run(capsys, str(lone), str(folder), "--json")
    assert code == 0
    assert [Path(r["file"]).name for r in json.loads(out)] == ["lone.dcm", "ID_a.dcm", "ID_b.DCM", "ID_c.dcm"]


def test_empty_folder_and_missing_file_are_unusable(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, _ = _run(capsys, str(tmp_path / "empty"), str(tmp_path / "missing.dcm"), "--json")
    records = json.loads(out)
    assert code == 2
    assert [r["ok"] for r in records] == [False, False]
    assert "no .dcm files" in records[0]["error"] and records[1]["error"] == "file not found"


def test_summary_counts_reasons_and_hu_range(tmp_path, capsys):
    good = [_slice(tmp_path / "g1.dcm", -500, 100), _slice(tmp_path / "g2.dcm", 200, 300)]
    _truncated(tmp_path / "t1.dcm", good[0])
    _truncated(tmp_path / "t2.dcm", good[1])
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 10)

    code, out, _ = _run(capsys, str(tmp_path), "--summary", "--json")
    assert code == 2
    assert json.loads(out) == {
        "files": 5,
        "usable": 2,
        "refused": {"truncated": 2, "not_dicom": 1},
        "hu_min": -1524.0,
        "hu_max": -724.0,
    }
    code, out, _ = _run(capsys, str(tmp_path), "--summary")
    assert code == 2
    assert out.splitlines() == [
        "files: 5  usable: 2  refused: 3",
        "  truncated: 2",
        "  not_dicom: 1",
        "HU range of usable files: -1524.0 .. -724.0",
    ]


def test_table_lists_every_file(tmp_path, capsys):
    good = _slice(tmp_path / "good.dcm")
    bad = _truncated(tmp_path / "bad.dcm", good)
    code, out, _ = _run(capsys, str(good), str(bad))
    lines = out.splitlines()
    assert code == 2 and len(lines) == 3
    assert lines[0].split()[:2] == ["file", "usable"]
    assert lines[1].startswith(str(good)) and lines[1].split()[1] == "yes"
    assert lines[2].startswith(str(bad)) and lines[2].split()[1] == "NO" and "truncated" in lines[2]


def test_workers_give_the_same_records(tmp_path, capsys, monkeypatch):
    for i in range(4):
        _slice(tmp_path / f"{i}.dcm", -i * 100, i * 100 + 1)
    _truncated(tmp_path / "9.dcm", tmp_path / "0.dcm")
    _, serial, _ = _run(capsys, str(tmp_path), "--json")
    monkeypatch.setattr(inspect_cmd, "WORKER_CHUNK", 1)  # small enough that 5 files use the pool
    _, parallel, _ = _run(capsys, str(tmp_path), "--json", "--workers", "2")
    assert json.loads(parallel) == json.loads(serial)


def test_output_never_shows_patient_identifiers(tmp_path, capsys):
    good = _slice(tmp_path / "good.dcm")
    _truncated(tmp_path / "bad.dcm", good)
    for extra in ([], ["--json"], ["--summary"]):
        _, out, err = _run(capsys, str(tmp_path), *extra)
        assert PATIENT_MARKER not in out + err and "Canary" not in out + err
