"""The run's writer lock: one live process at a time writes a run directory."""

from __future__ import annotations

import errno
import json
import os
import weakref
from os import PathLike
from pathlib import Path

from hemorrhage_core.runs.records import RUN_JSON, WRITER_LOCK, RunBusyError

_held_lock_fds: set[int] = set()  # lock descriptors this process holds, closed in forked children


def _close_held_locks_in_child() -> None:
    # A DataLoader worker (or any fork) must not keep a run's lock alive after its trainer dies.
    for fd in _held_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _unlock(fd: int) -> None:
    _held_lock_fds.discard(fd)
    os.close(fd)


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``RUN_DIR/.writer.lock``, held while a process writes a run.

    ``flock`` belongs to the open file, so reading the lock file elsewhere in the process cannot drop it
    (as it would a POSIX lock), and a second writer in the same process is refused too. Forked children
    (DataLoader workers) close their copy at once and the descriptor is close-on-exec, so the lock lives
    exactly as long as its owner: a killed trainer's run can be resumed straight away. Released by
    ``release()``, on garbage collection, or when the process ends.
    """

    def __init__(self, fd: int | None):
        self._finalizer = weakref.finalize(self, _unlock, fd) if fd is not None else None

    @classmethod
    def acquire(cls, run_dir: str | PathLike) -> WriterLock:
        """Take the run's lock, or raise RunBusyError naming the process that holds it (from run.json)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return cls(None)
        path = Path(run_dir)
        fd = os.open(path / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = ""
            try:
                writer = json.loads((path / RUN_JSON).read_text(encoding="utf-8")).get("writer") or {}
                holder = f" (process {writer.get('pid')} on {writer.get('host')}, by its run.json)"
            except (OSError, ValueError, AttributeError):
                pass
            raise RunBusyError(
                f"run {path.name} is being written by another process{holder}; "
                "wait for it to end or stop it, then resume"
            ) from None
        _held_lock_fds.add(fd)
        return cls(fd)

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes once; later calls do nothing

