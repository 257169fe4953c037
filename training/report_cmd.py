"""``report --runs-dir RUNS [--out FILE.html] [--evaluation NAME]``: one self-contained HTML report.

The pipeline's four runs (RUNS/pipeline.json) or, without one, the finished train runs: their data,
configurations and git commits, per-class ROC on the held-out evaluation (``test`` by default) and on
validation (marked optimistic), the paired comparison of the two final models, calibration and the
operating points chosen on validation (``hemorrhage_core.report``, ``report_html``). The file loads
nothing from the network. The last line of stdout is the report's path. Exit 0, or 2 when the runs
folder has nothing to report or the output path cannot be written, 1 when writing fails (disk full).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from training.exits import EXIT_OK, CommandError, os_error_code

log = logging.getLogger(__name__)

DEFAULT_NAME = "report.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", required=True, metavar="RUNS", help="runs folder (with pipeline.json or runs)")
    parser.add_argument("--out", metavar="FILE.html", help=f"where to write the report (default RUNS/{DEFAULT_NAME})")
    parser.add_argument(
        "--evaluation", default=None, metavar="NAME",
        help="held-out evaluation to report (default: pipeline.json's, else test); validation is always shown too",
    )
    parser.add_argument("--resamples", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the paired comparison (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.report_html import build_report
    from hemorrhage_core.runs import atomic_write_text

    if args.resamples < 1:
        raise CommandError("--resamples must be at least 1")
    out = Path(args.out) if args.out else Path(args.runs_dir) / DEFAULT_NAME
    text = build_report(args.runs_dir, evaluation=args.evaluation, n_resamples=args.resamples, seed=args.seed)
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}", os_error_code(exc)) from exc
    log.info("wrote the report (%d kB)", len(text.encode()) // 1024)
    print(out, flush=True)
    return EXIT_OK
