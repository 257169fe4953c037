"""``python -m training index --data DIR``: build or reuse the label + header index and print its counts.

Exit 0, or 2 when the data set cannot be used (``training.exits``).
"""

from __future__ import annotations

import argparse
import json

from training.exits import EXIT_OK

# How many missing / unreadable ids the table names before it says "and N more".
_IDS_SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder (RSNA layout)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="header-reading processes (default: all CPUs)")
    parser.add_argument("--rebuild", action="store_true", help="rescan even if the saved index is fresh")
    parser.add_argument("--all-ids", action="store_true", help="list every missing / unreadable id")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.data.header_index import build_index

    index = build_index(args.data, workers=args.workers, rebuild=args.rebuild, progress=not args.no_progress)
    report = index.report
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report, limit=None if args.all_ids else _IDS_SHOWN))
    return EXIT_OK


def format_report(report, limit: int | None = _IDS_SHOWN) -> str:
    """The report as a readable table (no patient ids: only counts and image ids)."""
    state = "reused (fresh)" if report.reused else "built"
    lines = [
        f"index       {report.index_path or '(not saved)'} [{state}]",
        f"images      {report.n_images:>8}   (listed {report.n_listed}, left out {report.left_out})",
        f"patients    {report.n_patients:>8}",
        f"studies     {report.n_studies:>8}",
        f"series      {report.n_series:>8}",
    ]
    if report.positives:
        lines.append("positives")
        for name, count in report.positives.items():
            share = 100.0 * count / report.n_images if report.n_images else 0.0
            lines.append(f"  {name:<18}{count:>8}   ({share:.2f}%)")
    lines.append(f"missing     {len(report.missing_ids):>8}" + _ids(report.missing_ids, limit))
    unreadable = [f"{image_id} ({why})" for image_id, why in report.unreadable.items()]
    lines.append(f"unreadable  {len(unreadable):>8}" + _ids(unreadable, limit))
    if report.unlisted_files:
        lines.append(f"unlisted    {report.unlisted_files:>8}   DICOM files without label rows (not indexed)")
    lines.extend(f"note: {note}" for note in report.label_notes)
    return "\n".join(lines)


def _ids(ids, limit: int | None) -> str:
    if not ids:
        return ""
    shown = list(ids) if limit is None else list(ids)[:limit]
    more = f"\n  ... and {len(ids) - len(shown)} more (--all-ids)" if len(shown) < len(ids) else ""
    return "".join(f"\n  {item}" for item in shown) + more
