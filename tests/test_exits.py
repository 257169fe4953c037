"""One exit-code table and one error handler for every command: one line on stderr, the documented code,
and no command importing another."""

import errno
import re
from pathlib import Path

import pytest

from hemorrhage_core.errors import CheckpointError
from training import cli
from training.config import ConfigError
from training.exits import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CommandError,
    run_exit_code,
    run_reporting_errors,
)

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _raise(exc: BaseException):
    def work():
        raise exc

    return work


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ConfigError("lr must be > 0"), EXIT_BAD_INPUT, "error: lr must be > 0"),
        (CheckpointError("best.pt holds NaN"), EXIT_BAD_INPUT, "error: best.pt holds NaN"),
        (CommandError("--batch-size must be at least 1"), EXIT_BAD_INPUT, "error: --batch-size must be at least 1"),
        (CommandError("stage 1 failed", EXIT_FAILED), EXIT_FAILED, "error: stage 1 failed"),
        (OSError(errno.ENOSPC, "No space left on device"), EXIT_FAILED, "error: [Errno 28] No space left on device"),
        (OSError(errno.EIO, "Input/output error"), EXIT_FAILED, "error: [Errno 5] Input/output error"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.yaml"), EXIT_BAD_INPUT,
         "error: [Errno 2] No such file or directory: 'x.yaml'"),
        (PermissionError(errno.EACCES, "Permission denied", "out"), EXIT_BAD_INPUT,
         "error: [Errno 13] Permission denied: 'out'"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    ],
)
def test_errors_become_one_line_and_an_exit_code(exc, code, text, capsys):
    assert run_reporting_errors(_raise(exc)) == code
    err = capsys.readouterr().err
    assert err.strip() == text
    assert "Traceback" not in err


def test_results_pass_through_and_bugs_keep_their_traceback():
    assert run_reporting_errors(lambda: "runs/x") == "runs/x"
    with pytest.raises(ZeroDivisionError):
        run_reporting_errors(lambda: 1 / 0)


@pytest.mark.parametrize(("status", "code"), [("finished", EXIT_OK), ("failed", EXIT_FAILED),
                                              ("interrupted", EXIT_INTERRUPTED)])
def test_a_runs_status_gives_its_exit_code(status, code, tmp_path):
    from hemorrhage_core.runs import RunWriter

    writer = RunWriter.create(tmp_path, backbone="resnet18", stage=1, config={})
    writer.finish(status, None if status == "finished" else "stopped")
    assert run_exit_code(writer.path) == code


def test_every_command_runs_under_the_handler(tmp_path, capsys):
    """Refusals raised inside a command reach the user as one line and exit 2, whatever the command."""
    cases = [
        (["compare", "--a", str(tmp_path), "--b", str(tmp_path), "--resamples", "0"], "--resamples"),
        (["report", "--runs-dir", str(tmp_path), "--resamples", "0"], "--resamples"),
        (["evaluate", "--run", str(tmp_path), "--data", str(tmp_path), "--batch-size", "0"], "--batch-size"),
        (["predict", "--run", str(tmp_path), str(tmp_path), "--smooth"], "--submission"),
        (["index", "--data", str(tmp_path / "absent"), "--no-progress"], "absent"),
    ]
    for argv, word in cases:
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == EXIT_BAD_INPUT and out == "", argv
        assert err.startswith("error: ") and word in err and len(err.strip().splitlines()) == 1, err


def test_the_help_shows_the_exit_code_table(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code in (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED):
        assert re.search(rf"^\s+{code}\s", out, re.MULTILINE), out


def test_no_command_module_imports_another():
    """What two commands share lives in a module of its own (training/prediction.py, config_args.py, ...)."""
    offenders = []
    for path in sorted(TRAINING.glob("*_cmd.py")):
        for line in path.read_text().splitlines():
            if re.search(r"^\s*(from\s+training(\.\w+)*\s+import\s+.*\b\w+_cmd\b|from\s+training\.\w+_cmd\s+import"
                         r"|import\s+training\.\w+_cmd)", line):
                offenders.append(f"{path.name}: {line.strip()}")
    assert offenders == []
