"""Slices per second per core of the data path, against a naive baseline measured in the same run.

(a) naive: pydicom dcmread + apply_modality_lut + three windows + PIL resize to 224
(b) the project's uncached path: SliceDataset without a cache (read_slice + prepare_slice + to_tensor)
(c) the cached path: SliceDataset over the memory-mapped uint8 cache

Every variant runs in this process on one thread (torch and BLAS limited to 1), over the same files,
after one warm-up pass that puts the files in the page cache, so the ratios compare CPU work per core.
Each pass is timed by the CPU time of this process (``time.process_time``: user + system, page
faults included), which is the per-core cost even when other processes share the cores; wall-clock
time would also count the time the scheduler gives to them. Both clocks are recorded and both
ratios printed; ``--clock wall`` puts wall-clock rates in the table. Timed passes interleave the
variants (a, b, c, a, b, c, ...) and the median pass counts, so load from other processes on a
shared machine affects every variant alike.

    python benchmarks/bench_data.py                 # writes a synthetic set of --n slices to a temp dir
    python benchmarks/bench_data.py --data DATA     # uses DATA/stage_2_train/*.dcm
    python benchmarks/bench_data.py --profile       # also prints the top of a cProfile of (b)
    python benchmarks/bench_data.py --workers 16 --device cuda --json data.json
                                                    # also (d): the cached path through the project's
                                                    # DataLoader with 16 worker processes, batches
                                                    # copied to the GPU (wall-clock, all cores)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core per variant
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hemorrhage_core.machine import cpu_name  # noqa: E402
from hemorrhage_core.preprocess import SlicePrep  # noqa: E402
from hemorrhage_core.windowing import DEFAULT_STACK  # noqa: E402

TARGET_UNCACHED = 3.0
TARGET_CACHED = 40.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="slices to time (default 200)")
    parser.add_argument("--size", type=int, default=512, help="side of generated slices (default 512)")
    parser.add_argument("--data", type=Path, default=None, help="existing RSNA-layout data set")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per variant; the median counts")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the uncached path")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="clock of the table: CPU time of this process (default) or wall-clock; both ratios are printed",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also time (d): the cached path through make_loader with this many worker processes (0: skip)",
    )
    parser.add_argument("--batch-size", type=int, default=10, help="batch of (d) (default 10, the trainer's)")
    parser.add_argument("--loader-slices", type=int, default=5000, help="slices (d) delivers while timed (default 5000)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(d) copies its batches to this device")
    parser.add_argument(
        "--augment", nargs="?", const="{}", default=None, metavar="JSON",
        help="(d) applies the training augmentation in its workers (AugmentConfig fields as JSON; default: the trainer's)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available to torch", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = args.data if args.data is not None else _make_data(Path(tmp) / "data", args.n, args.size)
        paths = sorted((data / "stage_2_train").glob("*.dcm"))[: args.n]
        if not paths:
            print(f"no .dcm files in {data / 'stage_2_train'}", file=sys.stderr)
            return 2
        cache_dir = Path(tmp) / "cache"
        results = run(paths, data, args.image_size, args.repeat, cache_dir, args.clock)
        if args.workers:
            results["loader"] = loader_throughput(
                paths, data, args.image_size, cache_dir, args.workers, args.batch_size, args.loader_slices, args.device,
                augment=None if args.augment is None else json.loads(args.augment),
            )
        print_report(results, args, len(paths))
        if args.json:
            _write_json(args.json, results, args, len(paths))
        if args.profile:
            _profile(paths, data, args.image_size)
    return 0


def _make_data(out: Path, n: int, size: int) -> Path:
    """A synthetic RSNA-layout set: the phantom generator when present, else random CT slices."""
    try:
        from hemorrhage_core.synthetic import write_dataset
    except ImportError:
        write_dataset = None
    if write_dataset is not None:
        import inspect

        slices = 10
        quiet = {"progress": False} if "progress" in inspect.signature(write_dataset).parameters else {}
        write_dataset(out, patients=math.ceil(n / slices), slices_per_patient=slices, size=size, seed=0, **quiet)
        return out
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    # A crude head: air outside, bone ring, brain with noise; HU + 1024 stored as int16.
    head = np.where(r > 0.9, -1000, np.where(r > 0.8, 1200, 35)).astype(np.int16)
    for i in range(n):
        stored = (head + rng.normal(0, 8, head.shape).astype(np.int16) + 1024).clip(0, 4095).astype(np.int16)
        image_id = f"ID_{i:09x}"
        write_ct_slice(
            out / "stage_2_train" / f"{image_id}.dcm",
            stored,
            patient_id=f"P{i // 10}",
            study_uid=new_uid(f"study{i // 10}"),
            series_uid=new_uid(f"series{i // 10}"),
            sop_uid=new_uid(image_id),
            z=5.0 * (i % 10),
            instance_number=i % 10 + 1,
        )
    return out


def naive_slice(path: Path, image_size: int) -> torch.Tensor:
    """The baseline a first script would write (pydicom is imported here: benchmarks are outside the library)."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    channels = [np.clip((hu - w.low) / w.width, 0.0, 1.0) for w in DEFAULT_STACK.windows]
    rgb = (np.stack(channels, axis=-1) * 255.0).astype(np.uint8)
    resized = Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)


def run(
    paths: list[Path], data: Path, image_size: int, repeat: int, cache_dir: Path, clock: str = "cpu"
) -> dict:
    from hemorrhage_core.data.cache import SliceCache
    from hemorrhage_core.data.dataset import SliceDataset

    index = _index_of(paths, data)
    for p in paths:  # warm the page cache: every variant then reads from memory
        p.read_bytes()

    uncached = SliceDataset(index, data, stage=2, prep=SlicePrep(image_size), on_error="raise")
    start = time.perf_counter()
    cache = SliceCache.build(index, data, prep=SlicePrep(image_size), cache_dir=cache_dir, progress=False)
    build_s = time.perf_counter() - start
    cached = SliceDataset(index, data, stage=2, prep=SlicePrep(image_size), cache=cache)
    cached[0]  # open the memory map outside the timing

    from hemorrhage_core.dicom import read_slice
    from hemorrhage_core.preprocess import prepare_slice

    hu = [read_slice(p).hu for p in paths[: min(len(paths), 50)]]
    crop, polar = SlicePrep(image_size, head_crop=True), SlicePrep(image_size, head_crop=True, polar=True)
    traced = SlicePrep(image_size, head_crop=True, polar=True, crop_stretch=True, polar_trace=True)

    def over(fn: Callable[[int], object], n: int = len(paths)) -> Callable[[], dict[str, float]]:
        def timed() -> dict[str, float]:
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            return {"cpu": (time.process_time() - cpu) / n, "wall": (time.perf_counter() - wall) / n}

        return timed

    variants = {
        "a_naive": over(lambda i: naive_slice(paths[i], image_size)),
        "b_uncached": over(lambda i: uncached[i]),
        "c_cached": over(lambda i: cached[i]),
        # where (b) spends its time
        "b1_read_slice": over(lambda i: read_slice(paths[i])),
        "b2_prepare_slice": over(lambda i: prepare_slice(hu[i], image_size, DEFAULT_STACK), len(hu)),
        # what the head crop and the polar resampling (the quick preset's) add to the cache build
        "b3_prep_crop": over(lambda i: crop(hu[i]), len(hu)),
        "b4_prep_crop_polar": over(lambda i: polar(hu[i]), len(hu)),
        "b5_prep_crop_polar_trace": over(lambda i: traced(hu[i]), len(hu)),  # the skull-traced frame
    }
    for fn in variants.values():
        fn()  # warm-up (imports, allocator)
    # Passes interleave the variants, so load from other processes hits them alike.
    per_slice: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            per_slice[name].append(fn())

    def rates_by(which: str) -> dict[str, float]:
        return {name: 1.0 / statistics.median(p[which] for p in runs) for name, runs in per_slice.items()}

    # the cached tensors must be the uncached ones, else the speed-up means nothing
    assert all(torch.equal(cached[i][0], uncached[i][0]) for i in range(min(len(paths), 20)))
    other = "wall" if clock == "cpu" else "cpu"
    return {
        "clock": clock,
        "rates": rates_by(clock),
        "other_clock": other,
        "other_rates": rates_by(other),
        "build_rate": len(paths) / build_s,
        "build_workers": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def _index_of(paths: list[Path], data: Path):
    """An index table over ``paths`` with all-negative labels (speed does not depend on them)."""
    import pandas as pd

    labels = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
    return pd.DataFrame(
        {
            "image_id": [p.stem for p in paths],
            "path": [p.relative_to(data).as_posix() for p in paths],
            **{name: np.zeros(len(paths), dtype=np.int8) for name in labels},
            "stage1_class": np.zeros(len(paths), dtype=np.int8),
        }
    )


class _Cycled(torch.utils.data.Dataset):
    """``length`` items cycling over ``dataset``: one long epoch over a small cache, so the timing has
    one epoch boundary, as an epoch over the real data set would. The samplers read ``length`` in the
    main process when an epoch starts, so it can change between epochs."""

    def __init__(self, dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def loader_throughput(
    paths: list[Path],
    data: Path,
    image_size: int,
    cache_dir: Path,
    workers: int,
    batch_size: int,
    slices: int,
    device: str = "cpu",
    augment: dict | None = None,
) -> dict:
    """(d) Slices/s, wall-clock, of the cached SliceDataset through ``make_loader`` with ``workers``
    processes (the trainer's collate, seeded shuffling, pinned memory on CUDA), each batch copied to
    ``device`` as the training step does. ``augment`` (AugmentConfig fields; ``{}`` the trainer's
    defaults) adds the training augmentation, drawn in the workers as in training. An untimed short
    epoch first starts the (persistent) workers; the timed epoch then delivers ``slices`` slices,
    cycling over the cache."""
    from hemorrhage_core.data.cache import SliceCache
    from hemorrhage_core.data.dataset import SliceDataset
    from hemorrhage_core.data.loader import make_loader

    index = _index_of(paths, data)
    cache = SliceCache.build(index, data, prep=SlicePrep(image_size), cache_dir=cache_dir, progress=False)
    warm = 2 * batch_size * max(workers, 1)
    augmenter = None
    if augment is not None:
        from hemorrhage_core.data import AugmentConfig, SliceAugment

        augmenter = SliceAugment(AugmentConfig(**augment))
    dataset = _Cycled(
        SliceDataset(index, data, stage=2, prep=SlicePrep(image_size), cache=cache, augment=augmenter), warm
    )
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, workers=workers, seed=0, drop_last=True)
    target = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")

    def epoch(length: int) -> int:
        dataset.length = length
        n = 0
        for batch in loader:
            n += int(batch[0].to(target, non_blocking=True).shape[0])
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return n

    epoch(warm)  # start the workers, fault the cache pages in
    wall, cpu = time.perf_counter(), time.process_time()
    delivered = epoch(slices)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "workers": workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "augment": augment,
        "device": device,
        "pinned": bool(loader.pin_memory),
        "slices": delivered,
        "rate": delivered / wall,
        "main_process_cpu_share": cpu / wall,
    }


def _write_json(out: Path, results: dict, args: argparse.Namespace, n: int) -> None:
    record = {
        "benchmark": "bench_data",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "command": f"python benchmarks/bench_data.py {' '.join(sys.argv[1:])}".rstrip(),
        "slices": n,
        "image_size": args.image_size,
        **results,
        "ratios": {
            "b_over_a": results["rates"]["b_uncached"] / results["rates"]["a_naive"],
            "c_over_a": results["rates"]["c_cached"] / results["rates"]["a_naive"],
        },
    }
    if "loader" in results:
        record["ratios"]["d_over_c"] = results["loader"]["rate"] / results["rates"]["c_cached"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def print_report(results: dict, args: argparse.Namespace, n: int) -> None:
    rates = results["rates"]
    base = rates["a_naive"]
    rows = [
        ("(a) naive: pydicom + modality LUT + 3 windows + PIL resize", rates["a_naive"], 1.0, None),
        ("(b) uncached: read_slice + prepare_slice + to_tensor", rates["b_uncached"], rates["b_uncached"] / base, TARGET_UNCACHED),
        ("(c) cached: memmap uint8 -> tensor", rates["c_cached"], rates["c_cached"] / base, TARGET_CACHED),
    ]
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible; torch {torch.__version__}, 1 thread")
    print(f"clock: {'CPU time of this process' if results['clock'] == 'cpu' else 'wall-clock'}")
    print(f"command: python benchmarks/bench_data.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"slices: {n} at {args.size if args.data is None else 'their own'} px -> {args.image_size} px, median of {args.repeat}")
    print()
    print(f"| {'path':<62} | {'slices/s/core':>13} | {'x (a)':>7} | {'target':>6} |")
    print(f"| {'-' * 62} | {'-' * 13}:| {'-' * 6}:| {'-' * 5}:|")
    for label, rate, ratio, target in rows:
        mark = "" if target is None else (" ok" if ratio >= target else " MISS")
        target_text = "" if target is None else f">={target:g}x"
        print(f"| {label:<62} | {rate:>13.0f} | {ratio:>6.1f}x | {target_text:>6} |{mark}")
    print()
    print(
        f"(b) breakdown, ms per slice: read_slice {1e3 / rates['b1_read_slice']:.2f}, "
        f"prepare_slice {1e3 / rates['b2_prepare_slice']:.2f}; (a) total {1e3 / base:.2f}"
    )
    print(
        f"SlicePrep, ms per slice: head crop {1e3 / rates['b3_prep_crop']:.2f}, head crop + polar "
        f"{1e3 / rates['b4_prep_crop_polar']:.2f} (polar/crop = {rates['b3_prep_crop'] / rates['b4_prep_crop_polar']:.2f}x the time), "
        f"stretched + traced polar {1e3 / rates['b5_prep_crop_polar_trace']:.2f} "
        f"(traced/polar = {rates['b4_prep_crop_polar'] / rates['b5_prep_crop_polar_trace']:.2f}x the time)"
    )
    print(f"ratio b/a = {rates['b_uncached'] / base:.2f}x (target >= {TARGET_UNCACHED:g}x)")
    print(f"ratio c/a = {rates['c_cached'] / base:.1f}x (target >= {TARGET_CACHED:g}x)")
    other = results["other_rates"]
    print(
        f"by {results['other_clock']} time instead: b/a = {other['b_uncached'] / other['a_naive']:.2f}x, "
        f"c/a = {other['c_cached'] / other['a_naive']:.1f}x"
    )
    print(f"cache build: {results['build_rate']:.0f} slices/s with {results['build_workers']} worker processes")
    if "loader" in results:
        d = results["loader"]
        print(
            f"(d) cached through make_loader, {d['workers']} workers, batch {d['batch_size']}, "
            f"{'augmented, ' if d.get('augment') is not None else ''}to {d['device']}"
            f"{' (pinned)' if d['pinned'] else ''}: {d['rate']:.0f} slices/s wall-clock over {d['slices']} slices "
            f"= {d['rate'] / rates['c_cached']:.1f}x (c) on one core; main process busy {d['main_process_cpu_share']:.0%}"
        )


def _profile(paths: list[Path], data: Path, image_size: int) -> None:
    import cProfile
    import pstats

    from hemorrhage_core.dicom import read_slice
    from hemorrhage_core.preprocess import prepare_slice, to_tensor

    profiler = cProfile.Profile()
    profiler.enable()
    for p in paths:
        to_tensor(prepare_slice(read_slice(p).hu, image_size, DEFAULT_STACK))
    profiler.disable()
    print("\nprofile of (b), by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    sys.exit(main())
