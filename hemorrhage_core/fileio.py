"""Durable file writes, in one place for run records, checkpoints and the slice cache.

``atomic_file`` (and ``atomic_write_bytes`` / ``atomic_write_text`` over it) writes a temporary file in the
target's folder, fsyncs it, renames it over the target and fsyncs the folder: a reader or a crash sees the
old file or the new one, never a part. ``write_fsynced`` and ``fsync_file`` are for files inside a folder
that is itself published by one rename (the slice cache's build folder), so each need not be atomic.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO, BinaryIO

# Temporary files of atomic_file: mkstemp's ".<file name>.<8 random characters>.tmp", in the same folder.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def fsync_handle(fh: IO) -> None:
    """Flush ``fh`` and fsync its file: what was written is on disk when this returns."""
    fh.flush()
    os.fsync(fh.fileno())


def fsync_file(path: str | PathLike) -> None:
    """fsync a file written by other handles or processes (a memory map filled by workers)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(directory: str | PathLike) -> None:
    """fsync a folder, making a rename or a new entry in it durable; best effort."""
    # Some file systems refuse to open (or fsync) a directory: the rename is then as durable as they allow.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_fsynced(path: str | PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` in place, flushed and fsynced (not atomic: see the module docstring)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fsync_handle(fh)


@contextmanager
def atomic_file(path: str | PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears under ``path`` only once complete: readers see the old file or the
    new one, never a part.

    What is written goes to a temporary file in the same folder, is fsynced, then renamed over ``path``.
    On any failure (disk full included) the temporary file is removed and ``path`` is untouched; only a
    killed process leaves one behind (``remove_temp_files``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fsync_handle(fh)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | PathLike, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def remove_temp_files(folder: str | PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_file`` calls of a killed process left directly in ``folder``
    (not in its sub-folders) and return them; a missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
