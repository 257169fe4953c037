"""The suite's own disk hygiene (tests/conftest.py): module folders go when the module ends, a module
with a failure keeps its folders, session folders stay, and too little free space stops the run at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

FIRST = '''
import pytest

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    (path / "model.pt").write_bytes(bytes(1000))
    return path

def test_uses_both(shared, big, tmp_path_factory):
    tmp_path_factory.mktemp("made_by_a_test")
    assert shared.is_dir() and big.is_dir()
'''

SECOND = '''
def test_module_folders_are_gone_and_session_folders_stay(shared, tmp_path_factory):
    names = sorted(p.name for p in tmp_path_factory.getbasetemp().iterdir() if not p.is_symlink())
    assert names == ["shared0"], names
'''

FAILING = '''
def test_fails(tmp_path_factory):
    tmp_path_factory.mktemp("evidence")
    assert False
'''


def _run(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "tmp_path_retention_policy=failed",
         "--basetemp", str(folder / "bt"), *args],
        cwd=folder, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )


def _project(tmp_path: Path, **modules: str) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "conftest.py").write_text(
        (folder / "conftest.py").read_text()
        + '\n\n@pytest.fixture(scope="session")\ndef shared(tmp_path_factory):\n'
        '    return tmp_path_factory.mktemp("shared")\n'
    )
    for name, text in modules.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def test_module_folders_go_when_the_module_ends_and_session_folders_stay(tmp_path):
    folder = _project(tmp_path, test_a_first=FIRST, test_b_second=SECOND)
    result = _run(folder, "test_a_first.py", "test_b_second.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_a_module_with_a_failure_keeps_its_folders(tmp_path):
    folder = _project(tmp_path, test_a_fails=FAILING)
    result = _run(folder, "test_a_fails.py")
    assert result.returncode == 1
    assert (folder / "bt" / "evidence0").is_dir()


def test_too_little_free_space_stops_the_run_with_the_reason(tmp_path):
    folder = _project(tmp_path, test_b_second=SECOND)
    result = _run(folder, env={"HEMORRHAGE_TEST_MIN_FREE_GIB": "1000000"})
    assert result.returncode == 4
    assert "the test suite needs about 1000000 GiB" in result.stdout + result.stderr
    assert "passed" not in result.stdout
