"""Index and slice cache at scale: files/s, peak memory and disk, extrapolated to RSNA's 752,803 slices.

Writes an RSNA-layout set of --n small synthetic CT slices (--px square, a skull ring around brain, so the
head crop finds its box; ``hemorrhage_core.dicom.write_ct_slice``, 40 slices a patient), then runs, each
in a fresh process under ``training.cli.main``, at --n / 5 slices and at --n slices:

- ``index --data D``: the header scan (fresh);
- ``cache --data D --image-size S``: the cache build (fresh), as ``cache`` ahead of training would;
- ``cache`` again: what each training start costs rank 0 when everything is fresh (listing and stat of
  every file, the CSV hash, the cache's source signature);
- what another rank of a distributed run does instead: ``read_index`` + ``SliceCache.open`` of rank 0's
  files, with no listing and no stat.

Each step reports wall time, files/s, CPU seconds (the process and its workers), the peak RSS of the
command's own process and of its largest worker (``getrusage``), and the disk it wrote. Two sizes give
the memory per 1000 files; the extrapolation to 752,803 slices is printed (and written with --json).
Small slices measure the per-file costs (metadata, bookkeeping, process pool); the pixel work of real
512 px slices is bench_data.py's (b), per core. The data goes at the end (``--keep`` keeps it).

    python benchmarks/bench_cache_scale.py                   # 100,000 slices (long on 2 cores)
    python benchmarks/bench_cache_scale.py --n 20000 --json build/cache_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hemorrhage_core.machine import cpu_name  # noqa: E402 - after the path is set

RSNA_SLICES = 752_803
SLICES_PER_PATIENT = 40
RSNA_SIZES = (224, 256, 299)

# A command under training.cli.main in a fresh process; its last stderr line is what it cost.
_TIMED = """
import json, resource, sys, time
from training.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - start
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({"code": code, "wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime
      + kids.ru_stime, "rss_mib": me.ru_maxrss / 1024, "worker_rss_mib": kids.ru_maxrss / 1024}), file=sys.stderr)
"""

# What a rank other than 0 does: open rank 0's index and cache by path.
_OPEN = """
import json, resource, sys, time
from hemorrhage_core.data.cache import SliceCache
from hemorrhage_core.data.header_index import read_index
start = time.perf_counter()
index = read_index(sys.argv[1])
cache = SliceCache.open(sys.argv[2])
assert len(cache.usable(index.table)) == len(index.table)
wall = time.perf_counter() - start
me = resource.getrusage(resource.RUSAGE_SELF)
print("BENCH " + json.dumps({"code": 0, "wall_s": wall, "cpu_s": me.ru_utime + me.ru_stime,
      "rss_mib": me.ru_maxrss / 1024, "worker_rss_mib": 0.0}), file=sys.stderr)
"""


def write_set(data: Path, n: int, px: int, seed: int = 0) -> float:
    """An RSNA-layout set of ``n`` slices; returns files written per second."""
    import numpy as np

    from hemorrhage_core.dicom import new_uid, write_ct_slice
    from hemorrhage_core.labels import LABELS

    images = data / "stage_2_train"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:px, :px]
    r = np.hypot(yy - px / 2, xx - px / 2) / (px / 2)
    head = np.where(r < 0.8, 1024 + 35, 0) + np.where((r >= 0.8) & (r < 0.9), 1000, 0)  # brain, skull ring, air
    rows = ["ID,Label"]
    start = time.perf_counter()
    for i in range(n):
        patient, s = divmod(i, SLICES_PER_PATIENT)
        image_id = f"ID_{i:09x}"
        noise = rng.integers(-20, 21, size=(px, px))
        write_ct_slice(
            images / f"{image_id}.dcm", (head + noise * (r < 0.8)).astype(np.int16),
            patient_id=f"PAT{patient:06d}", study_uid=new_uid(f"study{patient}"),
            series_uid=new_uid(f"series{patient}"), sop_uid=new_uid(f"sop{i}"), z=5.0 * s, instance_number=s + 1,
        )
        positive = int(i % 7 == 0)
        rows.extend(f"{image_id}_{name},{positive if name in ('subdural', 'any') else 0}" for name in LABELS)
    (data / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    return n / (time.perf_counter() - start)


def subset(data: Path, n: int, folder: Path) -> Path:
    """A set of the first ``n`` slices of ``data``: links to its files and their label rows."""
    files = sorted((data / "stage_2_train").glob("*.dcm"))[:n]
    (folder / "stage_2_train").mkdir(parents=True)
    for f in files:
        (folder / "stage_2_train" / f.name).symlink_to(f)
    keep = {f.stem for f in files}
    lines = (data / "stage_2_train.csv").read_text().splitlines()
    chosen = [lines[0]] + [line for line in lines[1:] if line.rsplit("_", 1)[0] in keep]
    (folder / "stage_2_train.csv").write_text("\n".join(chosen) + "\n")
    return folder


def timed(script: str, args: list[str], env: dict) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.startswith("BENCH ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{args[:1]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(lines[-1][6:]), result.stdout


def measure(data: Path, n: int, image_size: int, workers: int, env: dict) -> dict:
    common = ["--data", str(data), "--workers", str(workers), "--no-progress"]
    steps = {}
    steps["index"], _ = timed(_TIMED, ["index", *common], env)
    cache_args = ["cache", *common, "--image-size", str(image_size)]
    steps["cache build"], out = timed(_TIMED, cache_args, env)
    cache_dir = Path(out.strip().splitlines()[-1])
    steps["fresh check (rank 0, each start)"], _ = timed(_TIMED, cache_args, env)
    steps["open (other ranks)"], _ = timed(_OPEN, [str(data / "index.parquet"), str(cache_dir)], env)
    for step in steps.values():
        step["files_per_s"] = n / step["wall_s"]
    disk = {
        "slices_npy": (cache_dir / "slices.npy").stat().st_size,
        "cache_json": (cache_dir / "cache.json").stat().st_size,
        "index_parquet": (data / "index.parquet").stat().st_size,
    }
    return {"n": n, "steps": steps, "disk": disk}


def extrapolate(small: dict, large: dict, image_size: int, target: int = RSNA_SLICES) -> dict:
    """To ``target`` files: time in proportion to the file count (through zero, so the ~3 s a command
    spends importing torch is counted again at every size: an upper bound), memory along the line
    through the two measurements (MiB per 1000 files)."""
    span = large["n"] - small["n"]
    out: dict = {"n": target, "steps": {}}
    for name, big in large["steps"].items():
        rss_per_k = (big["rss_mib"] - small["steps"][name]["rss_mib"]) / span * 1000
        out["steps"][name] = {
            "wall_s": big["wall_s"] * target / large["n"],
            "cpu_s_per_file": big["cpu_s"] / large["n"],
            "rss_mib_per_1000": rss_per_k,
            "rss_mib": big["rss_mib"] + rss_per_k * (target - large["n"]) / 1000,
        }
    meta_per_file = large["disk"]["cache_json"] / large["n"]
    out["disk_gb"] = {size: target * 3 * size * size / 1e9 for size in (*RSNA_SIZES, image_size)}
    out["cache_json_mb"] = meta_per_file * target / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="slices (default 100000); also measured at n/5")
    parser.add_argument("--px", type=int, default=64, help="side of the written slices (default 64)")
    parser.add_argument("--image-size", type=int, default=64, help="cache slice size (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--dir", type=Path, default=None, help="where the data goes (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the data")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON", help="print the table of a saved --json")
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        saved["extrapolated"] = extrapolate(saved["small"], saved["large"], saved["image_size"])
        print(report(saved))
        return 0
    if args.n < 10 or args.image_size < 32:
        parser.error("--n must be >= 10 and --image-size >= 32")
    from hemorrhage_core.data.header_index import default_workers

    workers = args.workers or default_workers()
    env = {k: v for k, v in os.environ.items() if k != "HEMORRHAGE_CT_CACHE"}  # caches in DATA/.cache
    base = Path(tempfile.mkdtemp(prefix="bench-cache-scale-", dir=args.dir))
    try:
        write_rate = write_set(base / "large", args.n, args.px)
        small_n = max(10, args.n // 5)
        written_mb = sum(f.stat().st_size for f in (base / "large" / "stage_2_train").iterdir()) / 1e6
        small = measure(subset(base / "large", small_n, base / "small"), small_n, args.image_size, workers, env)
        large = measure(base / "large", args.n, args.image_size, workers, env)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    result = {
        "cpu": cpu_name(), "cpus": os.cpu_count(), "workers": workers, "load_average": os.getloadavg(),
        "px": args.px, "image_size": args.image_size, "write_files_per_s": write_rate, "dicom_mb": written_mb,
        "small": small, "large": large, "extrapolated": extrapolate(small, large, args.image_size),
    }
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def report(result: dict) -> str:
    small, large, ext = result["small"], result["large"], result["extrapolated"]
    lines = [
        f"CPU: {result['cpu']} ({result['cpus']} logical), {result['workers']} workers, load average "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}; slices {result['px']} px -> cache "
        f"{result['image_size']} px; writing the set: {result['write_files_per_s']:.0f} files/s",
        "",
        f"| step | {small['n']} files (s) | {large['n']} files (s) | files/s | CPU ms/file | peak RSS main / "
        f"worker (MiB) | MiB per 1000 files | {ext['n']} files (s, extrapolated) | RSS at {ext['n']} (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, big in large["steps"].items():
        e = ext["steps"][name]
        lines.append(
            f"| {name} | {small['steps'][name]['wall_s']:.1f} | {big['wall_s']:.1f} | {big['files_per_s']:.0f} | "
            f"{1000 * e['cpu_s_per_file']:.2f} | {big['rss_mib']:.0f} / {big['worker_rss_mib']:.0f} | "
            f"{e['rss_mib_per_1000']:.1f} | {e['wall_s']:.0f} | {e['rss_mib']:.0f} |"
        )
    disk = large["disk"]
    lines += [
        "",
        f"disk at {large['n']} files: slices.npy {disk['slices_npy'] / 1e6:.1f} MB, cache.json "
        f"{disk['cache_json'] / 1e6:.2f} MB, index.parquet {disk['index_parquet'] / 1e6:.2f} MB",
        f"at {ext['n']} slices: cache.json {ext['cache_json_mb']:.0f} MB; slices.npy "
        + ", ".join(f"{gb:.1f} GB at {size} px" for size, gb in sorted(ext["disk_gb"].items())),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
