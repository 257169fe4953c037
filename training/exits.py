"""The exit-code table and the one error handler every command runs under (``cli.main`` wraps each).

- 0 ``EXIT_OK``: done; every input was used and every output written.
- 1 ``EXIT_FAILED``: the input was usable but the work failed: a run ended failed (NaN loss), the
  pipeline stopped, the disk filled up or an I/O error struck, or a bug (which keeps its traceback).
- 2 ``EXIT_BAD_INPUT``: something given cannot be used (an argument, config, data set, run or
  checkpoint, a path that cannot be read or written), or some inputs were refused (``predict``,
  ``inspect``) while the others were done.
- 130 ``EXIT_INTERRUPTED``: Ctrl-C or SIGTERM (a training run is marked interrupted and can resume).

A command returns its code, or raises: ``CommandError`` (its own words and code); ``HemorrhageError``,
``ConfigError`` or another ``ValueError`` (2); ``OSError`` (2 when the path given cannot be used:
missing, the wrong kind, not permitted; 1 otherwise: disk full, I/O error). Each becomes one ``error:``
line on stderr, never a traceback. docs/cli.md has the table for users.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from os import PathLike
from typing import TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# OSErrors that say the path the user gave is unusable (bad input), not that the machine failed.
_PATH_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENAMETOOLONG, errno.ELOOP,
})

T = TypeVar("T")


class CommandError(Exception):
    """A refusal or failure a command words itself: printed as ``error: <message>``, exits ``code``."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def os_error_code(exc: OSError) -> int:
    """2 when the path given cannot be used (missing, wrong kind, no permission), 1 otherwise (disk full)."""
    return EXIT_BAD_INPUT if exc.errno in _PATH_ERRNOS else EXIT_FAILED


def run_exit_code(run_dir: str | PathLike) -> int:
    """A finished run's code from its run.json status: 0 finished, 130 interrupted, 1 otherwise."""
    from hemorrhage_core.runs import load_run_json

    status = load_run_json(run_dir).get("status")
    return EXIT_OK if status == "finished" else EXIT_INTERRUPTED if status == "interrupted" else EXIT_FAILED


def run_reporting_errors(work: Callable[[], T]) -> T | int:
    """``work()``'s result, or the exit code of the table above after one line on stderr.

    Anything not in the table is a bug and keeps its traceback. Tears down torch.distributed when a
    process group was started (a rank must not hang its peers on the way out).
    """
    from hemorrhage_core.errors import HemorrhageError

    try:
        return work()
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (HemorrhageError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return os_error_code(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # Only a command that loaded torch.distributed can have a process group; the others stay light.
        if "torch.distributed" in sys.modules:
            from training.distributed import cleanup

            cleanup()
