"""Peak memory of ``predict --submission`` against the number of slices: does it stay flat?

Writes a synthetic set (``hemorrhage_core.synthetic``, the ``synth`` command's generator) of --large
slices, a tiny freshly initialised run (MobileNetV3-small, slices preprocessed to --image-size px, as
the tests build one), then runs ``python -m training predict --run RUN DIR --submission OUT.csv`` in a
fresh process on the first --small slices and on all of them, and reads each process's peak resident
set size (``os.wait4``'s ``ru_maxrss``), median of --repeat processes (a process's peak varies by a few
percent from run to run). Printed: both peaks, the growth between them in MiB per 1000 slices, and the
ratio of the peaks (1.0: flat; keeping every slice would grow with the count).

``--kept`` also measures the previous behaviour for contrast: one process calling
``Predictor.predict_many`` on every file at once and holding the Predictions (with their images) to
the end, as ``predict`` did before it streamed. Memory, not time: the machine may be busy.

    python benchmarks/bench_submission.py                       # 500 vs 3000 slices
    python benchmarks/bench_submission.py --small 200 --large 1000 --kept --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hemorrhage_core.machine import cpu_name  # noqa: E402 - after the path is set

SLICES_PER_PATIENT = 10
_KEPT = """
import sys
from pathlib import Path
from hemorrhage_core.inference import Predictor
predictor = Predictor.from_checkpoint(sys.argv[1])
files = sorted(str(p) for p in Path(sys.argv[2]).rglob("*.dcm"))
kept = list(predictor.predict_many(files))
assert len(kept) == len(files)
"""


def make_run(folder: Path, image_size: int) -> Path:
    """A finished run whose best.pt is an untrained MobileNetV3-small (what tests/ build)."""
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    model = build_model(ModelSpec("mobilenet_v3_small", 2, input_size=32, hidden=(16, 8)), weights="none")
    writer = RunWriter.create(folder, backbone="mobilenet_v3_small", stage=2, config={"image_size": image_size})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=SlicePrep(image_size))
    writer.finish()
    return writer.path


def subset(files: list[Path], n: int, folder: Path) -> Path:
    """A folder of links to the first ``n`` files."""
    folder.mkdir(parents=True)
    for f in files[:n]:
        (folder / f.name).symlink_to(f)
    return folder


def peak_rss_mib(argv: list[str]) -> float:
    """Run ``argv`` (stdout discarded) and return its peak RSS in MiB; raises if it fails."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {code}: {err[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=500, help="slices in the small run (default 500)")
    parser.add_argument("--large", type=int, default=3000, help="slices in the large run (default 3000)")
    parser.add_argument("--size", type=int, default=128, help="DICOM rows = columns (default 128)")
    parser.add_argument("--image-size", type=int, default=128, help="the model's preprocessed size (default 128)")
    parser.add_argument("--workers", type=int, default=1, help="predict --workers (default 1)")
    parser.add_argument("--smooth", action="store_true", help="predict --smooth as well")
    parser.add_argument("--kept", action="store_true", help="also measure every Prediction kept to the end")
    parser.add_argument("--repeat", type=int, default=3, help="processes per measurement, median (default 3)")
    args = parser.parse_args(argv)
    if not 0 < args.small < args.large or args.repeat < 1:
        parser.error("need 0 < --small < --large and --repeat >= 1")

    from hemorrhage_core.synthetic import write_dataset

    with tempfile.TemporaryDirectory(prefix="bench_submission_") as tmp:
        root = Path(tmp)
        patients = -(-args.large // SLICES_PER_PATIENT)
        write_dataset(root / "data", patients=patients, slices_per_patient=SLICES_PER_PATIENT, size=args.size,
                      seed=0, workers=min(2, os.cpu_count() or 1), progress=False)
        files = sorted((root / "data" / "stage_2_train").glob("*.dcm"))[: args.large]
        run = make_run(root / "runs", args.image_size)
        folders = {n: subset(files, n, root / f"in{n}") for n in (args.small, args.large)}
        rows = []
        for n, folder in folders.items():
            command = [sys.executable, "-m", "training", "predict", "--run", str(run), str(folder),
                       "--submission", str(root / f"sub{n}.csv"), "--workers", str(args.workers)]
            command += ["--smooth"] if args.smooth else []
            rows.append(("streamed", n, statistics.median(peak_rss_mib(command) for _ in range(args.repeat))))
            lines = (root / f"sub{n}.csv").read_text().count("\n")
            assert lines == 1 + 6 * n, f"{lines} lines for {n} slices"
        if args.kept:
            for n, folder in folders.items():
                model = str(run / "checkpoints" / "best.pt")
                command = [sys.executable, "-c", _KEPT, model, str(folder)]
                rows.append(("kept (before)", n, statistics.median(peak_rss_mib(command) for _ in range(args.repeat))))

    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); DICOM {args.size} px, model input "
          f"{args.image_size} px, --workers {args.workers}{' --smooth' if args.smooth else ''}, "
          f"median of {args.repeat} processes")
    print(f"{'mode':<15}{'slices':>8}{'peak RSS (MiB)':>16}")
    for mode, n, mib in rows:
        print(f"{mode:<15}{n:>8}{mib:>16.1f}")
    for mode in dict.fromkeys(m for m, _, _ in rows):
        small, large = (mib for m, _, mib in rows if m == mode)
        per_1000 = (large - small) / (args.large - args.small) * 1000
        print(f"{mode}: peak x{large / small:.3f} from {args.small} to {args.large} slices "
              f"({per_1000:+.2f} MiB per 1000 slices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
