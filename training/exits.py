"""Exit codes and the error handling shared by the commands that train (train, pipeline)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")


def run_reporting_errors(work: Callable[[], T], *, failed: tuple[type[BaseException], ...] = ()) -> T | int:
    """``work()``'s result, or the exit code after a one-line message on stderr (no traceback).

    Bad input (config, data, checkpoints) exits 2; an operating-system failure such as a full disk
    exits 1 (the run itself is already marked failed, its last good checkpoint kept); Ctrl-C exits 130.
    Anything else is a bug and keeps its traceback. Always tears down torch.distributed.
    """
    from hemorrhage_core.errors import HemorrhageError
    from training.config import ConfigError
    from training.distributed import cleanup

    try:
        return work()
    except failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ConfigError, HemorrhageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        cleanup()
