"""Demo wall time: from a fresh data folder to a synthetic set, a dashboard answering HTTP, and
(``--pipeline``) the quick two-phase pipeline finished, against the targets of ``make demo``.

The phases run the commands ``scripts/demo.sh`` runs, as subprocesses of this script, in order:
  (a) ``python -m training synth`` writes the demo set (60 patients x 10 slices by default);
  (b) ``python -m shiny run app.py`` starts the dashboard on 127.0.0.1; it is up when ``GET /``
      answers 200 with the app's page;
  (c) with ``--pipeline``: ``python -m training pipeline --preset quick`` in the background of the
      running dashboard, as the demo does; per-phase times come from each run's ``duration_s``
      (run.json), the runs from pipeline.json. About 12-15 min on a 2-core machine.
Times are wall-clock from the start of (a); the baselines are the targets (dashboard up within
3 min, both phases finished within 15 min, after the install) and the report prints each time as a
fraction of its target (<= 1.0 meets it).

    python benchmarks/bench_demo.py                     # (a) + (b): a few minutes on 2 cores
    python benchmarks/bench_demo.py --pipeline --json demo.json
    python benchmarks/bench_demo.py --workdir /tmp/demo --keep   # keep the data and runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hemorrhage_core.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
TARGET_DASHBOARD_S = 180.0
TARGET_PIPELINE_S = 900.0
APP_MARKER = b"Hemorrhage CT"  # in the page title: the answer is the app, not some other server
EXIT_FAILED = 1


class DemoFailed(RuntimeError):
    """A phase of the demo did not complete; the message says which and why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 5.0) -> bool:
    """True when ``url`` answers 200 with the dashboard's page."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200 and APP_MARKER in response.read()
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> float:
    """Poll ``url`` until it answers; returns the perf_counter time it did. Fails when the server
    process exits or ``timeout`` seconds pass."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if answers(url, timeout=2.0):
            return time.perf_counter()
        if proc.poll() is not None:
            raise DemoFailed(
                f"the dashboard exited with code {proc.returncode} before answering:\n{tail(log)}"
            )
        time.sleep(0.2)
    raise DemoFailed(f"the dashboard did not answer {url} within {timeout:.0f} s:\n{tail(log)}")


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Ctrl-C (SIGINT) to a process this script started, as the demo's cleanup does; kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pipeline_phases(runs: Path) -> dict[str, Any]:
    """Per phase of ``runs/pipeline.json``: each stage's run id, backbone, status and duration_s
    (run.json), and the phase's total seconds."""
    plan = json.loads((runs / "pipeline.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for phase in ("phase1", "phase2"):
        stages, total = {}, 0.0
        for stage in ("stage1", "stage2"):
            run_id = (plan.get(phase) or {}).get(stage)
            info: dict[str, Any] = {}
            if run_id:
                try:
                    info = json.loads((runs / Path(run_id).name / "run.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    info = {}
            seconds = float(info.get("duration_s") or 0.0)
            total += seconds
            stages[stage] = {
                "run": run_id,
                "backbone": info.get("backbone"),
                "status": info.get("status"),
                "duration_s": seconds,
                "epochs": len(_metric_rows(runs / Path(run_id).name)) if run_id else 0,
            }
        out[phase] = {"stages": stages, "seconds": total}
    return out


def _metric_rows(run_dir: Path) -> list[str]:
    try:
        return (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]
    except OSError:
        return []


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run (a), (b) and optionally (c) under ``work``; the times in seconds from the start of (a)."""
    python = args.python
    data, runs, logs = work / "data", work / "runs", work / "logs"
    for folder in (runs, logs):
        folder.mkdir(parents=True, exist_ok=True)
    if (data / "stage_2_train.csv").exists():
        raise DemoFailed(f"{data} already holds a data set: the benchmark starts from a fresh folder")
    env = {**os.environ, "HEMORRHAGE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}
    result: dict[str, Any] = {"patients": args.patients, "slices_per_patient": args.slices}
    started = time.perf_counter()

    synth = [
        python,
        "-m",
        "training",
        "synth",
        "--out",
        str(data),
        "--patients",
        str(args.patients),
        "--slices-per-patient",
        str(args.slices),
        "--seed",
        "0",
        "--no-progress",
    ]
    with (logs / "synth.log").open("w") as log:
        code = subprocess.call(synth, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not (data / "stage_2_train.csv").is_file():
        raise DemoFailed(f"synth exited with code {code}:\n{tail(logs / 'synth.log')}")
    result["synth_s"] = time.perf_counter() - started
    result["n_slices"] = len(list((data / "stage_2_train").glob("*.dcm")))

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}/"
    serve = [python, "-m", "shiny", "run", "--host", "127.0.0.1", "--port", str(port), "app.py"]
    dash_log = logs / "dashboard.log"
    with dash_log.open("w") as log:
        dashboard = subprocess.Popen(serve, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    pipeline: subprocess.Popen | None = None
    try:
        launched = time.perf_counter()
        up = wait_until_up(dashboard, url, args.timeout, dash_log)
        result["dashboard_start_s"] = up - launched
        result["dashboard_up_s"] = up - started
        print(f"(b) dashboard answered {url} after {result['dashboard_up_s']:.1f} s", flush=True)
        if args.pipeline:
            command = [
                python,
                "-m",
                "training",
                "pipeline",
                "--data",
                str(data),
                "--preset",
                "quick",
                "--runs-dir",
                str(runs),
                "--no-progress",
            ]
            command += [arg for item in args.set for arg in ("--set", item)]
            with (logs / "pipeline.log").open("w") as log:
                pipeline = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            pipeline_started = time.perf_counter()
            code = pipeline.wait()
            result["pipeline_s"] = time.perf_counter() - pipeline_started
            result["pipeline_done_s"] = time.perf_counter() - started
            result["pipeline_exit"] = code
            result["phases"] = pipeline_phases(runs) if (runs / "pipeline.json").is_file() else {}
            result["dashboard_still_up"] = answers(url)
            if code != 0:
                raise DemoFailed(f"the pipeline exited with code {code}:\n{tail(logs / 'pipeline.log')}")
    finally:
        for proc in (pipeline, dashboard):
            if proc is not None:
                stop(proc)
    return result


def print_report(result: dict[str, Any]) -> None:
    print()
    print(f"date: {result['date']}")
    print(f"machine: {result['machine']}")
    print(f"command: {result['command']}")
    print(
        f"data: {result['n_slices']} slices ({result['patients']} patients x {result['slices_per_patient']})"
    )
    print()
    print("| phase | seconds | target | fraction |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| (a) synthetic set written | {result['synth_s']:.1f} | | |")
    print(f"| (b) dashboard start (after (a)) | {result['dashboard_start_s']:.1f} | | |")
    dash = result["dashboard_up_s"]
    print(
        f"| (a)+(b) dashboard answering HTTP | {dash:.1f} | {TARGET_DASHBOARD_S:.0f} "
        f"| {dash / TARGET_DASHBOARD_S:.2f} |"
    )
    if "pipeline_done_s" in result:
        for phase, info in result.get("phases", {}).items():
            stages = info["stages"]
            detail = ", ".join(
                f"{s} {v['backbone']} {v['duration_s']:.0f} s ({v['epochs']} epochs, {v['status']})"
                for s, v in stages.items()
            )
            print(f"| (c) {phase}: {detail} | {info['seconds']:.1f} | | |")
        print(f"| (c) pipeline command (index, cache, four runs) | {result['pipeline_s']:.1f} | | |")
        done = result["pipeline_done_s"]
        print(
            f"| (a)+(b)+(c) both phases finished | {done:.1f} | {TARGET_PIPELINE_S:.0f} "
            f"| {done / TARGET_PIPELINE_S:.2f} |"
        )
        print(f"dashboard still answering after the pipeline: {result['dashboard_still_up']}")
    print()
    verdicts = [
        f"dashboard {'meets' if dash <= TARGET_DASHBOARD_S else 'misses'} its target "
        f"({dash / TARGET_DASHBOARD_S:.2f} of {TARGET_DASHBOARD_S:.0f} s)"
    ]
    if "pipeline_done_s" in result:
        done = result["pipeline_done_s"]
        verdicts.append(
            f"pipeline {'meets' if done <= TARGET_PIPELINE_S else 'misses'} its target "
            f"({done / TARGET_PIPELINE_S:.2f} of {TARGET_PIPELINE_S:.0f} s)"
        )
    print("; ".join(verdicts))


def _machine() -> str:
    name = cpu_name()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} cores{load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--pipeline", action="store_true", help="also run the quick pipeline (12-15 min on 2 cores)"
    )
    parser.add_argument(
        "--patients", type=int, default=60, help="synthetic patients (default 60, make demo's)"
    )
    parser.add_argument("--slices", type=int, default=10, help="slices per patient (default 10, make demo's)")
    parser.add_argument("--port", type=int, default=0, help="dashboard port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the dashboard")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="folder for data, runs and logs (default: temp)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (default: removed at the end)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of the demo (default: this one)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the pipeline (smoke checks only: the benchmark's figure is without)",
    )
    args = parser.parse_args(argv)
    if args.patients < 1 or args.slices < 1:
        parser.error("--patients and --slices must be >= 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    header = {
        "benchmark": "bench_demo",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "command": " ".join(
            ["python benchmarks/bench_demo.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "targets_s": {"dashboard": TARGET_DASHBOARD_S, "pipeline": TARGET_PIPELINE_S},
        "pipeline_overrides": list(args.set),
    }
    print(f"bench_demo: work folder {work}{' (kept)' if args.keep or args.workdir else ''}", flush=True)
    try:
        result = {**header, **measure(args, work)}
    except DemoFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(work, ignore_errors=True)
    result["fractions"] = {"dashboard": result["dashboard_up_s"] / TARGET_DASHBOARD_S}
    if "pipeline_done_s" in result:
        result["fractions"]["pipeline"] = result["pipeline_done_s"] / TARGET_PIPELINE_S
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
