"""The train and pipeline commands' error handling: one line on stderr and the documented exit code."""

import errno

import pytest

from hemorrhage_core.errors import CheckpointError
from training.config import ConfigError
from training.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, run_reporting_errors


def _raise(exc: BaseException):
    def work():
        raise exc

    return work


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ConfigError("lr must be > 0"), EXIT_BAD_INPUT, "error: lr must be > 0"),
        (CheckpointError("best.pt holds NaN"), EXIT_BAD_INPUT, "error: best.pt holds NaN"),
        (OSError(errno.ENOSPC, "No space left on device"), EXIT_FAILED, "error: [Errno 28] No space left on device"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    ],
)
def test_errors_become_one_line_and_an_exit_code(exc, code, text, capsys):
    assert run_reporting_errors(_raise(exc)) == code
    err = capsys.readouterr().err
    assert err.strip() == text
    assert "Traceback" not in err


def test_listed_failures_exit_1_and_results_pass_through(capsys):
    class Stopped(RuntimeError):
        pass

    assert run_reporting_errors(_raise(Stopped("stage 1 failed")), failed=(Stopped,)) == EXIT_FAILED
    assert capsys.readouterr().err.strip() == "error: stage 1 failed"
    assert run_reporting_errors(lambda: "runs/x") == "runs/x"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_reporting_errors(lambda: 1 / 0)
