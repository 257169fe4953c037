"""The data-set index: labels joined with a header-only scan of every DICOM file, saved and reused.

Layout (RSNA): ``DATA/stage_2_train/ID_<hex>.dcm`` and ``DATA/stage_2_train.csv``. The index is saved
as ``DATA/index.parquet`` (or, when DATA is read-only, under the user cache directory) with its
freshness signature and its report inside the parquet schema metadata, so table and signature are
replaced together in one atomic rename.

Fresh means: same index format version, same sorted list of ``(file name, size, mtime_ns)`` of the
``.dcm`` files in the image folder, and the same SHA-256 of the label CSV's bytes. Listing the folder
and hashing the CSV take seconds on 750k files; re-reading the headers takes far longer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.labels_table import describe_ids, read_labels
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.labels import LABELS, SUBTYPES

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.parquet"
LABEL_CSV = "stage_2_train.csv"
IMAGE_DIR = "stage_2_train"
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
_METADATA_KEY = b"hemorrhage_ct.index"
_APP_NAME = "hemorrhage-ct"

# Header fields copied from hemorrhage_core.dicom.SliceMeta into the index.
HEADER_COLUMNS: tuple[str, ...] = ("patient_id", "study_uid", "series_uid", "z", "modality", "rows", "columns")
INDEX_COLUMNS: tuple[str, ...] = (
    ("image_id", "path") + HEADER_COLUMNS[:4] + ("slice_rank",) + HEADER_COLUMNS[4:] + LABELS + ("stage1_class",)
)


@dataclass(frozen=True)
class IndexReport:
    """What the index holds and what was left out; JSON-friendly (``to_dict``/``from_dict``)."""

    data_dir: str
    n_listed: int  # images in the label CSV (or files found, for an unlabeled folder)
    n_images: int  # rows in the index
    n_patients: int
    n_studies: int
    n_series: int
    positives: dict[str, int]  # per label; empty for an unlabeled folder
    missing_ids: tuple[str, ...] = ()  # listed in the CSV, no file
    unreadable: dict[str, str] = field(default_factory=dict)  # image id -> why the header was refused
    unlisted_files: int = 0  # DICOM files with no label rows: not indexed
    label_notes: tuple[str, ...] = ()  # duplicate / conflicting / any-mismatch findings of the CSV
    any_mismatch_ids: tuple[str, ...] = ()
    reused: bool = False  # True when a fresh saved index was loaded instead of scanning
    index_path: str | None = None  # where the index was saved (None: not saved)

    @property
    def left_out(self) -> int:
        return len(self.missing_ids) + len(self.unreadable)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["missing_ids"] = list(self.missing_ids)
        out["any_mismatch_ids"] = list(self.any_mismatch_ids)
        out["label_notes"] = list(self.label_notes)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> IndexReport:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("missing_ids", "any_mismatch_ids", "label_notes"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)


@dataclass(frozen=True)
class DataIndex:
    """The index table (one row per usable image, columns ``INDEX_COLUMNS``) and its report."""

    table: pd.DataFrame
    report: IndexReport


def default_workers() -> int:
    """Processes to use by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def user_cache_root() -> Path:
    """Per-user cache folder for indexes and slice caches of read-only data sets."""
    override = os.environ.get("HEMORRHAGE_CT_CACHE")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir(_APP_NAME))


def fallback_dir(data_dir: str | PathLike, kind: str, root: str | PathLike | None = None) -> Path:
    """``<root, default the user cache>/<kind>/<digest of the data folder's absolute path>``: one place
    per data set."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return (user_cache_root() if root is None else Path(root)) / kind / digest


def build_index(
    data_dir: str | PathLike,
    *,
    workers: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    csv_name: str = LABEL_CSV,
    image_dir: str = IMAGE_DIR,
) -> DataIndex:
    """Return the index of an RSNA-layout data set, reusing the saved one while it is fresh.

    Images listed in the CSV but missing, or whose header is refused, are left out and reported
    (``report.missing_ids``, ``report.unreadable`` and a logged warning); neither is fatal.
    Raises DatasetError when the folder, the CSV or the image folder is absent or nothing is usable.
    """
    data = Path(data_dir)
    csv_path, images = data / csv_name, data / image_dir
    if not data.is_dir():
        raise DatasetError(f"data folder not found: {data}")
    if not csv_path.is_file():
        raise DatasetError(f"no label file {csv_name} in {data}; for a folder without labels use index_folder()")
    if not images.is_dir():
        raise DatasetError(f"no image folder {image_dir}/ in {data}")

    listing = _list_files(images, DICOM_SUFFIXES)
    signature = _signature(listing, _sha256_file(csv_path))
    if not rebuild:
        saved = _load_if_fresh(data, signature)
        if saved is not None:
            log.info("reusing the index at %s (fresh)", saved.report.index_path)
            _warn_left_out(saved.report)
            return saved

    labels = read_labels(csv_path)
    files = {_stem(name): name for name, _, _ in listing}
    listed = labels.frame.index
    on_disk = listed.isin(list(files))
    present = listed[on_disk]
    missing = tuple(listed[~on_disk])
    unlisted = len(set(files) - set(listed))
    tasks = [(image_id, str(images / files[image_id]), f"{image_dir}/{files[image_id]}") for image_id in present]
    headers, unreadable = scan_headers(tasks, workers=workers, progress=progress)

    table = _assemble(headers, labels.frame)
    report = _report(
        data,
        table,
        n_listed=len(listed),
        missing_ids=missing,
        unreadable=unreadable,
        unlisted_files=unlisted,
        label_notes=labels.notes,
        any_mismatch_ids=labels.any_mismatch_ids,
    )
    if table.empty:
        raise DatasetError(
            f"no usable images in {data}: {report.n_listed} images with six labels listed, "
            f"{len(missing)} of them missing, {len(unreadable)} unreadable"
        )
    saved_to = _save(table, report, signature, data)
    report = replace(report, index_path=str(saved_to) if saved_to else None)
    _warn_left_out(report)
    return DataIndex(table, report)


def index_folder(
    folder: str | PathLike,
    *,
    workers: int | None = None,
    progress: bool = True,
    suffixes: Sequence[str] | None = DICOM_SUFFIXES,
    recursive: bool = True,
) -> DataIndex:
    """Index a folder of DICOM files without labels (predict / evaluate on a folder): labels are NaN.

    ``suffixes=None`` considers every file; files whose header is refused are reported, not fatal.
    Not saved: folders given for prediction are usually small and change often.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"folder not found: {root}")
    rel_paths = sorted(
        p.relative_to(root).as_posix()
        for p in (root.rglob("*") if recursive else root.iterdir())
        if p.is_file() and not p.name.startswith(".") and (suffixes is None or p.suffix.lower() in suffixes)
    )
    stems = [Path(r).stem for r in rel_paths]
    # Same stem in two sub-folders: fall back to the relative path so ids stay unique.
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    ids = [r.rsplit(".", 1)[0].replace("/", "__") if s in repeated else s for r, s in zip(rel_paths, stems, strict=True)]
    tasks = [(image_id, str(root / rel), rel) for image_id, rel in zip(ids, rel_paths, strict=True)]
    headers, unreadable = scan_headers(tasks, workers=workers, progress=progress)
    table = _assemble(headers, None)
    report = _report(root, table, n_listed=len(tasks), unreadable=unreadable)
    _warn_left_out(report)
    return DataIndex(table, report)


def scan_headers(
    tasks: Sequence[tuple[str, str, str]], *, workers: int | None = None, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read the headers (never the pixel data) of ``(image_id, absolute path, relative path)`` tasks.

    Runs over ``workers`` processes with a tqdm bar. Returns the header rows (``image_id``, ``path``
    and ``HEADER_COLUMNS``) and ``{image_id: reason}`` for the files whose header was refused.
    """
    from tqdm.auto import tqdm

    workers = default_workers() if workers is None else max(1, int(workers))
    # Chunks amortise inter-process overhead; several chunks per worker keep the bar moving.
    chunk = max(16, min(1024, len(tasks) // (workers * 8) or 1))
    chunks = [list(tasks[i : i + chunk]) for i in range(0, len(tasks), chunk)]
    rows: list[dict] = []
    unreadable: dict[str, str] = {}
    with tqdm(total=len(tasks), unit="file", desc="reading DICOM headers", disable=not progress) as bar:
        if workers == 1 or len(chunks) <= 1:
            results: Iterable[list] = map(_read_header_chunk, chunks)
            _collect(results, rows, unreadable, bar)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                _collect(pool.map(_read_header_chunk, chunks), rows, unreadable, bar)
    columns = ["image_id", "path", *HEADER_COLUMNS]
    return pd.DataFrame(rows, columns=columns), unreadable


def _collect(results: Iterable[list], rows: list[dict], unreadable: dict[str, str], bar) -> None:
    for chunk_result in results:
        for image_id, row, error in chunk_result:
            if error is None:
                rows.append(row)
            else:
                unreadable[image_id] = error
        bar.update(len(chunk_result))


def _read_header_chunk(tasks: list[tuple[str, str, str]]) -> list[tuple[str, dict | None, str | None]]:
    from hemorrhage_core.dicom import read_header

    out: list[tuple[str, dict | None, str | None]] = []
    for image_id, abs_path, rel_path in tasks:
        try:
            meta = read_header(abs_path, image_id=image_id)
        except (DicomReadError, OSError) as exc:
            out.append((image_id, None, str(exc) or type(exc).__name__))
            continue
        row = {"image_id": image_id, "path": rel_path}
        for name in HEADER_COLUMNS:
            row[name] = getattr(meta, name, None)
        out.append((image_id, row, None))
    return out


def _assemble(headers: pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """Join header rows with labels (or NaN labels), add slice order and the stage-1 class."""
    table = headers.copy()
    for name in ("patient_id", "study_uid", "series_uid", "modality"):
        # Missing grouping keys share one empty-string group: conservative, never splits a patient.
        table[name] = table[name].fillna("").astype(str)
    table["z"] = pd.to_numeric(table["z"], errors="coerce").astype(np.float64)
    for name in ("rows", "columns"):
        table[name] = pd.to_numeric(table[name], errors="coerce").fillna(0).astype(np.int32)
    if labels is not None:
        table = table.merge(labels.rename_axis("image_id").reset_index(), on="image_id", how="inner")
        for name in LABELS:
            table[name] = table[name].astype(np.int8)
        table["stage1_class"] = stage1_classes(table[list(SUBTYPES)].to_numpy())
    else:
        for name in LABELS:
            table[name] = np.float32(np.nan)
        table["stage1_class"] = pd.array([pd.NA] * len(table), dtype="Int8")
    table["slice_rank"] = (
        table.groupby("series_uid")["z"].rank(method="first", na_option="bottom").fillna(1).astype(np.int32) - 1
    )
    table = table.sort_values(["study_uid", "series_uid", "slice_rank", "image_id"], kind="stable")
    return table[list(INDEX_COLUMNS)].reset_index(drop=True)


def stage1_classes(subtype_flags: np.ndarray) -> np.ndarray:
    """(N, 5) subtype flags -> int8 stage-1 class: 0 none, 1 + subtype index, -1 for 2+ subtypes."""
    flags = np.asarray(subtype_flags) > 0
    count = flags.sum(axis=1)
    out = np.where(count == 0, 0, flags.argmax(axis=1) + 1)
    return np.where(count > 1, -1, out).astype(np.int8)


def _report(
    data: Path,
    table: pd.DataFrame,
    *,
    n_listed: int,
    missing_ids: tuple[str, ...] = (),
    unreadable: dict[str, str] | None = None,
    unlisted_files: int = 0,
    label_notes: tuple[str, ...] = (),
    any_mismatch_ids: tuple[str, ...] = (),
) -> IndexReport:
    labelled = table[LABELS[0]].dtype.kind in "iu"
    positives = {name: int(table[name].sum()) for name in LABELS} if labelled else {}
    return IndexReport(
        data_dir=str(data),
        n_listed=int(n_listed),
        n_images=len(table),
        n_patients=int(table["patient_id"].nunique()),
        n_studies=int(table["study_uid"].nunique()),
        n_series=int(table["series_uid"].nunique()),
        positives=positives,
        missing_ids=tuple(missing_ids),
        unreadable=dict(sorted((unreadable or {}).items())),
        unlisted_files=int(unlisted_files),
        label_notes=tuple(label_notes),
        any_mismatch_ids=tuple(any_mismatch_ids),
    )


def _warn_left_out(report: IndexReport) -> None:
    if report.missing_ids:
        log.warning(
            "%d listed images have no file and are left out: %s",
            len(report.missing_ids),
            describe_ids(report.missing_ids),
        )
    if report.unreadable:
        log.warning(
            "%d images have an unreadable header and are left out: %s",
            len(report.unreadable),
            describe_ids(list(report.unreadable)),
        )


# -- freshness and storage ---------------------------------------------------------------------


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _list_files(folder: Path, suffixes: Sequence[str]) -> list[tuple[str, int, int]]:
    """Sorted ``(name, size, mtime_ns)`` of the regular files in ``folder`` with one of ``suffixes``."""
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(tuple(suffixes)) and entry.is_file():
                st = entry.stat()
                out.append((entry.name, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(listing: list[tuple[str, int, int]], csv_digest: str) -> str:
    digest = hashlib.sha256(f"v{INDEX_FORMAT_VERSION}\n{csv_digest}\n".encode())
    for name, size, mtime in listing:
        digest.update(f"{name}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def index_locations(data_dir: str | PathLike) -> tuple[Path, Path]:
    """Where the index of ``data_dir`` is looked for: next to the data, then the user cache."""
    return Path(data_dir) / INDEX_FILE, fallback_dir(data_dir, "index") / INDEX_FILE


def read_index(path: str | PathLike) -> DataIndex:
    """The index saved at ``path`` as it is, with no freshness check (no listing of the image folder):
    for the other ranks of a distributed run once rank 0 has built or checked it. Raises DatasetError
    when the file is unreadable or of another format."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(_METADATA_KEY, b"{}"))
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"index format {meta.get('format_version')}, expected {INDEX_FORMAT_VERSION}")
        table = pq.read_table(path).to_pandas()
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the index {path}: {exc}") from exc
    report = IndexReport.from_dict({**meta["report"], "reused": True, "index_path": str(path)})
    return DataIndex(table, report)


def _load_if_fresh(data: Path, signature: str) -> DataIndex | None:
    import pyarrow.parquet as pq

    for path in index_locations(data):
        if not path.is_file():
            continue
        try:
            meta = json.loads((pq.read_schema(path).metadata or {}).get(_METADATA_KEY, b"{}"))
            if meta.get("signature") != signature or meta.get("format_version") != INDEX_FORMAT_VERSION:
                log.info("the index at %s is stale; rebuilding", path)
                continue
            table = pq.read_table(path).to_pandas()
        except (OSError, ValueError) as exc:  # unreadable or foreign file: rebuild rather than trust it
            log.warning("ignoring the unreadable index %s: %s", path, exc)
            continue
        report = IndexReport.from_dict({**meta["report"], "reused": True, "index_path": str(path)})
        return DataIndex(table, report)
    return None


def _save(table: pd.DataFrame, report: IndexReport, signature: str, data: Path) -> Path | None:
    """Write the index atomically next to the data, else in the user cache; None if neither works."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"format_version": INDEX_FORMAT_VERSION, "signature": signature, "report": report.to_dict()}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _METADATA_KEY: json.dumps(meta)})
    for path in index_locations(data):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".parquet.tmp", dir=path.parent)
            os.close(fd)
            try:
                pq.write_table(arrow, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            log.info("cannot write the index to %s (%s); trying the next place", path, exc)
            continue
        return path
    log.warning("could not save the index anywhere; it will be rebuilt next time")
    return None
