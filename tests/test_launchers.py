"""Every way the README starts the dashboard binds it to 127.0.0.1 by default: ``make dashboard``,
``make demo`` (scripts/demo.sh), ``python app.py`` and ``shiny run app.py``. The make targets and the
demo script run for real with a stand-in ``python`` that records its arguments, with ``HOST`` set in the
environment as tcsh does, so an inherited variable cannot widen the bind."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def stand_in(tmp_path) -> dict:
    """A BIN folder whose ``python`` logs its arguments and exits 0, marked installed for make."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    python = bin_dir / "python"
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$CALLS"\nexit 0\n')
    python.chmod(0o755)
    (bin_dir / ".installed").touch()  # newer than the lock file: make installs nothing
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.update(CALLS=str(calls), HOST="ich-workstation.example.org")  # what tcsh exports
    env.pop("DASHBOARD_HOST", None)
    return {"bin": bin_dir, "calls": calls, "env": env, "runs": tmp_path / "runs", "data": tmp_path / "data"}


def _dashboard_call(calls: Path) -> list[str]:
    lines = [line.split() for line in calls.read_text().splitlines() if "shiny run" in line]
    assert len(lines) == 1, calls.read_text()
    return lines[0]


def _host(argv: list[str]) -> str:
    return argv[argv.index("--host") + 1]


def _make(target: str, stand_in: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            target,
            f"BIN={stand_in['bin']}",
            f"RUNS={stand_in['runs']}",
            f"DATA={stand_in['data']}",
        ],
        env=stand_in["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_make
def test_make_dashboard_binds_localhost(stand_in):
    result = _make("dashboard", stand_in)
    assert result.returncode == 0, result.stderr
    argv = _dashboard_call(stand_in["calls"])
    assert argv[:3] == ["-m", "shiny", "run"] and argv[-1] == "app.py"
    assert _host(argv) == LOCAL


@needs_make
def test_make_demo_binds_localhost(stand_in):
    data = stand_in["data"]
    data.mkdir()
    (data / "stage_2_train.csv").write_text("ID,Label\n")  # an existing data set: nothing to synthesise
    result = _make("demo", stand_in)
    assert result.returncode == 0, result.stderr
    assert _host(_dashboard_call(stand_in["calls"])) == LOCAL
    assert f"http://{LOCAL}:" in result.stdout
    # The demo's own knob still works when set on purpose.
    stand_in["calls"].unlink()
    stand_in["env"]["DASHBOARD_HOST"] = "::1"
    assert _make("demo", stand_in).returncode == 0
    assert _host(_dashboard_call(stand_in["calls"])) == "::1"


def test_python_app_py_binds_localhost(tmp_path, monkeypatch):
    import shiny

    seen: list[dict] = []
    monkeypatch.setattr(shiny, "run_app", lambda app, **kwargs: seen.append(kwargs))
    monkeypatch.setenv("HEMORRHAGE_RUNS_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO))
    runpy.run_path(str(REPO / "app.py"), run_name="__main__")
    assert len(seen) == 1 and seen[0].get("host") == LOCAL


def test_shiny_run_defaults_to_localhost():
    # The README's `shiny run app.py` passes no --host: Shiny's own default must stay local.
    from shiny._main import run

    (host,) = [p for p in run.params if p.name == "host"]
    assert host.default == LOCAL


def test_no_launcher_or_readme_command_binds_every_interface():
    texts = {name: (REPO / name).read_text(encoding="utf-8") for name in ("Makefile", "app.py", "README.md")}
    texts |= {
        f"scripts/{p.name}": p.read_text(encoding="utf-8")
        for p in (REPO / "scripts").iterdir()
        if p.is_file()
    }
    wide = re.compile(r"0\.0\.0\.0|--host[ =]+['\"]?(::|\[::\])['\"]?(\s|$)")
    assert {name: wide.findall(text) for name, text in texts.items() if wide.search(text)} == {}
    assert {"Makefile", "app.py", "README.md", "scripts/demo.sh"} <= texts.keys()


def _session_processes(session: int) -> list[str]:
    return subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()


@needs_make
def test_ctrl_c_stops_the_demo_dashboard_and_pipeline(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the whole foreground process group) ends the dashboard, the
    background pipeline and the progress echo; background jobs of a script ignore SIGINT themselves."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "pids"
    python = bin_dir / "python"
    # A stand-in that records its pid and stays up like the real dashboard and pipeline; a "finished?"
    # check (python - RUNS) answers "no" at once.
    python.write_text(
        '#!/bin/sh\ncase "$1" in -) exit 1;; esac\necho $$ >> "$PIDS"\nexec sleep 300\n'
    )
    python.chmod(0o755)
    (bin_dir / ".installed").touch()
    data = tmp_path / "data"
    data.mkdir()
    (data / "stage_2_train.csv").write_text("ID,Label\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env["PIDS"] = str(pids)
    demo = subprocess.Popen(
        ["make", "-C", str(REPO), "demo", f"BIN={bin_dir}", f"RUNS={tmp_path / 'runs'}", f"DATA={data}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2  # the dashboard and the pipeline
    os.killpg(demo.pid, signal.SIGINT)
    out, _ = demo.communicate(timeout=60)
    assert "stopping (dashboard and pipeline)" in out
    # The progress echo (tail --pid) notices the pipeline's end at its next poll, within a second.
    deadline = time.monotonic() + 30
    while (alive := _session_processes(demo.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], out
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
