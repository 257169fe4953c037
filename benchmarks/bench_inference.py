"""Inference speed per backbone on CPU, against the machine's own fp32 matmul rate measured in this run.

For each backbone at its default input size (batch 1, untrained weights: speed does not depend on them):
  forward     bare model forward, median ms after warm-up, in three variants:
              no_grad (NCHW) | inference_mode (NCHW) | inference_mode + channels_last
  predictor   Predictor.predict from DICOM bytes of a 512 x 512 slice (read, HU checks, windowing,
              resize, STN, backbone, probabilities), median ms
  batched     predict_many over --batch slices vs one batched forward of the same size (per slice)
and prints Predictor/forward (target <= 1.15), the model's FLOPs (torch.utils.flop_counter) and the
achieved GFLOP/s as a share of the measured 2048^3 fp32 matmul rate (target >= 60% for VGG16@224).

    python benchmarks/bench_inference.py                        # all backbones, about 3-5 min on 2 cores
    python benchmarks/bench_inference.py --backbones resnet18 --repeats 5
    python benchmarks/bench_inference.py --threads 1             # per core, steadier on a shared machine
    python benchmarks/bench_inference.py --device cuda --json inference.json   # on a GPU (matmul 8192^3
                                         # fp32 there; cuDNN convolutions may use TF32, so share can pass 100%)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hemorrhage_core.dicom import new_uid, write_ct_slice  # noqa: E402
from hemorrhage_core.inference import Predictor  # noqa: E402
from hemorrhage_core.machine import cpu_name  # noqa: E402
from hemorrhage_core.models import BACKBONES, ModelSpec, build_model  # noqa: E402
from hemorrhage_core.windowing import DEFAULT_STACK  # noqa: E402

TARGET_PREDICTOR_RATIO = 1.15
TARGET_VGG16_SHARE = 0.60
MATMUL_N = 2048


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, min_seconds: float = 0.0,
                        warmup: int = 2, device: torch.device | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so that a shared, noisy machine
    slows every variant alike and the ratios between them stay meaningful. On CUDA each call is
    followed by a synchronisation, so its time includes the queued GPU work."""
    if device is not None and device.type == "cuda":
        fns = {name: _synced(fn, device) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 50):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def phantom_dicom(tmp: Path, size: int = 512) -> bytes:
    """A 512 x 512 head-like CT slice (air, skull, brain, a hyperdense blob) as DICOM bytes."""
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    r = np.hypot(xx / 0.8, yy)
    hu = np.full((size, size), -1000.0)
    hu[r < 0.42], hu[r < 0.37] = 1200.0, 35.0
    hu[np.hypot(xx - 0.1, yy) < 0.05] = 75.0
    path = tmp / "ID_bench0000.dcm"
    write_ct_slice(path, np.rint(hu + 1024).astype(np.int16), patient_id="bench", study_uid=new_uid("bench-study"),
                   series_uid=new_uid("bench-series"), sop_uid=new_uid("bench-sop"), z=0.0, instance_number=1)
    return path.read_bytes()


def _forward(model: torch.nn.Module, grad_mode: Callable[[], AbstractContextManager], x: torch.Tensor):
    def run() -> object:
        with grad_mode():
            return model(x)

    return run


def bench_backbone(name: str, dicom: bytes, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(ModelSpec(name, 1)).eval().to(device)
    size = model.spec.input_size
    x = torch.rand(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    flops = counter.get_total_flops()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # The Predictor as evaluate/predict/the dashboard build it, with the checkpoint image size equal to
    # the backbone's default size; it gets its own copy because it sets the model's memory format.
    predictor = Predictor(copy.deepcopy(model), {"image_size": size, "windows": DEFAULT_STACK.to_list()}, device=device)
    x_pred = x.contiguous(memory_format=predictor.memory_format)
    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = interleaved_medians(
        {
            "matmul": lambda: torch.mm(a, b),
            "no_grad": _forward(model, torch.no_grad, x),
            "inference_mode": _forward(model, torch.inference_mode, x),
            "channels_last": _forward(model_cl, torch.inference_mode, x_cl),
            "forward_pred": _forward(predictor.model, torch.inference_mode, x_pred),
            "predictor": lambda: predictor.predict(dicom),
        },
        args.repeats, args.min_seconds, device=device,
    )
    out = {"backbone": name, "size": size, "gflop": flops / 1e9, **t,
           "matmul_gflops": 2 * n**3 / t["matmul"] / 1e9}
    # Batched: predict_many vs one batched forward of the same size, per slice.
    xb = torch.rand(args.batch, 3, size, size, device=device).contiguous(memory_format=predictor.memory_format)
    sources = [dicom] * args.batch
    tb = interleaved_medians(
        {
            "batch_forward": _forward(predictor.model, torch.inference_mode, xb),
            "batch_predict": lambda: predictor.predict_many(sources, batch_size=args.batch),
        },
        repeats=2, warmup=1, device=device,
    )
    out.update({k: v / args.batch for k, v in tb.items()})
    return out


def matmul_size(device: torch.device) -> int:
    """Side of the baseline matmul: big enough to reach the device's rate (a GPU needs more work)."""
    return 8192 if device.type == "cuda" else MATMUL_N


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant at least (median)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="keep timing a variant at least this long")
    parser.add_argument("--batch", type=int, default=8, help="slices per batch for the batched comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core); 1 is steadier on a busy machine")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models and the Predictor run (default cpu)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    started = datetime.datetime.now().isoformat(timespec="seconds")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_name()
    print(f"# bench_inference {started}")
    print(f"# {args.device}: {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    header = (f"{'backbone':<19}{'px':>4}{'GFLOP':>7}{'matmul':>8}{'no_grad':>9}{'inf_mode':>9}{'ch_last':>9}"
              f"{'predict':>9}{'pred/fwd':>9}{'GFLOP/s':>9}{'share':>7}{'batch fwd':>10}{'many':>8}{'many/fwd':>9}")
    print(header + "\n" + "-" * len(header))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        dicom = phantom_dicom(Path(tmp))
        for name in args.backbones:
            r = bench_backbone(name, dicom, args)
            results.append(r)
            best = min(r["no_grad"], r["inference_mode"], r["channels_last"])
            achieved, rate = r["gflop"] / best, r["matmul_gflops"]
            ratio = r["predictor"] / r["forward_pred"]
            many_ratio = r["batch_predict"] / r["batch_forward"]
            print(f"{name:<19}{r['size']:>4}{r['gflop']:>7.2f}{rate:>8.0f}{r['no_grad'] * 1e3:>8.1f}m{r['inference_mode'] * 1e3:>8.1f}m"
                  f"{r['channels_last'] * 1e3:>8.1f}m{r['predictor'] * 1e3:>8.1f}m{ratio:>9.2f}{achieved:>9.0f}"
                  f"{achieved / rate:>7.0%}{r['batch_forward'] * 1e3:>9.1f}m{r['batch_predict'] * 1e3:>7.1f}m"
                  f"{many_ratio:>9.2f}", flush=True)
    n = matmul_size(torch.device(args.device))
    print(f"\nms columns: medians per call (batch 1), timed round-robin with a {n}^3 fp32 matmul whose rate "
          "(GFLOP/s, 'matmul') is the baseline of 'share'; GFLOP/s uses the fastest forward variant; "
          "'batch fwd'/'many': per slice at --batch; pred/fwd compares with the Predictor's memory format.")
    print(f"targets: predict/forward <= {TARGET_PREDICTOR_RATIO}; VGG16@224 share >= {TARGET_VGG16_SHARE:.0%}")
    for r in results:
        ratio = r["predictor"] / r["forward_pred"]
        status = "meets" if ratio <= TARGET_PREDICTOR_RATIO else "misses"
        print(f"  {r['backbone']}: predict/forward {ratio:.2f} {status} the target")
        if r["backbone"] == "vgg16":
            share = r["gflop"] / min(r["no_grad"], r["inference_mode"], r["channels_last"]) / r["matmul_gflops"]
            print(f"  vgg16: {share:.0%} of the matmul rate {'meets' if share >= TARGET_VGG16_SHARE else 'misses'} the target")
    if args.json:
        record = {
            "benchmark": "bench_inference", "date": started, "device": args.device, "device_name": where,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": f"python benchmarks/bench_inference.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
            "results": [
                {**r, "predict_over_forward": r["predictor"] / r["forward_pred"],
                 "share": r["gflop"] / min(r["no_grad"], r["inference_mode"], r["channels_last"]) / r["matmul_gflops"]}
                for r in results
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
