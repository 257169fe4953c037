"""A run's Predictor and the stream of per-file outcomes that ``evaluate`` and ``predict`` share.

``predict_rows`` turns ``(file, error)`` entries into ``PredictionRow`` objects in input order, a bounded
chunk at a time: each chunk's Predictions (which hold image arrays) are reduced to probabilities and
dropped before the next chunk is read, so memory does not grow with the number of files. With
``workers`` > 1 a thread pool reads and preprocesses ahead while the model runs; the forward batches
are the same as with one worker, so are the probabilities.

A 2.5D model (``predictor.context`` > 0) needs each slice's neighbours in the same forward call: the
files' headers are read first, and each chunk holds whole series, sorted by z; rows still come out
in input order.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
# Files per chunk: bounds the Predictions (with their images) alive at once, whatever the number of files.
CHUNK_IMAGES = 256


@dataclass(frozen=True)
class PredictionRow:
    """One input's outcome: probabilities in LABELS order (calibrated when the run is) or an error message.

    ``series`` (study and series UID) and ``z`` place the slice for smoothing along z; they never leave
    the process (``to_dict`` omits them).
    """

    file: str
    probabilities: dict[str, float] | None
    error: str | None
    flags: tuple[str, ...] = ()  # the Predictor's warnings (e.g. HU content unlike a head CT)
    raw_probabilities: dict[str, float] | None = None  # the model's own values, before calibration
    calibrated: bool = False
    series: str | None = None
    z: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "probabilities": self.probabilities, "error": self.error, "flags": list(self.flags),
                "raw_probabilities": self.raw_probabilities, "calibrated": self.calibrated}


def expand_inputs(items: Sequence[str]) -> list[tuple[str, str | None]]:
    """Inputs -> ``(file, error)`` pairs in order; a folder becomes its DICOM files (sorted, recursive).

    A folder with no DICOM file, or a path that does not exist, becomes one entry with an error.
    """
    out: list[tuple[str, str | None]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES and p.is_file()
            )
            if not found:
                out.append((item, "folder holds no .dcm or .dicom files"))
            out.extend((f, None) for f in found)
        elif path.is_file():
            out.append((item, None))
        else:
            out.append((item, "no such file"))
    return out


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str = "auto") -> str:
    """The Predictor's device: for ``auto`` a CUDA GPU when torch sees one (bulk prediction is where it
    pays off), else the CPU; ``cuda`` without a GPU is refused (ValueError: exit 2)."""
    import torch

    if requested not in DEVICES:
        raise ValueError(f"device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_run_predictor(run_dir: str, *, calibrated: bool = True, device: str = "auto", **predictor_options: Any):
    """(RunRecord, Predictor) for a run directory; HemorrhageError subclasses when unusable.

    With ``calibrated`` the Predictor applies the run's calibration.json (if any; EvaluationError when
    it is damaged); without, it returns the model's raw probabilities (what evaluate calibrates itself).
    ``device`` goes through ``resolve_device`` (auto: the GPU when present). ``predictor_options`` go to
    ``Predictor.from_checkpoint`` (e.g. ``batch_size``)."""
    from hemorrhage_core.errors import CheckpointError
    from hemorrhage_core.evaluations import read_calibration
    from hemorrhage_core.inference import Predictor
    from hemorrhage_core.runs import read_run

    record = read_run(run_dir)
    model_path = record.model_path
    if not model_path.is_file():
        raise CheckpointError(f"run {record.id} has no model file {record.info.get('model_file')}")
    # Read before the model loads: a damaged file refuses the run at once.
    calibration = read_calibration(record.path) if calibrated else None
    return record, Predictor.from_checkpoint(model_path, calibration=calibration, device=resolve_device(device),
                                             **predictor_options)


def predict_rows(
    predictor,
    entries: Sequence[tuple[str, str | None]],
    *,
    batch_size: int | None = None,
    workers: int = 1,
) -> Iterator[PredictionRow]:
    """A PredictionRow per ``(file, error)`` entry, in order; entries with an error are not read.

    ``batch_size``: images per forward (default: the Predictor's). ``workers`` > 1: threads that read
    and preprocess up to two batches ahead of the model.
    """
    from hemorrhage_core.inference import isolating

    size = predictor.batch_size if batch_size is None else max(1, int(batch_size))
    if getattr(predictor, "context", 0):
        yield from _rows_by_series(predictor, entries, size)
        return
    todo = (f for f, err in entries if err is None)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict-read") if workers > 1 else None
    prepared = _prepare_ahead(predictor, todo, pool, window=2 * size + workers) if pool else None
    try:
        for start in range(0, len(entries), CHUNK_IMAGES):
            chunk = entries[start : start + CHUNK_IMAGES]
            files = [f for f, err in chunk if err is None]
            if prepared is None:
                results = isolating(lambda batch: predictor.predict_many(batch, batch_size=size), files)
            else:
                results = _predict_prepared(predictor, [next(prepared) for _ in files], size)
            by_file = iter(results)
            for f, err in chunk:
                yield PredictionRow(f, None, err) if err is not None else _row(f, next(by_file))
    finally:
        if pool is not None:
            prepared.close()
            pool.shutdown(wait=True, cancel_futures=True)


def series_chunks(entries: Sequence[tuple[str, str | None]], chunk_images: int = CHUNK_IMAGES) -> list[list[int]]:
    """Positions of the readable entries in chunks of whole series (study, series, then z order), each
    of at least ``chunk_images`` files unless it is the last; a file whose header cannot be read (the
    Predictor then says why) or has no series goes in a chunk of its own kind at the end."""
    import pandas as pd

    from hemorrhage_core.data import scan_headers

    tasks = [(str(k), f, f) for k, (f, err) in enumerate(entries) if err is None]
    if not tasks:
        return []
    headers, _unreadable = scan_headers(tasks, workers=1 if len(tasks) < 512 else None, progress=False)
    series = headers["series_uid"].fillna("").astype(str)
    placed = headers[series.str.len() > 0]
    placed = placed.assign(k=placed["image_id"].astype(int), study_uid=placed["study_uid"].fillna("").astype(str),
                           z=pd.to_numeric(placed["z"], errors="coerce"))
    placed = placed.sort_values(["study_uid", "series_uid", "z", "k"], kind="stable", na_position="last")
    chunks: list[list[int]] = []
    current: list[int] = []
    for _, group in placed.groupby(["study_uid", "series_uid"], sort=False):
        current.extend(int(k) for k in group["k"])
        if len(current) >= chunk_images:
            chunks.append(current)
            current = []
    rest = sorted({int(t[0]) for t in tasks} - set(placed["k"].astype(int)))
    current.extend(rest)
    if current:
        chunks.append(current)
    return chunks


def _rows_by_series(predictor, entries: Sequence[tuple[str, str | None]], size: int) -> Iterator[PredictionRow]:
    """``predict_rows`` for a 2.5D model: whole series per forward call, rows yielded in input order
    as soon as every row before them is done."""
    from hemorrhage_core.inference import isolating

    done: dict[int, PredictionRow] = {k: PredictionRow(f, None, err) for k, (f, err) in enumerate(entries)
                                      if err is not None}
    following = 0
    for chunk in series_chunks(entries):
        files = [entries[k][0] for k in chunk]
        results = isolating(lambda batch: predictor.predict_many(batch, batch_size=size), files)
        for k, result in zip(chunk, results, strict=True):
            done[k] = _row(entries[k][0], result)
        while following in done:
            yield done.pop(following)
            following += 1
    yield from (done.pop(k) for k in sorted(done))  # entries refused before reading, when nothing was read


def _prepare_one(predictor, source: str) -> Any:
    try:
        return predictor.prepare(source)
    except Exception as exc:  # noqa: BLE001 - reported for this file, as predict_many does
        return exc


def _prepare_ahead(predictor, files: Iterator[str], pool: ThreadPoolExecutor, window: int) -> Iterator[Any]:
    """``predictor.prepare(f)`` (or its exception) per file, in order, with up to ``window`` in flight."""
    pending: deque[Future] = deque(pool.submit(_prepare_one, predictor, f) for f in islice(files, window))
    while pending:
        result = pending.popleft().result()
        if (f := next(files, None)) is not None:
            pending.append(pool.submit(_prepare_one, predictor, f))
        yield result


def _predict_prepared(predictor, prepared: list[Any], batch_size: int) -> list[Any]:
    """Forward prepared slices in the batches ``predict_many`` would form: ``batch_size`` inputs, the
    refused ones left out, so the probabilities equal the one-worker path's."""
    from hemorrhage_core.inference import isolating

    results: list[Any] = []
    for start in range(0, len(prepared), batch_size):
        batch = prepared[start : start + batch_size]
        ready = [p for p in batch if not isinstance(p, BaseException)]
        done = iter(isolating(predictor.predict_prepared, ready) if ready else ())
        results.extend(p if isinstance(p, BaseException) else next(done) for p in batch)
    return results


def _message(exc: BaseException) -> str:
    from hemorrhage_core.errors import HemorrhageError

    if isinstance(exc, HemorrhageError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    # Unexpected failures: say what kind, keep details (which may hold header text) for --verbose.
    return f"internal error while predicting ({type(exc).__name__})"


def _row(file: str, result: Any) -> PredictionRow:
    """A Prediction (or the exception raised for this file) reduced to a row without images."""
    if isinstance(result, BaseException):
        return PredictionRow(file, None, _message(result))
    probs = {label: float(p) for label, p in result.probabilities.items()}
    raw = {label: float(p) for label, p in (getattr(result, "raw_probabilities", None) or probs).items()}
    if not all(math.isfinite(p) for p in [*probs.values(), *raw.values()]):
        return PredictionRow(file, None, "the model gave a non-finite probability")
    meta = getattr(result, "meta", None) or {}
    series_uid = meta.get("series_uid")
    series = None if not series_uid else f"{meta.get('study_uid') or ''}/{series_uid}"
    z = meta.get("z")
    z = float(z) if isinstance(z, int | float) and math.isfinite(z) else None
    return PredictionRow(file, probs, None, tuple(getattr(result, "flags", ()) or ()), raw,
                         bool(getattr(result, "calibrated", False)), series, z)

