"""The preprocessed slice cache: windowed uint8 (N, C, S, S) in a memory-mapped ``.npy`` file.

A cache folder ``<root>/<SlicePrep key>-<ids digest>/`` holds ``slices.npy`` and ``cache.json``
(format version, the preprocessing (``SlicePrep.to_dict``), the ordered image ids and their paths, the
source signature and the ids that failed to decode). The root is ``DATA/.cache`` when writable, else the user cache
directory, or a folder the caller gives.

A cache is built in a hidden temporary folder and renamed into place only once complete, so a crash
never leaves a folder that is later trusted. It is reused by any request with the same size and
windows whose ids it covers (the full-data cache serves the train and validation subsets), and
rebuilt when the preprocessing (size, windows, head crop), its version (``PREPROCESS_VERSION``, 1 when
absent) or a source file's size/mtime change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.header_index import default_workers, fallback_dir
from hemorrhage_core.data.labels_table import describe_ids
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.fileio import fsync_file, write_fsynced
from hemorrhage_core.preprocess import SlicePrep
from hemorrhage_core.windowing import WindowStack

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ARRAY_FILE = "slices.npy"
SIDECAR_FILE = "cache.json"
_BUILDING_PREFIX = ".building-"
_STALE_PREFIX = ".stale-"


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
        ``verify`` re-checks the size/mtime of every cached source file before reuse.
        """
        if index.empty:
            raise DatasetError("cannot build a slice cache for an empty index")
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
        return cls._build_into(root, key, data, ids, paths, prep, workers, progress)

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
    def _build_into(cls, root, key, data, ids, paths, prep, workers, progress) -> SliceCache:
        shape = (len(ids), prep.channels, prep.image_size, prep.image_size)
        needed = int(np.prod(shape))
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        free = shutil.disk_usage(root).free
        if needed > free:
            raise DatasetError(
                f"the slice cache needs {needed / 1e9:.1f} GB but {root} has {free / 1e9:.1f} GB free; "
                "choose a smaller image size, a subset, or another --cache-dir"
            )
        signature = source_signature(data, ids, paths)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_BUILDING_PREFIX}{os.getpid()}-", dir=root))
        try:
            array = np.lib.format.open_memmap(tmp / ARRAY_FILE, mode="w+", dtype=np.uint8, shape=shape)
            del array  # header written; workers open the file themselves
            failed = _fill(tmp / ARRAY_FILE, data, paths, ids, prep, workers, progress)
            fsync_file(tmp / ARRAY_FILE)
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
                "source_signature": signature,
                "failed": failed,
            }
            _write_json(tmp / SIDECAR_FILE, meta)
            return cls.open(_publish(tmp, root / key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

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
    """Where caches are looked for, in order; a given ``cache_dir`` is the only place."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [Path(data_dir) / ".cache", fallback_dir(data_dir, "slices")]


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


def _fill(array_path, data, paths, ids, prep, workers, progress) -> dict[str, str]:
    """Decode and preprocess every slice into the array; return ``{image_id: reason}`` for failures."""
    from tqdm.auto import tqdm

    workers = default_workers() if workers is None else max(1, int(workers))
    items = [(pos, image_id, str(data / rel)) for pos, (image_id, rel) in enumerate(zip(ids, paths, strict=True))]
    chunk = max(8, min(256, len(items) // (workers * 8) or 1))
    jobs = [(str(array_path), prep, items[i : i + chunk]) for i in range(0, len(items), chunk)]
    failed: dict[str, str] = {}
    with tqdm(total=len(items), unit="slice", desc=f"caching slices at {prep.image_size}px", disable=not progress) as bar:
        if workers == 1 or len(jobs) == 1:
            results = map(_fill_chunk, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)))
            results = pool.map(_fill_chunk, jobs)
        try:
            for done, chunk_failed in results:
                failed.update(chunk_failed)
                bar.update(done)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    if failed:
        log.warning(
            "%d slices could not be decoded and are left out of the cache: %s",
            len(failed),
            describe_ids(sorted(failed)),
        )
    return dict(sorted(failed.items()))


def _fill_chunk(job: tuple[str, SlicePrep, list[tuple[int, str, str]]]) -> tuple[int, dict[str, str]]:
    import torch

    from hemorrhage_core.dicom import read_slice

    array_path, prep, items = job
    torch.set_num_threads(1)  # one process per core already
    array = np.load(array_path, mmap_mode="r+")
    failed: dict[str, str] = {}
    for pos, image_id, path in items:
        try:
            array[pos] = prep(read_slice(path, image_id=image_id).hu)
        except (DicomReadError, OSError) as exc:
            failed[image_id] = str(exc) or type(exc).__name__
    array.flush()
    del array
    return len(items), failed


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


def _remove_abandoned(root: Path) -> None:
    """Delete temporary folders of builds whose process is gone (a crash mid-build)."""
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
