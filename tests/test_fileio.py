"""hemorrhage_core.fileio: atomic replaces and fsync, shared by runs, checkpoints and the slice cache."""

from __future__ import annotations

import os
import stat

import pytest

from hemorrhage_core import fileio


@pytest.fixture
def disk_calls(monkeypatch):
    """Record fsync (as 'fsync file' / 'fsync dir') and os.replace calls, in order, and still make them."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_file_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, disk_calls):
    target = tmp_path / "sub" / "best.pt"
    with fileio.atomic_file(target) as fh:
        fh.write(b"weights")
        assert not target.exists()  # nothing under the final name while writing
    assert target.read_bytes() == b"weights"
    assert disk_calls == ["fsync file", "replace", "fsync dir"]


def test_atomic_file_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    fileio.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), fileio.atomic_file(target) as fh:
        fh.write(b"half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_write_fsynced_and_fsync_file_reach_the_disk(tmp_path, disk_calls):
    path = tmp_path / "cache.json"
    fileio.write_fsynced(path, b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}'
    fileio.fsync_file(path)
    assert disk_calls == ["fsync file", "fsync file"]


def test_remove_temp_files_takes_only_the_atomic_writers_temporaries(tmp_path):
    fileio.atomic_write_bytes(tmp_path / "run.json", b"{}")
    stale = [tmp_path / ".last.pt.k2x_9q0a.tmp", tmp_path / ".run.json.abcd1234.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".last.pt.tmp", tmp_path / "run.json"]
    for path in stale + kept[:2]:
        path.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".a.png.abcd1234.tmp").write_bytes(b"x")  # sub-folders are the caller's to name
    assert sorted(fileio.remove_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert (tmp_path / "sub" / ".a.png.abcd1234.tmp").exists()
    assert fileio.remove_temp_files(tmp_path / "missing") == []
