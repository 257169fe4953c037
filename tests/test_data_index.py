"""Label table, header index, freshness, unlabeled folders, hash_id and the ``index`` command."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pandas as pd
import pytest
from data_fixtures import long_labels, truncate_file, write_rsna_set
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hemorrhage_core.data import header_index
from hemorrhage_core.data.header_index import INDEX_COLUMNS, build_index, index_folder
from hemorrhage_core.data.ids import hash_id
from hemorrhage_core.data.labels_table import read_labels
from hemorrhage_core.errors import DatasetError
from hemorrhage_core.labels import LABELS
from training.cli import main as cli_main

REFERENCE = {
    "ID_00000000a": [0, 0, 0, 0, 0, 0],
    "ID_00000000b": [0, 1, 0, 1, 0, 1],
    "ID_00000000c": [1, 0, 0, 0, 0, 1],
}


def _reference_frame(labels: dict[str, list[int]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(labels, orient="index", columns=list(LABELS)).astype(np.int8).sort_index()
    frame.index.name = "image_id"
    return frame


# -- label table ---------------------------------------------------------------------------------


def test_pivot_drops_duplicate_rows(tmp_path):
    long = long_labels(REFERENCE)
    # RSNA's CSV repeats some rows: repeat three, one of them twice, and shuffle.
    long = pd.concat([long, long.iloc[[1, 7, 7, 12]]]).sample(frac=1.0, random_state=0)
    long.to_csv(tmp_path / "labels.csv", index=False)
    table = read_labels(tmp_path / "labels.csv")
    pd.testing.assert_frame_equal(table.frame, _reference_frame(REFERENCE))
    assert table.duplicates_dropped == 4
    assert table.rows_read == 18 + 4
    assert table.conflicting_ids == table.incomplete_ids == table.any_mismatch_ids == ()


def test_label_inconsistencies_are_reported_not_fatal(tmp_path, caplog):
    labels = dict(REFERENCE)
    labels["ID_00000000d"] = [0, 0, 1, 0, 0, 0]  # any should be 1
    long = long_labels(labels)
    conflict = pd.DataFrame([("ID_00000000b_subdural", 1)], columns=["ID", "Label"])
    incomplete = long_labels({"ID_00000000e": [0] * 6}).iloc[:4]
    pd.concat([long, conflict, incomplete]).to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING):
        table = read_labels(tmp_path / "labels.csv")
    assert table.any_mismatch_ids == ("ID_00000000d",)
    assert table.conflicting_ids == ("ID_00000000b",)
    assert table.incomplete_ids == ("ID_00000000e",)
    assert table.frame.loc["ID_00000000b", "subdural"] == 1  # a conflict keeps the positive
    assert "ID_00000000e" not in table.frame.index
    assert table.frame.loc["ID_00000000d", "any"] == 0  # kept as given, only reported
    assert "OR of the five subtypes" in caplog.text and "ID_00000000d" in caplog.text


def test_bad_label_files_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_labels(tmp_path / "absent.csv")
    pd.DataFrame({"ID": ["ID_00000000a_any"], "Label": [0.7]}).to_csv(tmp_path / "probs.csv", index=False)
    with pytest.raises(DatasetError, match="not 0 or 1"):
        read_labels(tmp_path / "probs.csv")
    pd.DataFrame({"image": ["x"], "y": [1]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DatasetError, match="columns"):
        read_labels(tmp_path / "other.csv")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=400), st.text(alphabet="ID_,Label01any\n\"x.-", max_size=300)))
def test_any_label_file_gives_a_table_or_the_projects_error(tmp_path, content):
    path = tmp_path / "labels.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        table = read_labels(path)
    except DatasetError:
        return
    assert list(table.frame.columns) == list(LABELS)
    assert all(table.frame[name].isin([0, 1]).all() for name in LABELS)


# -- header index --------------------------------------------------------------------------------


@pytest.fixture()
def rsna(tmp_path):
    data = tmp_path / "data"
    reference = write_rsna_set(data, n_patients=4, slices_per_patient=4, size=32, seed=0)
    return data, reference


def test_index_joins_headers_and_labels(rsna):
    data, reference = rsna
    result = build_index(data, workers=1, progress=False)
    table = result.table
    assert list(table.columns) == list(INDEX_COLUMNS)
    assert len(table) == len(reference) == result.report.n_images
    got = table.set_index("image_id")[list(LABELS)].sort_index()
    pd.testing.assert_frame_equal(got, reference)
    assert all(table[name].dtype == np.int8 for name in LABELS)
    # stage1_class: -1 for two subtypes, else none / the single subtype
    expected = [
        -1 if row[:5].sum() > 1 else (0 if row[:5].sum() == 0 else int(np.argmax(row[:5])) + 1)
        for row in got.to_numpy()
    ]
    assert table.set_index("image_id").loc[got.index, "stage1_class"].tolist() == expected
    assert (table["path"] == "stage_2_train/" + table["image_id"] + ".dcm").all()
    assert result.report.n_patients == 4 and result.report.n_series == 4
    assert result.report.positives == {name: int(reference[name].sum()) for name in LABELS}
    # slice_rank follows z within each series
    for _, series in table.groupby("series_uid"):
        assert series.sort_values("z")["slice_rank"].tolist() == list(range(len(series)))
    assert (data / "index.parquet").is_file()


def test_missing_and_unreadable_files_are_left_out_and_reported(rsna, caplog):
    data, reference = rsna
    ids = list(reference.index)
    (data / "stage_2_train" / f"{ids[0]}.dcm").unlink()
    (data / "stage_2_train" / f"{ids[1]}.dcm").write_bytes(b"not a dicom file at all" * 10)
    truncate_file(data / "stage_2_train" / f"{ids[2]}.dcm")  # header intact: found later by the cache
    with caplog.at_level(logging.WARNING):
        result = build_index(data, workers=2, progress=False)
    report = result.report
    assert report.missing_ids == (ids[0],)
    assert list(report.unreadable) == [ids[1]] and report.unreadable[ids[1]]  # the reader's reason
    assert report.left_out == 2
    assert set(result.table["image_id"]) == set(ids) - {ids[0], ids[1]}
    assert ids[0] in caplog.text and ids[1] in caplog.text


def test_index_is_reused_while_fresh_and_rebuilt_when_not(rsna, monkeypatch):
    data, reference = rsna
    first = build_index(data, workers=1, progress=False)
    assert not first.report.reused

    calls = []
    real_scan = header_index.scan_headers
    monkeypatch.setattr(header_index, "scan_headers", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    again = build_index(data, workers=1, progress=False)
    assert again.report.reused and calls == []
    pd.testing.assert_frame_equal(again.table, first.table)

    # a changed file (size/mtime) makes it stale
    path = data / "stage_2_train" / f"{reference.index[0]}.dcm"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not build_index(data, workers=1, progress=False).report.reused
    assert build_index(data, workers=1, progress=False).report.reused
    # a changed CSV makes it stale (same size: content hash, not only mtime)
    csv = data / "stage_2_train.csv"
    text = csv.read_text()
    changed = re.sub(r"(_epidural,)0", r"\g<1>1", text, count=1)
    assert changed != text and len(changed) == len(text)
    csv.write_text(changed)
    rebuilt = build_index(data, workers=1, progress=False)
    assert not rebuilt.report.reused
    assert rebuilt.table["epidural"].sum() == first.table["epidural"].sum() + 1
    # --rebuild always rescans
    assert not build_index(data, workers=1, progress=False, rebuild=True).report.reused
    assert len(calls) == 3


def test_unwritable_data_folder_falls_back_to_user_cache(rsna, tmp_path, monkeypatch):
    data, _ = rsna
    monkeypatch.setenv("HEMORRHAGE_CT_CACHE", str(tmp_path / "user-cache"))
    (data / "index.parquet").mkdir()  # the index cannot be written there (works even as root)
    first = build_index(data, workers=1, progress=False)
    assert first.report.index_path is not None
    assert first.report.index_path.startswith(str(tmp_path / "user-cache"))
    assert build_index(data, workers=1, progress=False).report.reused


def test_bad_data_folders_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        build_index(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no label file"):
        build_index(tmp_path / "empty")


def test_unlabeled_folder_index(rsna):
    data, reference = rsna
    folder = data / "stage_2_train"
    (folder / "sub").mkdir()
    (folder / "sub" / "junk.dcm").write_bytes(b"\0" * 300)
    result = index_folder(folder, workers=1, progress=False)
    assert set(result.table["image_id"]) == set(reference.index)
    assert result.table[list(LABELS)].isna().all().all()
    assert result.table["stage1_class"].isna().all()
    assert list(result.report.unreadable) == ["junk"]
    assert result.report.positives == {}


# -- ids -----------------------------------------------------------------------------------------


def test_hash_id_is_one_way_and_stable():
    value = "PAT-0001"
    digest = hash_id(value)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert digest == hash_id(value)
    assert digest != hash_id("PAT-0002")
    assert digest != hash_id(value, salt="run-1")
    assert hash_id("bc", salt="a") != hash_id("c", salt="ab")
    import hashlib

    assert digest == hashlib.sha256(b"\x00PAT-0001").hexdigest()[:16]


# -- the command ---------------------------------------------------------------------------------


def test_index_command_prints_counts_and_left_out_ids(rsna, capsys):
    data, reference = rsna
    missing = reference.index[0]
    (data / "stage_2_train" / f"{missing}.dcm").unlink()
    assert cli_main(["index", "--data", str(data), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"images\s+{len(reference) - 1}\b", out)
    assert re.search(r"patients\s+4\b", out) and re.search(r"series\s+4\b", out)
    assert re.search(rf"epidural\s+{int(reference.drop(missing)['epidural'].sum())}\b", out)
    assert re.search(r"missing\s+1\b", out) and missing in out
    assert "PAT" not in out  # patient ids never printed
    assert cli_main(["index", "--data", str(data), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reused"] is True and report["missing_ids"] == [missing]


def test_index_command_refuses_a_bad_folder(tmp_path, capsys):
    assert cli_main(["index", "--data", str(tmp_path / "absent"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_index_of_a_phantom_set_matches_the_generator(tmp_path):
    from hemorrhage_core.synthetic import write_dataset

    summary = write_dataset(tmp_path, patients=3, slices_per_patient=4, size=48, seed=1, workers=1, progress=False)
    result = build_index(tmp_path, workers=1, progress=False)
    assert result.report.n_images == summary.n_images and result.report.left_out == 0
    assert result.report.n_patients == summary.n_patients
    assert result.report.positives == summary.counts
    labels = read_labels(tmp_path / "stage_2_train.csv").frame
    got = result.table.set_index("image_id")[list(LABELS)].sort_index()
    pd.testing.assert_frame_equal(got, labels)
