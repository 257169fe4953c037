"""The short benchmark for a machine with a CUDA GPU: a few minutes, one summary with the card's name.

Runs, each as its own process (a fresh CUDA context, and one failure does not stop the others):
  train      bench_train.py --device cuda --sizes full --chunk 20: VGG16 at 224 px and Inception_v3 at
             299 px, the trainer's optimizer step with AMP (bf16, or fp16 + GradScaler) and channels_last,
             20 consecutive steps per timed call; per step: the step's time, its forward + backward
             alone, and the overhead between them (at batch 10, and at the preset's batch if larger)
  loader     bench_data.py --device cuda: the cached path through the project's DataLoader at the
             preset's phase-2 size (299 px), with its augmentation, worker count and batch, pinned
             batches copied to the GPU
  inference  bench_inference.py --device cuda: Predictor latency from DICOM bytes against the bare forward
and writes OUT/gpu_bench.json (every number) and OUT/gpu_bench.md (the tables for docs/benchmarks.md).
OUT is taken relative to the directory the script is started from.

    python benchmarks/gpu_bench.py                      # or: make bench-gpu
    python benchmarks/gpu_bench.py --preset full-h100   # batch 10 and the preset's 128; its loader batch
    python benchmarks/gpu_bench.py --out /tmp/gpu --batch-sizes 10 64
    python benchmarks/gpu_bench.py --cpu-smoke          # no GPU: checks the plumbing in seconds (no figures)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
EXIT_NO_CUDA = 2
EXIT_PART_FAILED = 1
# Consecutive training steps per timed call: the loop's per-epoch costs spread out, its per-step ones stay.
TRAIN_CHUNK = 20
# The trainer's default batch (the original report's); the overhead per step is reported at it.
REPORT_BATCH = 10


def loader_settings(preset: str) -> dict[str, Any]:
    """The data path of the preset's phase 2 (the largest images): image size, augmentation (None when
    off; AugmentConfig fields otherwise), DataLoader workers and batch."""
    from training.config import PipelinePreset

    config = PipelinePreset.load(preset).config("phase2", "stage1")
    augment = None if config.augment is False else ({} if config.augment is True else dict(config.augment))
    return {"image_size": config.image_size, "augment": augment, "workers": config.num_workers,
            "batch_size": config.batch_size}


def default_batch_sizes(preset: str) -> list[int]:
    """Batch 10 (the overhead figure) and the preset's own batch when it differs."""
    from training.config import PipelinePreset

    return sorted({REPORT_BATCH, PipelinePreset.load(preset).config("phase2", "stage1").batch_size})


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def commands(
    out: Path, *, smoke: bool, batch_sizes: list[int], steps: int, workers: int | None = None,
    preset: str = "full",
) -> dict[str, list[list[str]]]:
    """Part name -> the benchmark command lines it runs (each writes a JSON file into ``out``).
    ``workers`` overrides the preset's loader workers."""
    py = [sys.executable]
    data = loader_settings(preset)
    if smoke:  # tiny sizes on CPU: every code path of the summary, none of the figures
        return {
            "train": [
                py
                + [
                    str(HERE / "bench_train.py"),
                    "--device",
                    "cpu",
                    "--backbones",
                    "vgg16",
                    "--px",
                    "32",
                    "--steps",
                    "1",
                    "--warmup",
                    "0",
                    "--batch-size",
                    "2",
                    "--threads",
                    "1",
                    "--json",
                    str(out / "train-b2.json"),
                ]
            ],
            "loader": [
                py
                + [
                    str(HERE / "bench_data.py"),
                    "--n",
                    "10",
                    "--size",
                    "64",
                    "--image-size",
                    "32",
                    "--repeat",
                    "1",
                    "--workers",
                    "1",
                    "--loader-slices",
                    "40",
                    "--augment",
                    "--json",
                    str(out / "loader.json"),
                ]
            ],
            "inference": [
                py
                + [
                    str(HERE / "bench_inference.py"),
                    "--backbones",
                    "mobilenet_v3_small",
                    "--repeats",
                    "1",
                    "--min-seconds",
                    "0",
                    "--batch",
                    "2",
                    "--threads",
                    "1",
                    "--json",
                    str(out / "inference.json"),
                ]
            ],
        }
    return {
        "train": [
            py
            + [
                str(HERE / "bench_train.py"),
                "--device",
                "cuda",
                "--sizes",
                "full",
                "--backbones",
                "vgg16",
                "inception_v3",
                "--steps",
                str(steps),
                "--warmup",
                "5",
                "--chunk",
                str(TRAIN_CHUNK),
                "--batch-size",
                str(batch),
                "--json",
                str(out / f"train-b{batch}.json"),
            ]
            for batch in batch_sizes
        ],
        "loader": [
            py
            + [
                str(HERE / "bench_data.py"),
                "--n",
                "200",
                "--repeat",
                "3",
                "--image-size",
                str(data["image_size"]),
                "--workers",
                str(workers if workers is not None else data["workers"]),
                "--batch-size",
                str(data["batch_size"]),
                "--device",
                "cuda",
                "--loader-slices",
                "20000",
                *([] if data["augment"] is None else ["--augment", json.dumps(data["augment"])]),
                "--json",
                str(out / "loader.json"),
            ]
        ],
        "inference": [
            py
            + [
                str(HERE / "bench_inference.py"),
                "--device",
                "cuda",
                "--backbones",
                "vgg16",
                "inception_v3",
                "--repeats",
                "20",
                "--json",
                str(out / "inference.json"),
            ]
        ],
    }


def json_target(command: list[str]) -> Path:
    return Path(command[command.index("--json") + 1])


def run_parts(parts: dict[str, list[list[str]]], timeout: float) -> dict[str, Any]:
    """Run every command; part -> list of {command, seconds, exit, result (its JSON) or error}."""
    done: dict[str, Any] = {}
    for name, command_lines in parts.items():
        done[name] = []
        for command in command_lines:
            shown = " ".join(
                [
                    "python",
                    *(
                        Path(c).relative_to(HERE.parent).as_posix() if c.startswith(str(HERE)) else c
                        for c in command[1:]
                    ),
                ]
            )
            print(f"[gpu_bench] {name}: {shown}", flush=True)
            started = time.perf_counter()
            try:
                code = subprocess.call(command, cwd=HERE.parent, timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            record: dict[str, Any] = {
                "command": shown,
                "seconds": round(time.perf_counter() - started, 1),
                "exit": code,
            }
            target = json_target(command)
            if code == 0 and target.is_file():
                record["result"] = json.loads(target.read_text(encoding="utf-8"))
            else:
                record["error"] = "timed out" if code is None else f"exit code {code}"
            done[name].append(record)
    return done


def _ok(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["result"] for r in part if "result" in r]


def markdown(summary: dict[str, Any]) -> str:
    """The summary's tables, in docs/benchmarks.md's style."""
    lines = [
        f"### {summary['date'][:10]}, {summary['card']}"
        + (" (CPU smoke run: plumbing only)" if summary["smoke"] else ""),
        "",
        f"- Command: `{summary['command']}` ({summary['seconds']:.0f} s)",
        f"- Machine: {summary['card']}, {summary['cores']} CPU cores; torch {summary['torch']}",
        "",
        "Training (bench_train: the trainer's optimizer step; images/s by wall clock; overhead: ms/step "
        "minus the forward + loss + backward alone):",
        "",
        "| backbone | px | trunk | batch | AMP | channels_last | train img/s | ms/step | fwd+bwd ms "
        "| overhead ms | fwd img/s | fwd/train | train TFLOP/s | matmul TFLOP/s | share |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for report in _ok(summary["parts"].get("train", [])):
        clock = report["clock"]
        for r in report["results"]:
            c = r[clock]
            lines.append(
                f"| {r['backbone']} | {r['px']} | {r['trunk']} | {r['batch']} "
                f"| {r['amp'] or 'off'}{' + GradScaler' if r['grad_scaler'] else ''} | {r['channels_last']} "
                f"| {c['train_img_s']:.1f} | {c['step_ms']:.2f} | {c['fwd_bwd_ms']:.2f} "
                f"| {c['overhead_ms']:.2f} ({c['overhead_share']:.0%}) "
                f"| {c['forward_img_s']:.1f} | {1 / c['train_over_forward']:.2f}x "
                f"| {c['train_gflop_s'] / 1e3:.2f} | {c['matmul_gflop_s'] / 1e3:.1f} | {c['share']:.0%} |"
            )
    lines += [
        "",
        "Loader (bench_data (d): cached slices through make_loader, the preset's augmentation drawn in the "
        "workers, batches copied to the device):",
        "",
        "| px | augment | workers | batch | pinned | slices/s | x (c) one core | main process busy |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for report in _ok(summary["parts"].get("loader", [])):
        d = report.get("loader")
        if d:
            augment = "off" if d.get("augment") is None else ("on" if not d["augment"] else json.dumps(d["augment"]))
            lines.append(
                f"| {d.get('image_size', report.get('image_size'))} | {augment} "
                f"| {d['workers']} | {d['batch_size']} | {d['pinned']} | {d['rate']:.0f} "
                f"| {report['ratios']['d_over_c']:.1f}x | {d['main_process_cpu_share']:.0%} |"
            )
    lines += [
        "",
        "Predictor (bench_inference, batch 1, fp32, channels_last):",
        "",
        "| backbone | px | forward | predict | pred/fwd | batched per slice (fwd / predict_many) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for report in _ok(summary["parts"].get("inference", [])):
        for r in report["results"]:
            lines.append(
                f"| {r['backbone']} | {r['size']} | {r['forward_pred'] * 1e3:.2f} ms | {r['predictor'] * 1e3:.2f} ms "
                f"| {r['predict_over_forward']:.2f} | {r['batch_forward'] * 1e3:.2f} / {r['batch_predict'] * 1e3:.2f} ms |"
            )
    failed = [
        f"{name}: {r['command']} ({r['error']})"
        for name, part in summary["parts"].items()
        for r in part
        if "error" in r
    ]
    if failed:
        lines += ["", "Failed parts:", "", *[f"- {f}" for f in failed]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--out", type=Path, default=Path("build/bench-gpu"), help="summary folder (default build/bench-gpu)"
    )
    parser.add_argument(
        "--preset", default="full", metavar="full|full-h100|FILE.yaml",
        help="pipeline preset whose loader settings (and batch) are measured (default full)",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None,
        help="training batches (default: 10 and the preset's batch)",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed calls per training case (default 30)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds allowed to each part")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU needed: tiny CPU run of every part")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            f"error: no CUDA device is available to torch {torch.__version__} (CUDA build {torch.version.cuda}); "
            "this script measures a GPU. Run it on a CUDA machine, or with --cpu-smoke to check it here.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    args.out = Path.cwd() / args.out.expanduser()  # the parts run from the checkout: give them absolute paths
    if args.batch_sizes is None:
        args.batch_sizes = default_batch_sizes(args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    card = "no GPU (CPU)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    started = time.perf_counter()
    parts = commands(
        args.out, smoke=args.cpu_smoke, batch_sizes=args.batch_sizes, steps=args.steps, workers=args.workers,
        preset=args.preset,
    )
    summary = {
        "benchmark": "gpu_bench",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "card": card,
        "cores": cores(),
        "torch": torch.__version__,
        "smoke": args.cpu_smoke,
        "command": " ".join(
            ["python benchmarks/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "parts": run_parts(parts, args.timeout),
    }
    summary["seconds"] = time.perf_counter() - started
    (args.out / "gpu_bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    text = markdown(summary)
    (args.out / "gpu_bench.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    print(f"[gpu_bench] wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'}")
    failed = any("error" in r for part in summary["parts"].values() for r in part)
    return EXIT_PART_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
