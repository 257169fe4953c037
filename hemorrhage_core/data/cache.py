"""The preprocessed slice cache: windowed uint8 (N, C, S, S) in a memory-mapped ``.npy`` file.

A cache folder ``<root>/<SlicePrep key>-<ids digest>/`` holds ``slices.npy`` and ``cache.json``
(format version, the preprocessing (``SlicePrep.to_dict``), the ordered image ids and their paths, the
source signature and the ids that failed to decode). The root (``cache_roots``) is a folder the caller
gives; else ``$HEMORRHAGE_CT_CACHE/slices/<digest of DATA's path>`` when that variable is set; else
``DATA/.cache`` when writable, then the same folder under the user cache directory.

A cache is built in the hidden folder ``<root>/.partial-<key>`` and renamed into place only once complete,
so a crash never leaves a folder that is later trusted. The build is resumable: it fills the array in
fixed chunks of rows, each worker writing its own rows with ``O_DSYNC`` (no flush of the whole mapping),
and the parent appends one fsynced line per finished chunk to ``progress.log``. A rerun after a kill
(same data, settings and source files, per ``plan.json``) redoes only the unrecorded chunks; the result
is byte for byte the one an uninterrupted build writes. One process builds a given cache at a time (a
lock file ``<root>/.lock-<key>``). Before writing, the build checks that the disk keeps
``free_space_margin`` (1 GiB or 2% of the cache, the larger) free; a disk that fills up anyway ends in
one ``OSError`` (ENOSPC) naming what to do, and the finished chunks are kept.

A cache is reused by any request with the same size and windows whose ids it covers (the full-data
cache serves the train and validation subsets), and rebuilt when the preprocessing (size, windows, head
crop), its version (``PREPROCESS_VERSION``, 1 when absent) or a source file's size/mtime change.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.header_index import default_workers, fallback_dir
from hemorrhage_core.data.labels_table import describe_ids
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    fsync_handle,
    write_fsynced,
)
from hemorrhage_core.preprocess import SlicePrep
from hemorrhage_core.windowing import WindowStack

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ARRAY_FILE = "slices.npy"
SIDECAR_FILE = "cache.json"
PLAN_FILE = "plan.json"  # in a partial build: what is being built (checked before resuming)
PROGRESS_FILE = "progress.log"  # in a partial build: one JSON line per finished chunk
CACHE_ENV = "HEMORRHAGE_CT_CACHE"
_PARTIAL_PREFIX = ".partial-"
_LOCK_PREFIX = ".lock-"
_BUILDING_PREFIX = ".building-"  # temporary folders of older versions (not resumable)
_STALE_PREFIX = ".stale-"
_CHUNK_BYTES = 32 << 20
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class SliceCache:
    """A built cache; ``read(position)`` / ``get(image_id)`` return uint8 (C, S, S) arrays.

    The memory map is opened lazily in each process and never pickled, so DataLoader workers share
    the page cache instead of copying the array.
    """

    def __init__(self, directory: str | PathLike, meta: dict) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self.prep = SlicePrep.from_dict(meta.get("prep") or meta)
        self.image_size: int = self.prep.image_size
        self.windows: WindowStack = self.prep.windows
        self.ids: tuple[str, ...] = tuple(meta["ids"])
        self.failed: dict[str, str] = dict(meta.get("failed", {}))
        self._position = {image_id: i for i, image_id in enumerate(self.ids)}
        self._array: np.ndarray | None = None

    # -- opening and building ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | PathLike) -> SliceCache:
        """Open a cache folder; raises DatasetError if it is not a complete cache of this format."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / SIDECAR_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{directory} is not a slice cache: {exc}") from exc
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise DatasetError(f"{directory} holds a cache of another format ({meta.get('format_version')})")
        if not (directory / ARRAY_FILE).is_file():
            raise DatasetError(f"{directory} lacks {ARRAY_FILE}")
        return cls(directory, meta)

    @classmethod
    def build(
        cls,
        index: pd.DataFrame,
        data_dir: str | PathLike,
        *,
        prep: SlicePrep,
        cache_dir: str | PathLike | None = None,
        workers: int | None = None,
        rebuild: bool = False,
        verify: bool = True,
        progress: bool = True,
    ) -> SliceCache:
        """Return a fresh cache covering ``index`` (columns ``image_id``, ``path``), building it if needed.

        Slices that fail to decode are skipped, recorded in ``failed`` and logged; never fatal.
        ``verify`` re-checks the size/mtime of every cached source file before reuse. An unfinished
        build of the same cache (a killed process) is continued, unless ``rebuild``. ``cache_dir`` is
        the one folder to use (see ``cache_roots`` for the default places).
        Raises DatasetError when the disk lacks room (the margin included) or no place is writable,
        and OSError (ENOSPC) when the disk fills up during the build.
        """
        if index.empty:
            raise DatasetError("cannot build a slice cache for an empty index")
        prep = prep.per_slice()  # entries are single slices; a 2.5D stack is assembled when read
        data = Path(data_dir)
        ids = index["image_id"].astype(str).tolist()
        paths = index["path"].astype(str).tolist()
        if len(set(ids)) != len(ids):
            raise DatasetError("the index has duplicate image ids")
        key = cache_key(prep, ids)
        roots = cache_roots(data, cache_dir)
        if not rebuild:
            found = cls._find(roots, data, key, prep, ids, paths, verify)
            if found is not None:
                log.info("reusing the slice cache at %s", found.directory)
                return found
        root = _first_writable(roots)
        if root is None:
            raise DatasetError(f"no writable place for the slice cache among {[str(r) for r in roots]}")

        def recheck() -> SliceCache | None:
            return None if rebuild else cls._find(roots, data, key, prep, ids, paths, verify)

        return cls._build_into(root, key, data, ids, paths, prep, workers, progress, rebuild=rebuild, recheck=recheck)

    @classmethod
    def _find(cls, roots, data, key, prep, ids, paths, verify) -> SliceCache | None:
        wanted = dict(zip(ids, paths, strict=True))
        prefix = key.rsplit("-", 1)[0] + "-"
        candidates: list[SliceCache] = []
        for root in roots:
            if not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if not folder.name.startswith(prefix):
                    continue
                try:
                    cache = cls.open(folder)
                except DatasetError:
                    continue
                same_config = cache.prep.key() == prep.key() and cache.meta.get("preprocess_version") == preprocess_version()
                cached_paths = dict(zip(cache.ids, cache.meta["paths"], strict=True))
                covers = all(cached_paths.get(i) == p for i, p in wanted.items())
                if same_config and covers:
                    candidates.append(cache)
        # The exact cache first, then the smallest superset.
        candidates.sort(key=lambda c: (c.directory.name != key, len(c.ids)))
        for cache in candidates:
            if not verify or cache.meta["source_signature"] == source_signature(data, cache.ids, cache.meta["paths"]):
                return cache
            log.info("the slice cache at %s is stale (source files changed)", cache.directory)
        return None

    @classmethod
    def _build_into(cls, root, key, data, ids, paths, prep, workers, progress, *, rebuild=False, recheck=None) -> SliceCache:
        """Build (or finish building) the cache ``key`` in ``root/.partial-<key>`` and publish it."""
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root, key)
        with _build_lock(root / f"{_LOCK_PREFIX}{key}") as waited:
            # Another process held the lock: it may have published this cache meanwhile.
            if waited and recheck is not None:
                found = recheck()
                if found is not None:
                    return found
            partial = root / f"{_PARTIAL_PREFIX}{key}"
            try:
                return cls._build_locked(root, partial, key, data, ids, paths, prep, workers, progress, rebuild)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                kept = _rows_recorded(partial)
                raise OSError(
                    exc.errno,
                    f"the disk under {root} filled up while building the slice cache ({kept} of {len(ids)} slices "
                    f"kept in {partial.name}; a rerun continues from there): free space, or give another "
                    f"--cache-dir / {CACHE_ENV}, or a smaller image size",
                ) from None

    @classmethod
    def _build_locked(cls, root, partial, key, data, ids, paths, prep, workers, progress, rebuild) -> SliceCache:
        shape = (len(ids), prep.channels, prep.image_size, prep.image_size)
        plan = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "prep": prep.to_dict(),
            "preprocess_version": preprocess_version(),
            "shape": list(shape),
            "sources": _sources_digest(ids, paths),
            "source_signature": source_signature(data, ids, paths),
            "chunk_rows": chunk_rows(len(ids), int(np.prod(shape[1:]))),
        }
        done = None if rebuild else _resume_state(partial, plan)
        if done is None:
            shutil.rmtree(partial, ignore_errors=True)
            _check_free_space(root, int(np.prod(shape)), int(np.prod(shape)))
            partial.mkdir()
            _create_array(partial / ARRAY_FILE, shape)
            atomic_write_text(partial / PLAN_FILE, json.dumps(plan))
            fsync_dir(root)
            done = {}
        else:
            plan = json.loads((partial / PLAN_FILE).read_text())  # its chunk size rules the rest
            total = int(np.prod(shape))
            _check_free_space(root, max(0, total - _allocated(partial / ARRAY_FILE)), total)
            log.info("resuming the slice cache build in %s: %d of %d chunks done", partial,
                     len(done), _n_chunks(len(ids), plan["chunk_rows"]))
        failed = _fill(partial / ARRAY_FILE, partial / PROGRESS_FILE, data, paths, ids, prep, workers, progress,
                       plan["chunk_rows"], done)
        fsync_file(partial / ARRAY_FILE)
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "image_size": prep.image_size,
            "windows": prep.windows.to_list(),
            "windows_key": prep.windows.key(),
            "prep": prep.to_dict(),
            "preprocess_version": preprocess_version(),
            "shape": list(shape),
            "ids": ids,
            "paths": paths,
            "source_signature": plan["source_signature"],
            "failed": failed,
        }
        _write_json(partial / SIDECAR_FILE, meta)
        for name in (PLAN_FILE, PROGRESS_FILE):
            (partial / name).unlink(missing_ok=True)
        return cls.open(_publish(partial, root / key))

    # -- reading -------------------------------------------------------------------------------

    @property
    def array(self) -> np.ndarray:
        """The read-only memory map (N, C, S, S), opened on first use in this process."""
        if self._array is None:
            self._array = np.load(self.directory / ARRAY_FILE, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._position

    def positions(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row of each id in the array, -1 where the cache does not hold it."""
        return np.array([self._position.get(i, -1) for i in image_ids], dtype=np.int64)

    def read(self, position: int) -> np.ndarray:
        """uint8 (C, S, S) copy of one row (a copy: torch wants writable memory)."""
        return np.array(self.array[position])

    def get(self, image_id: str) -> np.ndarray:
        if image_id in self.failed:
            raise DatasetError(f"{image_id} failed to decode when the cache was built: {self.failed[image_id]}")
        return self.read(self._position[image_id])

    def usable(self, index: pd.DataFrame) -> pd.DataFrame:
        """Rows of ``index`` the cache holds and decoded successfully."""
        ids = index["image_id"].astype(str)
        return index[ids.isin(self._position) & ~ids.isin(self.failed)]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __repr__(self) -> str:
        return f"SliceCache({str(self.directory)!r}, n={len(self.ids)}, failed={len(self.failed)})"


def usable_index(index: pd.DataFrame, cache: SliceCache) -> pd.DataFrame:
    """The rows of ``index`` a built cache can serve (failed decodes and absent ids removed)."""
    return cache.usable(index)


def preprocess_version() -> int:
    """Version of the shared preprocessing; a cache made by another version is not reused."""
    from hemorrhage_core import preprocess

    return int(getattr(preprocess, "PREPROCESS_VERSION", 1))


def cache_key(prep: SlicePrep, ids: Sequence[str]) -> str:
    """Folder name: ``<SlicePrep key>-<12 hex of the ordered ids>``."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._]+", "_", prep.key())
    return f"{safe}-{digest}"


def cache_roots(data_dir: str | PathLike, cache_dir: str | PathLike | None = None) -> list[Path]:
    """Where caches are looked for, in order: a given ``cache_dir`` is the only place; else, when the
    environment sets ``HEMORRHAGE_CT_CACHE``, ``slice_cache_dir(data_dir)`` under it is; else
    ``DATA/.cache``, then ``slice_cache_dir(data_dir)`` under the user cache directory."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    if os.environ.get(CACHE_ENV):
        return [slice_cache_dir(data_dir)]
    return [Path(data_dir) / ".cache", slice_cache_dir(data_dir)]


def slice_cache_dir(data_dir: str | PathLike, root: str | PathLike | None = None) -> Path:
    """``<root>/slices/<digest of DATA's absolute path>``: the caches of one data set under a cache root
    (default: ``HEMORRHAGE_CT_CACHE``, else the user cache directory)."""
    return fallback_dir(data_dir, "slices", root=root)


def source_signature(data_dir: Path, ids: Sequence[str], paths: Sequence[str]) -> str:
    """SHA-256 over ``(id, path, size, mtime_ns)`` of every source file; missing files count too."""
    digest = hashlib.sha256()
    for image_id, rel in zip(ids, paths, strict=True):
        try:
            st = os.stat(data_dir / rel)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{image_id}\t{rel}\t{stamp}\n".encode())
    return digest.hexdigest()


# -- build helpers ---------------------------------------------------------------------------------


def chunk_rows(n_rows: int, row_bytes: int) -> int:
    """Rows per build chunk: 8 to 256, at most 32 MiB, and never dependent on the worker count, so a
    build resumed with other ``--workers`` finds the same chunks."""
    return max(1, min(256, max(8, n_rows // 64), _CHUNK_BYTES // max(1, row_bytes)))


def free_space_margin(needed: int) -> int:
    """Bytes the build leaves free beyond the cache itself: 1 GiB or 2% of the cache, the larger."""
    return max(1 << 30, needed // 50)


def _n_chunks(n_rows: int, rows: int) -> int:
    return -(-n_rows // rows)


def _check_free_space(root: Path, needed: int, total: int) -> None:
    """Refuse to start when ``needed`` more bytes (of a ``total``-byte cache) would eat into the margin."""
    free = shutil.disk_usage(root).free
    margin = free_space_margin(total)
    if needed + margin > free:
        raise DatasetError(
            f"the slice cache needs {needed / 1e9:.1f} GB (and keeps {margin / 1e9:.1f} GB free) but {root} has "
            f"{free / 1e9:.1f} GB free; choose a smaller image size, a subset, or another --cache-dir / {CACHE_ENV}"
        )


def _allocated(path: Path) -> int:
    """Bytes the file already occupies on disk (the sparse array grows as chunks are written)."""
    try:
        return os.stat(path).st_blocks * 512
    except (OSError, AttributeError):
        return 0


def _sources_digest(ids: Sequence[str], paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for image_id, rel in zip(ids, paths, strict=True):
        digest.update(f"{image_id}\t{rel}\n".encode())
    return digest.hexdigest()


def _create_array(path: Path, shape: tuple[int, ...]) -> None:
    """The ``.npy`` header and a sparse body of zeros (rows that fail to decode stay zero)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del array
    fsync_file(path)  # the header and the file's length


def _data_offset(path: Path) -> int:
    """Byte offset of the first row in a ``.npy`` file."""
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
        return fh.tell()


def _resume_state(partial: Path, plan: dict) -> dict[int, dict[str, str]] | None:
    """``{chunk: failed ids}`` of an unfinished build of the same plan, or None when there is nothing to
    resume (no folder, another plan, source files changed, a damaged file)."""
    try:
        old = json.loads((partial / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    wanted = json.loads(json.dumps(plan))  # as read back (tuples become lists)
    same = {k: v for k, v in old.items() if k != "chunk_rows"} == {k: v for k, v in wanted.items() if k != "chunk_rows"}
    if not same or not isinstance(old.get("chunk_rows"), int) or old["chunk_rows"] < 1:
        log.info("discarding the unfinished slice cache build in %s (made for other data or settings)", partial)
        return None
    shape = tuple(plan["shape"])
    try:
        size_ok = os.path.getsize(partial / ARRAY_FILE) == _data_offset(partial / ARRAY_FILE) + int(np.prod(shape))
    except (OSError, ValueError):
        size_ok = False
    if not size_ok:
        return None
    return _read_progress(partial / PROGRESS_FILE, _n_chunks(shape[0], old["chunk_rows"]))


def _read_progress(path: Path, n_chunks: int, *, repair: bool = True) -> dict[int, dict[str, str]]:
    """The finished chunks recorded in ``path``; a torn last line (a kill mid-append) is cut off the
    file with ``repair``, so the next line appended starts on a line of its own."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    done: dict[int, dict[str, str]] = {}
    kept = 0
    for line in raw.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            record = json.loads(line)
            chunk = int(record["chunk"])
            failed = {str(k): str(v) for k, v in record["failed"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            break
        if not 0 <= chunk < n_chunks:
            break
        done[chunk] = failed
        kept += len(line) + 1
    if repair and kept != len(raw):
        atomic_write_bytes(path, raw[:kept])
    return done


def _rows_recorded(partial: Path) -> int:
    try:
        plan = json.loads((partial / PLAN_FILE).read_text())
        done = _read_progress(partial / PROGRESS_FILE, _n_chunks(plan["shape"][0], plan["chunk_rows"]), repair=False)
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    rows, n = plan["chunk_rows"], plan["shape"][0]
    return sum(min(rows, n - c * rows) for c in done)


def _fill(array_path, progress_path, data, paths, ids, prep, workers, progress, rows_per_chunk, done) -> dict[str, str]:
    """Decode and preprocess every slice of the chunks not in ``done`` into the array, recording each
    finished chunk in ``progress_path``; return ``{image_id: reason}`` for the failures of all chunks."""
    from tqdm.auto import tqdm

    workers = default_workers() if workers is None else max(1, int(workers))
    n = len(ids)
    offset = _data_offset(array_path)
    row_bytes = int(np.prod((prep.channels, prep.image_size, prep.image_size)))
    jobs = []
    for chunk, start in enumerate(range(0, n, rows_per_chunk)):
        if chunk in done:
            continue
        stop = min(n, start + rows_per_chunk)
        items = [(image_id, str(data / rel)) for image_id, rel in zip(ids[start:stop], paths[start:stop], strict=True)]
        jobs.append((str(array_path), offset + start * row_bytes, prep, chunk, items))
    failed: dict[str, str] = {}
    for chunk_failed in done.values():
        failed.update(chunk_failed)
    finished_rows = n - sum(len(job[4]) for job in jobs)
    desc = f"caching slices at {prep.image_size}px"
    with tqdm(total=n, initial=finished_rows, unit="slice", desc=desc, disable=not progress) as bar, \
            open(progress_path, "ab") as record:

        def finished(chunk: int, count: int, chunk_failed: dict[str, str]) -> None:
            # The chunk's rows are on disk (written with O_DSYNC) before this line says so.
            record.write(json.dumps({"chunk": chunk, "failed": chunk_failed}).encode() + b"\n")
            fsync_handle(record)
            failed.update(chunk_failed)
            bar.update(count)

        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                finished(*_fill_chunk(job))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = [pool.submit(_fill_chunk, job) for job in jobs]
                try:
                    for future in as_completed(futures):
                        finished(*future.result())
                finally:
                    for future in futures:
                        future.cancel()
    if failed:
        log.warning(
            "%d slices could not be decoded and are left out of the cache: %s",
            len(failed),
            describe_ids(sorted(failed)),
        )
    return dict(sorted(failed.items()))


def _fill_chunk(job: tuple[str, int, SlicePrep, int, list[tuple[str, str]]]) -> tuple[int, int, dict[str, str]]:
    """Preprocess one chunk's slices and write its rows, and only those, durably into the array."""
    import torch

    from hemorrhage_core.dicom import read_slice

    array_path, offset, prep, chunk, items = job
    torch.set_num_threads(1)  # one process per core already
    rows = np.zeros((len(items), prep.channels, prep.image_size, prep.image_size), dtype=np.uint8)
    failed: dict[str, str] = {}
    for i, (image_id, path) in enumerate(items):
        try:
            rows[i] = prep(read_slice(path, image_id=image_id).hu)
        except (DicomReadError, OSError) as exc:
            failed[image_id] = str(exc) or type(exc).__name__
    # O_DSYNC: the write returns once these rows are on disk, without flushing the other workers' rows.
    fd = os.open(array_path, os.O_WRONLY | getattr(os, "O_DSYNC", 0))
    try:
        view = memoryview(rows).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)
    finally:
        os.close(fd)
    return chunk, len(items), failed


@contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (one builder per cache); yields True when another process
    held it first. A file system without locks gets a warning and no lock."""
    with open(path, "a+b") as fh:
        waited = False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building this slice cache (%s); waiting for it", path.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = True
        except OSError as exc:
            log.warning("cannot lock %s (%s): concurrent builds of this cache are not prevented", path, exc)
        yield waited  # the lock goes with the file's closing


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished ``tmp`` to ``final``; return the folder to use (another writer may have won)."""
    if final.exists():
        aside = final.with_name(f"{_STALE_PREFIX}{final.name}-{os.getpid()}")
        try:
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        os.rename(tmp, final)
    except OSError:
        # A concurrent build (another rank) published first: keep theirs if it is complete.
        shutil.rmtree(tmp, ignore_errors=True)
        SliceCache.open(final)
    return final


def _write_json(path: Path, data: dict) -> None:
    # In place: the build folder holding it is published by one rename (_publish).
    write_fsynced(path, json.dumps(data).encode())


def _first_writable(roots: list[Path]) -> Path | None:
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
                pass
        except OSError:
            continue
        return root
    return None


def _remove_abandoned(root: Path, key: str) -> None:
    """Delete the temporary folders of older versions' builds whose process is gone and the set-aside
    stale caches. Unfinished resumable builds (``.partial-*``) are kept for their next run; those of
    other settings than ``key`` are named, with the space they hold."""
    for folder in root.glob(f"{_PARTIAL_PREFIX}*"):
        if folder.name != f"{_PARTIAL_PREFIX}{key}":
            log.info("an unfinished slice cache build holds %.1f GB in %s; a build with its settings continues "
                     "it, or delete it", _allocated(folder / ARRAY_FILE) / 1e9, folder)
    for folder in root.glob(f"{_BUILDING_PREFIX}*"):
        pid_text = folder.name[len(_BUILDING_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
    for folder in root.glob(f"{_STALE_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
