"""One writer per run: ``--resume`` of a run that a live process still writes is refused, and nothing of
the run changes; a killed writer's lock is gone at once, even while its forked workers live on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_fixtures import tiny_config, write_tiny_set

from hemorrhage_core.runs import RunBusyError, RunWriter, WriterLock

REPO = Path(__file__).resolve().parent.parent


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _reopen_elsewhere(run_dir: Path) -> subprocess.CompletedProcess:
    code = f"from hemorrhage_core.runs import RunWriter; RunWriter.reopen({str(run_dir)!r}).finish('interrupted')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_second_process_cannot_reopen_a_run_being_written_until_the_first_lets_go(tmp_path):
    writer = RunWriter.create(tmp_path, backbone="resnet18", stage=1, config={})
    before = _files(writer.path)
    refused = _reopen_elsewhere(writer.path)
    assert refused.returncode == 1 and "RunBusyError" in refused.stderr
    assert f"run {writer.id} is being written by another process (process {os.getpid()} on {socket.gethostname()}" \
        in refused.stderr
    assert _files(writer.path) == before  # the refused attempt changed nothing

    writer.finish("finished")  # releases the lock
    assert _reopen_elsewhere(writer.path).returncode == 0
    assert json.loads((writer.path / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_train_resume_of_a_live_run_is_refused_with_one_line_and_leaves_it_untouched(tmp_path):
    from training.trainer import fit

    data = tmp_path / "data"
    write_tiny_set(data, n_patients=6, slices_per_patient=3)
    run_dir = fit(tiny_config(data, tmp_path / "runs", epochs=1, gallery_size=0, backbone="mobilenet_v3_small"))
    resume = [sys.executable, "-m", "training", "train", "--resume", str(run_dir), "--no-progress"]

    live = RunWriter.reopen(run_dir)  # stands for a trainer that is still running
    before = _files(run_dir)
    result = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: run {run_dir.name} is being written by another process "
        f"(process {os.getpid()} on {socket.gethostname()}, by its run.json); wait for it to end or stop it, then resume"
    ]
    assert _files(run_dir) == before

    live.finish("interrupted", "stopped")
    result = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


WRITER_WITH_A_FORKED_CHILD = textwrap.dedent("""
    import os, sys, time
    from hemorrhage_core.runs import RunWriter
    writer = RunWriter.create(sys.argv[1], backbone="resnet18", stage=1, config={})
    child = os.fork()  # as a DataLoader worker is forked: it inherits the lock file's descriptor
    if child == 0:
        # The at-fork handler has run before any of the child's own code: its copy is closed now.
        open(os.path.join(sys.argv[1], "child-running"), "w").close()
        time.sleep(120)
        os._exit(0)
    print(writer.path, child, flush=True)
    time.sleep(120)
""")


def test_a_killed_writers_lock_is_gone_at_once_even_while_its_forked_child_lives(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER_WITH_A_FORKED_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    path_text, child_text = process.stdout.readline().split()
    run_dir, child = Path(path_text), int(child_text)
    # A loaded machine may not have scheduled the child yet, and until it runs it still holds its
    # inherited copy of the lock (a window the at-fork close cannot shorten): wait for it to run.
    deadline = time.monotonic() + 60
    while not (tmp_path / "child-running").exists():
        assert time.monotonic() < deadline, "the forked child never ran"
        time.sleep(0.01)
    try:
        with pytest.raises(RunBusyError, match=f"process {process.pid} on"):
            WriterLock.acquire(run_dir).release()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        os.kill(child, 0)  # the forked child still lives (raises if not) and still has the descriptor
        writer = RunWriter.reopen(run_dir)  # the lock died with its owner
        writer.finish("interrupted", "killed")
    finally:
        process.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
