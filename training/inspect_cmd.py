"""``inspect FILE_OR_FOLDER... [--json] [--summary] [--workers N]``: can the project use these files?

Each file is decoded exactly as training and prediction decode it (``hemorrhage_core.dicom.read_slice``).
A folder stands for its ``*.dcm`` files, sorted by name (not recursive). ``--json`` prints a JSON list,
one object per file in input order, with the keys of :data:`RECORD_KEYS` (``error`` is null when the
file is usable; the HU statistics are null when it is not). ``--summary`` prints only counts: usable
files, refused files by reason, and the HU range of the usable ones (a JSON object with ``--json``).
Exit 0 when every file is usable, 2 otherwise (including when no file was found).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from training.exits import EXIT_BAD_INPUT, EXIT_OK

RECORD_KEYS: tuple[str, ...] = (
    "file",
    "ok",
    "modality",
    "rows",
    "columns",
    "hu_min",
    "hu_max",
    "hu_mean",
    "error",
)
FOLDER_SUFFIX = ".dcm"
# Files handed to a worker process at a time: large enough to amortise the inter-process traffic.
WORKER_CHUNK = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help="DICOM files, or folders standing for their *.dcm files (sorted, not recursive)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print only counts: usable, refused by reason, HU range of the usable files",
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes decoding files (default 1)"
    )


def expand_paths(paths: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(file, None) for each file to inspect, in input order; (folder, error) for an empty folder."""
    for given in paths:
        if os.path.isdir(given):
            with os.scandir(given) as entries:
                names = sorted(
                    e.name for e in entries if e.name.lower().endswith(FOLDER_SUFFIX) and e.is_file()
                )
            if not names:
                yield given, f"no {FOLDER_SUFFIX} files in this folder"
            for name in names:
                yield os.path.join(given, name), None
        else:
            yield given, None


def inspect_file(path: str) -> tuple[dict[str, Any], str | None]:
    """One record (keys ``RECORD_KEYS``) and the refusal reason code (None when usable)."""
    from hemorrhage_core.dicom import DicomRefusal, read_slice
    from hemorrhage_core.errors import DicomReadError

    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record["file"] = path
    try:
        ct = read_slice(path)
    except DicomReadError as exc:
        record.update(ok=False, error=str(exc))
        if isinstance(exc, DicomRefusal):
            record.update(modality=exc.modality, rows=exc.rows, columns=exc.columns)
            return record, str(exc.reason)
        return record, "other"
    hu = ct.hu
    record.update(
        ok=True,
        modality=ct.meta.modality,
        rows=ct.meta.rows,
        columns=ct.meta.columns,
        hu_min=float(hu.min()),
        hu_max=float(hu.max()),
        hu_mean=round(float(hu.mean(dtype="float64")), 4),
    )
    return record, None


def _inspect_all(files: list[str], workers: int) -> list[tuple[dict[str, Any], str | None]]:
    from tqdm import tqdm

    progress = dict(total=len(files), unit="file", disable=None, file=sys.stderr, leave=False)
    if workers <= 1 or len(files) < 2 * WORKER_CHUNK:
        return [inspect_file(f) for f in tqdm(files, **progress)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(inspect_file, files, chunksize=WORKER_CHUNK), **progress))


def summarise(results: list[tuple[dict[str, Any], str | None]]) -> dict[str, Any]:
    """Counts of usable and refused files (by reason) and the HU range over the usable ones."""
    usable = [record for record, reason in results if reason is None]
    refused = Counter(reason for _, reason in results if reason is not None)
    return {
        "files": len(results),
        "usable": len(usable),
        "refused": dict(sorted(refused.items(), key=lambda item: (-item[1], item[0]))),
        "hu_min": min((r["hu_min"] for r in usable), default=None),
        "hu_max": max((r["hu_max"] for r in usable), default=None),
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(records: list[dict[str, Any]]) -> str:
    """A fixed-width table, one row per file."""
    header = ("file", "usable", "modality", "size", "HU min", "HU max", "HU mean", "problem")
    rows = [
        (
            r["file"],
            "yes" if r["ok"] else "NO",
            r["modality"] or "-",
            f"{r['rows']}x{r['columns']}" if r["rows"] is not None and r["columns"] is not None else "-",
            _number(r["hu_min"]),
            _number(r["hu_max"]),
            _number(r["hu_mean"]),
            r["error"] or "",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"files: {summary['files']}  usable: {summary['usable']}  refused: {summary['files'] - summary['usable']}"
    ]
    lines += [f"  {reason}: {count}" for reason, count in summary["refused"].items()]
    if summary["usable"]:
        lines.append(
            f"HU range of usable files: {_number(summary['hu_min'])} .. {_number(summary['hu_max'])}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    expanded = list(expand_paths(args.paths))
    files = [path for path, problem in expanded if problem is None]
    decoded = iter(_inspect_all(files, max(1, args.workers)))
    results: list[tuple[dict[str, Any], str | None]] = []
    for path, problem in expanded:  # keep input order, empty folders included
        if problem is None:
            results.append(next(decoded))
        else:
            record = dict.fromkeys(RECORD_KEYS)
            record.update(file=path, ok=False, error=problem)
            results.append((record, "no_files"))

    if args.summary:
        summary = summarise(results)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    elif args.json:
        print(json.dumps([record for record, _ in results], indent=2))
    else:
        print(format_table([record for record, _ in results]))
    all_usable = bool(results) and all(reason is None for _, reason in results)
    return EXIT_OK if all_usable else EXIT_BAD_INPUT
