"""How long a runs folder with hundreds of runs takes to list and to open in the dashboard.

Generates N (default 300) small but complete runs (run.json, a 10-epoch metrics.csv, a 96-row
predictions.csv, a 4-image gallery, train.log: tests/dashboard_fixtures.write_many_runs) in a
temporary folder, then times, median of --repeat passes:

- ``list_runs``: ``hemorrhage_core.runs.list_runs`` over the folder;
- ``open``: what the dashboard does when it starts or a first session opens: a fresh
  ``RunIndex.snapshot()`` (every run summarised) and the runs table built from it
  (``tables.runs_table``) and serialised for the browser (``render.DataGrid(...).to_payload()``);
- ``poll``: the dashboard's poll every few seconds when nothing changed (``RunIndex.stamps()`` and a
  snapshot served from the cache).

The baseline is the same measurement over a 10-run folder generated in the same way in the same run;
the ratio printed is the cost per run at N runs over the cost per run at 10 (1.0 = linear scaling).
Files are in the page cache (they were just written); the first open of a cold folder on a slow disk
costs more.

    python benchmarks/bench_runs_folder.py              # 300 runs
    python benchmarks/bench_runs_folder.py --n 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the run generator the tests use

from dashboard_fixtures import write_many_runs  # noqa: E402

from hemorrhage_core.dashboard import tables  # noqa: E402
from hemorrhage_core.dashboard.state import RunIndex  # noqa: E402
from hemorrhage_core.runs import list_runs  # noqa: E402

BASELINE_RUNS = 10


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def open_dashboard(folder: Path) -> int:
    """A fresh RunIndex's snapshot, the runs table, and its DataGrid payload; returns the row count."""
    from shiny import render

    snapshot = RunIndex(folder).snapshot()
    frame = tables.runs_table(snapshot.summaries)
    render.DataGrid(frame, selection_mode="row", width="100%", summary=False).to_payload()
    return len(frame)


def measure(folder: Path, repeat: int) -> dict[str, float]:
    index = RunIndex(folder)
    index.snapshot()  # warm the cache the poll reuses
    return {
        "list_runs": median_seconds(lambda: list_runs(folder), repeat),
        "open": median_seconds(lambda: open_dashboard(folder), repeat),
        "poll": median_seconds(lambda: index.snapshot(index.stamps()), repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="runs in the big folder (default 300)")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes; the median counts (default 5)")
    args = parser.parse_args(argv)
    if args.n < BASELINE_RUNS:
        parser.error(f"--n must be at least {BASELINE_RUNS}")

    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        start = time.perf_counter()
        write_many_runs(Path(tmp) / "small", BASELINE_RUNS)
        write_many_runs(Path(tmp) / "big", args.n)
        generated = time.perf_counter() - start
        assert open_dashboard(Path(tmp) / "big") == args.n  # every run listed, before timing
        small = measure(Path(tmp) / "small", args.repeat)
        big = measure(Path(tmp) / "big", args.repeat)

    print(f"generated {BASELINE_RUNS} + {args.n} runs in {generated:.1f} s; median of {args.repeat} passes")
    print(
        f"{'step':<10} {f'{BASELINE_RUNS} runs (s)':>14} {f'{args.n} runs (s)':>14} {'ms/run':>9} {'x baseline/run':>15}"
    )
    for step in ("list_runs", "open", "poll"):
        per_run_small = small[step] / BASELINE_RUNS
        per_run_big = big[step] / args.n
        print(
            f"{step:<10} {small[step]:>14.3f} {big[step]:>14.3f} {1000 * per_run_big:>9.2f} "
            f"{per_run_big / per_run_small:>15.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
