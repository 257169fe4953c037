"""Training throughput (images/s) per backbone, against the same model's forward-only throughput and a
matmul measured in the same run.

One optimizer step is the trainer's own: ``training.trainer.build_network`` builds Model1 and
``training.trainer.Loop`` its AdamW parameter groups, schedule, loss, grad scaler, device placement and
memory format; ``training.engine.train_one_epoch`` then runs forward, loss (+ Inception's aux loss),
finite-loss check, backward, gradient clipping and the optimizer step over one batch from the Loop's
own DataLoader (pinned memory on CUDA, copied to the device inside the step as in training). The images
are random and made before timing, so this measures the model step, not the data path (bench_data.py).
On CUDA the trainer's AMP (bf16 autocast, or fp16 with its GradScaler) and channels_last apply.

Sizes and settings come from the pipeline presets (training/configs/*.yaml), ImageNet weights aside
(speed does not depend on them; the trunk is frozen as those weights would freeze it):
  quick  every backbone at both quick sizes (phase 1's and phase 2's input size), quick.yaml's settings
  full   every backbone at its full size (vgg16*: 224, inception_v3: 299), full.yaml's settings

Baselines timed round-robin with the steps, so a busy machine slows them alike:
  fwd_bwd  the step's forward, loss and backward alone (no finite-loss read, clipping, optimizer or
           schedule): ``overhead`` is the step's time per batch minus this, what the loop adds around
           the arithmetic (a GPU step that waits for the host shows here)
  forward  eval-mode inference_mode forward of the same batch (the trainer's autocast and memory format)
  matmul   a square matmul (fp32 2048^3 on CPU; 8192^3 in the AMP dtype on CUDA); 'share' is the
           step's counted FLOPs per second (torch.utils.flop_counter, forward + backward) over its rate

    python benchmarks/bench_train.py                                  # quick sizes, 3 backbones
    python benchmarks/bench_train.py --sizes full --steps 3 --threads 1
    python benchmarks/bench_train.py --device cuda --sizes full --json train.json
    python benchmarks/bench_train.py --device cuda --sizes full --chunk 20   # 20 steps per timed call

``--chunk N`` times N consecutive steps per call (one epoch of N batches, as the trainer runs them:
the loss is read on the host once per CUDA_READ_EVERY steps and at the end), and reports per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hemorrhage_core.labels import LABELS, STAGE1_CLASSES  # noqa: E402
from hemorrhage_core.machine import cpu_name  # noqa: E402
from hemorrhage_core.models import BACKBONES  # noqa: E402
from training.config import ConfigError, PipelinePreset, TrainConfig  # noqa: E402
from training.distributed import DistEnv  # noqa: E402
from training.engine import LoopSettings, make_grad_scaler, set_batchnorm_eval, train_one_epoch  # noqa: E402
from training.trainer import Loop, Runtime, build_network, stage2_network  # noqa: E402

DEFAULT_BACKBONES = ("vgg16", "vgg16_bn", "inception_v3")
SIZE_SETS = ("quick", "full", "both")
EXIT_REFUSED = 2


# ----------------------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a backbone at a size, with the TrainConfig the preset gives it."""

    backbone: str
    size: int
    preset: str
    phase: str
    config: TrainConfig

    @property
    def trunk(self) -> str:
        return "frozen" if self.config.freeze_trunk else "trainable"


def preset_sizes(preset: PipelinePreset) -> dict[str, tuple[str, int]]:
    """phase -> (its stage-1 backbone, its input size in px) of a preset."""
    out = {}
    for phase in ("phase1", "phase2"):
        config = preset.config(phase, "stage1")
        size = config.input_size or BACKBONES[config.backbone].default_size
        out[phase] = (config.backbone, size)
    return out


def plan(
    backbones: list[str],
    sizes: str,
    *,
    batch_size: int = 10,
    device: str = "cpu",
    threads: int | None = None,
    trunk: str = "preset",
    px: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Case]:
    """The cases of a run: each backbone at the sizes of ``sizes`` (or at ``px``, quick settings).

    Each config is the preset's stage-1 config of the phase the size comes from, with the backbone,
    size, batch and device set; weights are ``none`` and ``freeze_trunk`` keeps what the preset's
    weights would give (frozen with ImageNet weights), unless ``trunk`` is ``frozen`` or ``trainable``.
    """
    wanted: list[tuple[str, str, int, str]] = []  # backbone, preset, size, phase
    for name in ("quick", "full"):
        if sizes not in (name, "both") or px:
            continue
        phases = preset_sizes(PipelinePreset.load(name))
        for backbone in backbones:
            if name == "quick":  # every backbone at both quick sizes
                wanted += [(backbone, name, size, phase) for phase, (_, size) in phases.items()]
            else:  # every backbone at the full size of the phase that trains it, else its own size
                phase = next((p for p, (b, _) in phases.items() if b == backbone), "phase1")
                own = phases[phase][1] if phases[phase][0] == backbone else BACKBONES[backbone].default_size
                wanted.append((backbone, name, own, phase))
    for size in px or []:
        wanted += [(backbone, "quick", size, "phase1") for backbone in backbones]
    cases = []
    for backbone, preset_name, size, phase in wanted:
        preset = PipelinePreset.load(preset_name)
        base = preset.config(phase, "stage1")
        frozen = base.freeze_trunk if base.freeze_trunk is not None else base.weights != "none"
        if trunk != "preset":
            frozen = trunk == "frozen"
        values = {
            "backbone": backbone,
            "image_size": size,
            "input_size": size,
            "batch_size": batch_size,
            "device": device,
            "threads": threads,
            "weights": "none",
            "freeze_trunk": frozen,
            "num_workers": 0,
            "progress": False,
            "data": "",
            **(overrides or {}),
        }
        config = preset.config(phase, "stage1", values)
        if size < BACKBONES[backbone].min_size:
            raise ConfigError(f"{backbone} needs at least {BACKBONES[backbone].min_size} px, got {size}")
        cases.append(Case(backbone, size, preset_name, phase, config))
    return cases


def cuda_settings(config: TrainConfig) -> tuple[LoopSettings, torch.amp.GradScaler | None]:
    """The loop settings and grad scaler the trainer uses for ``config`` on a CUDA device (no GPU needed)."""
    settings = LoopSettings.from_config(config, torch.device("cuda", 0), DistEnv())
    return settings, make_grad_scaler(settings)


# -------------------------------------------------------------------------------------- measuring
class RandomSlices(torch.utils.data.Dataset):
    """``n`` random windowed-like slices (values in [0, 1]) with stage-1 classes, as SliceDataset yields
    them, or (``stage`` 2) with the six stage-2 labels: a slice of class c > 0 has subtype c and ``any``."""

    def __init__(self, n: int, size: int, seed: int = 0, stage: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=generator)
        self.stage = stage
        self.targets = np.arange(n) % len(STAGE1_CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        c = int(self.targets[i])
        if self.stage == 1:
            return self.images[i], torch.tensor(c), f"ID_bench{i:05d}"
        labels = torch.zeros(len(LABELS))
        if c:
            labels[c - 1] = labels[-1] = 1.0
        return self.images[i], labels, f"ID_bench{i:05d}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, dict]:
    """Median wall and CPU seconds per call of each function, timed round-robin over ``rounds``."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def matmul_fn(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A square matmul on ``device`` and its FLOP count."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def count_flops(loop: Loop, settings: LoopSettings, images: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one training forward + backward and of one eval forward of ``images``.

    Counted on two images and scaled, which is exact for the convolutions and matmuls that dominate
    (per-image work), and avoids a third full-size step on a slow CPU.
    """
    two = images[:2]
    n = images.shape[0] / two.shape[0]
    loop.model.train()
    with FlopCounterMode(display=False) as counter:
        with settings.autocast():
            out = loop.model(settings.to_device(two))
            loss = out.logits.float().sum() + (
                out.aux_logits.float().sum() if out.aux_logits is not None else 0
            )
        loss.backward()
    train = counter.get_total_flops() * n
    loop.optimizer.zero_grad(set_to_none=True)
    loop.net.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), settings.autocast():
        loop.net(settings.to_device(two))
    return train, counter.get_total_flops() * n


def bench_case(case: Case, runtime: Runtime, *, steps: int, warmup: int, chunk: int = 1) -> dict[str, Any]:
    """Images/s of the trainer's optimizer step, of its forward + backward alone and of the eval
    forward, and the FLOP rates, for one case. Each timed call runs ``chunk`` batches; rates and
    ``step_ms`` are per batch."""
    config = case.config
    torch.manual_seed(config.seed)
    loop = Loop(
        config, build_network(config), RandomSlices(config.batch_size, case.size, config.seed), runtime
    )
    settings = dataclasses.replace(loop.settings, progress=False, max_steps=None)
    batch = next(iter(loop.loader))  # (images, targets, ids), pinned on CUDA, as the trainer's loader gives
    device = runtime.device

    def train_step() -> None:
        train_one_epoch(
            loop.model,
            [batch] * chunk,
            loop.optimizer,
            loop.scheduler,
            loop.loss_fn,
            settings,
            epoch=1,
            scaler=loop.scaler,
        )

    def fwd_bwd() -> None:
        loop.model.train()
        if settings.freeze_bn:
            set_batchnorm_eval(loop.model)
        for _ in range(chunk):
            inputs, target = settings.to_device(batch[0]), batch[1].to(device, non_blocking=True)
            with settings.autocast():
                out = loop.model(inputs)
                loss = loop.loss_fn(out.logits, target)
                if out.aux_logits is not None and settings.aux_loss_weight > 0:
                    loss = loss + settings.aux_loss_weight * loop.loss_fn(out.aux_logits, target)
            (loop.scaler.scale(loss) if loop.scaler is not None else loss).backward()
            loop.optimizer.zero_grad(set_to_none=True)

    def forward() -> None:
        loop.net.eval()
        with torch.inference_mode(), settings.autocast():
            for _ in range(chunk):
                loop.net(settings.to_device(batch[0]))

    matmul, matmul_flops = matmul_fn(device, settings.amp_dtype if settings.amp else torch.float32)
    train_flops, forward_flops = count_flops(loop, settings, batch[0])
    fns = {"train": train_step, "fwd_bwd": fwd_bwd, "forward": forward, "matmul": matmul}
    if warmup:
        interleaved(fns, warmup, device)
    t = interleaved(fns, steps, device)
    first = next(p for p in loop.net.parameters() if p.requires_grad)
    if not torch.isfinite(first).all():
        raise RuntimeError(f"{case.backbone} at {case.size} px: the weights became non-finite while timing")
    images = int(batch[0].shape[0])
    for name in ("train", "fwd_bwd", "forward"):  # per batch
        t[name] = {k: v / chunk for k, v in t[name].items()}
    result: dict[str, Any] = {
        "backbone": case.backbone,
        "px": case.size,
        "preset": case.preset,
        "phase": case.phase,
        "trunk": case.trunk,
        "batch": images,
        "steps": steps,
        "warmup": warmup,
        "chunk": chunk,
        "amp": str(settings.amp_dtype).removeprefix("torch.") if settings.amp else None,
        "grad_scaler": loop.scaler is not None,
        "channels_last": settings.channels_last,
        "train_gflop_per_step": train_flops / 1e9,
        "forward_gflop_per_batch": forward_flops / 1e9,
        "seconds": t,
    }
    for clock in ("wall", "cpu"):
        step, fwd, mm = t["train"][clock], t["forward"][clock], t["matmul"][clock]
        core = t["fwd_bwd"][clock]
        result[clock] = {
            "step_ms": step * 1e3,
            "fwd_bwd_ms": core * 1e3,
            "overhead_ms": (step - core) * 1e3,  # what the loop adds per step beyond forward + backward
            "overhead_share": (step - core) / step,
            "train_img_s": images / step,
            "forward_img_s": images / fwd,
            "train_over_forward": (images / step) / (images / fwd),
            "train_gflop_s": train_flops / step / 1e9,
            "matmul_gflop_s": matmul_flops / mm / 1e9,
            "share": (train_flops / step) / (matmul_flops / mm),
        }
    return result


def _trainer_step(config: TrainConfig, case: Case, runtime: Runtime, *, force_bf16: bool = False,
                  memory_format: torch.memory_format | None = None) -> Callable[[], None]:
    """One optimizer step of the trainer built from ``config`` on a fixed random batch, as a callable.
    ``force_bf16`` turns bf16 autocast + channels_last on even where the trainer would keep float32;
    ``memory_format`` sets the layout of the model and its inputs whatever the trainer would choose."""
    torch.manual_seed(config.seed)
    if config.stage == 2:  # Model2 on a fresh Model1 trunk (build_network would read a stage-1 run)
        net = stage2_network(build_network(config.replace(stage=1, head_warmup_epochs=0.0)), config)
    else:
        net = build_network(config)
    loop = Loop(config, net, RandomSlices(config.batch_size, case.size, config.seed, config.stage), runtime)
    settings = dataclasses.replace(loop.settings, progress=False, max_steps=None)
    if force_bf16 and not settings.amp:
        settings = dataclasses.replace(settings, amp=True, channels_last=True)
        loop.net.to(memory_format=torch.channels_last)
    if memory_format is not None:
        settings = dataclasses.replace(settings, channels_last=memory_format == torch.channels_last)
        loop.net.to(memory_format=memory_format)
    batch = next(iter(loop.loader))
    loop.net.stn.output_size = loop.input_size_at(1)  # an early epoch's size where early_input_size is set

    def step() -> None:
        train_one_epoch(loop.model, [batch], loop.optimizer, loop.scheduler, loop.loss_fn, settings,
                        epoch=1, scaler=loop.scaler, hold=loop.hold)

    return step


def _pair_rates(case: Case, runtime: Runtime, steps_by_name: dict[str, Callable[[], None]], *,
                steps: int, warmup: int, images: dict[str, int] | None = None) -> dict[str, Any]:
    """Time two step callables round-robin; images/s of each and the ratio second over first, per clock.
    ``images`` gives each callable's batch where they differ (default: the case's batch size)."""
    if warmup:
        interleaved(steps_by_name, warmup, runtime.device)
    t = interleaved(steps_by_name, steps, runtime.device)
    a, b = steps_by_name
    count = images or dict.fromkeys(steps_by_name, case.config.batch_size)
    out: dict[str, Any] = {"backbone": case.backbone, "px": case.size, "seconds": t}
    for clock in ("wall", "cpu"):
        rate_a, rate_b = count[a] / t[a][clock], count[b] / t[b][clock]
        out[clock] = {f"{a}_img_s": rate_a, f"{b}_img_s": rate_b, "ratio": rate_b / rate_a}
    return out


def bench_cpu_precision(case: Case, runtime: Runtime, *, steps: int, warmup: int) -> dict[str, Any]:
    """The trainer's optimizer step in float32 and with ``cpu_bf16`` (bf16 autocast + channels_last),
    timed round-robin on the same batch in this run; the ratio is bf16 over float32 images/s.

    ``native`` says whether the CPU computes bf16 itself; elsewhere the trainer keeps float32 (the
    bf16 timing here then forces emulated bf16 to show what the fallback avoids).
    """
    from hemorrhage_core.machine import cpu_has_native_bf16

    steps_by_name = {
        "float32": _trainer_step(case.config.replace(cpu_bf16=False), case, runtime),
        "bf16": _trainer_step(case.config.replace(cpu_bf16=True), case, runtime, force_bf16=True),
    }
    return {"native_bf16": cpu_has_native_bf16(), **_pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup)}


def bench_layout(case: Case, runtime: Runtime, *, steps: int, warmup: int) -> dict[str, Any]:
    """The trainer's optimizer step at the case's precision with the model and its inputs in NCHW and in
    channels_last (NHWC), timed round-robin on the same batch in this run; the ratio is channels_last
    over NCHW images/s. With ``cpu_bf16=false`` it measures float32, what a CPU without native bf16 runs."""
    steps_by_name = {
        "nchw": _trainer_step(case.config, case, runtime, memory_format=torch.contiguous_format),
        "channels_last": _trainer_step(case.config, case, runtime, memory_format=torch.channels_last),
    }
    return _pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup)


def bench_optimizer(case: Case, runtime: Runtime, *, steps: int, warmup: int) -> dict[str, Any]:
    """The trainer's step with torch's default AdamW (one parameter at a time on CPU, multi-tensor on CUDA)
    and with the fused one (``fused_optimizer``, the trainer's default), timed round-robin on the same
    batch in this run; the ratio is fused over default."""
    steps_by_name = {
        "default": _trainer_step(case.config.replace(fused_optimizer=False), case, runtime),
        "fused": _trainer_step(case.config.replace(fused_optimizer=True), case, runtime),
    }
    return _pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup)


def bench_head_warmup(case: Case, runtime: Runtime, *, steps: int, warmup: int) -> dict[str, Any]:
    """A stage-2 step that trains everything and one while ``head_warmup_epochs`` holds the STN and
    backbone (``TrunkHold``: no trunk gradient, backward stops at the new layers), timed round-robin on
    the same batch in this run; the ratio is held over trained. The hold outlasts every timed step."""
    stage2 = case.config.replace(stage=2, epochs=10_000)
    steps_by_name = {
        "trained": _trainer_step(stage2, case, runtime),
        "held": _trainer_step(stage2.replace(head_warmup_epochs=9_999), case, runtime),
    }
    return _pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup)


def bench_early_size(case: Case, runtime: Runtime, *, px: int, steps: int, warmup: int) -> dict[str, Any]:
    """The trainer's step at the case's size and in an early epoch at ``px`` (``early_input_size``: the
    STN resamples to fewer pixels), timed round-robin on the same batch in this run; the ratio is early
    over full images/s, what an early epoch saves."""
    config = case.config.replace(epochs=max(case.config.epochs, 2))
    steps_by_name = {
        "full": _trainer_step(config, case, runtime),
        "early": _trainer_step(config.replace(early_input_size=px, early_epochs=1), case, runtime),
    }
    return {"early_px": px, **_pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup)}


def bench_batch(case: Case, runtime: Runtime, *, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """The trainer's step at the case's batch and at ``batch`` images, timed round-robin in this run; the
    ratio is images/s at ``batch`` over images/s at the case's batch."""
    steps_by_name = {
        "base": _trainer_step(case.config, case, runtime),
        "other": _trainer_step(case.config.replace(batch_size=batch), case, runtime),
    }
    images = {"base": case.config.batch_size, "other": batch}
    return {"other_batch": batch,
            **_pair_rates(case, runtime, steps_by_name, steps=steps, warmup=warmup, images=images)}


# ----------------------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"


def print_header(report: dict[str, Any]) -> None:
    clock = report["clock"]
    print(f"date: {report['date']}")
    print(
        f"device: {report['device']}; {report['cores']} cores visible; torch {report['torch']}, "
        f"{report['threads']} threads"
    )
    print(f"clock: {'CPU time of this process (all its threads)' if clock == 'cpu' else 'wall-clock'}")
    print(f"command: {report['command']}")
    print()
    print(
        "| backbone | px | trunk | batch | train img/s | ms/step | fwd+bwd ms | overhead ms | fwd img/s "
        "| fwd/train | GFLOP/step | train GFLOP/s | matmul GFLOP/s | share |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
          flush=True)


def row(r: dict[str, Any], clock: str) -> str:
    """One table row of a result, by ``clock``."""
    c = r[clock]
    return (
        f"| {r['backbone']} | {r['px']} | {r['trunk']} | {r['batch']} | {c['train_img_s']:.2f} "
        f"| {c['step_ms']:.1f} | {c['fwd_bwd_ms']:.1f} | {c['overhead_ms']:.1f} | {c['forward_img_s']:.2f} "
        f"| {1 / c['train_over_forward']:.2f}x | {r['train_gflop_per_step']:.1f} | {c['train_gflop_s']:.0f} "
        f"| {c['matmul_gflop_s']:.0f} | {c['share']:.0%} |"
    )


def print_footer(report: dict[str, Any]) -> None:
    clock = report["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    print()
    print(
        "train img/s: one optimizer step of the trainer (forward + loss + backward + clip + AdamW), median of "
        "the timed steps; overhead ms: ms/step minus the forward + loss + backward alone (fwd+bwd ms); fwd/train: eval forward throughput over training throughput of the same batch "
        "(about 3x when every layer trains, less with a frozen trunk: no weight gradients there); share: "
        "the step's counted FLOP rate over the matmul's, both measured round-robin in this run."
    )
    for r in report["results"]:
        c = r[other]
        print(
            f"by {other} time: {r['backbone']}@{r['px']} {c['train_img_s']:.2f} img/s, "
            f"fwd/train {1 / c['train_over_forward']:.2f}x, share {c['share']:.0%}"
        )


def pair_table(
    cases: list[Case],
    measure: Callable[..., dict[str, Any]],
    header: str,
    rule: str,
    cells: Callable[[dict[str, Any], dict[str, Any]], str],
    *,
    runtime: Runtime,
    clock: str,
    steps: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Run a round-robin pair benchmark (``measure``) on every case and print it as a markdown table:
    backbone, px, ``cells`` of the result and its ``clock`` rates, then the ratio. Returns the results."""
    print()
    print(header)
    print(rule, flush=True)
    results = []
    for case in cases:
        r = measure(case, runtime, steps=steps, warmup=warmup)
        results.append(r)
        c = r[clock]
        print(f"| {r['backbone']} | {r['px']} | {cells(r, c)} | {c['ratio']:.2f}x |", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--sizes", choices=SIZE_SETS, default="quick", help="preset sizes (default quick)")
    parser.add_argument(
        "--px",
        type=int,
        nargs="+",
        default=None,
        help="explicit input sizes instead of --sizes (quick preset settings)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median; default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument(
        "--chunk", type=int, default=1, help="consecutive steps per timed call, reported per step (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=10, help="images per step (default 10, the seed's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    parser.add_argument(
        "--trunk",
        choices=("preset", "frozen", "trainable"),
        default="preset",
        help="backbone trunk: as the preset's weights leave it (default), or forced",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field, e.g. amp=false or channels_last=false",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="clock of the table (default: cpu on CPU, wall on CUDA); both are recorded",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    parser.add_argument(
        "--cpu-bf16-ratio",
        action="store_true",
        help="on CPU: time each case's step in float32 and with cpu_bf16, round-robin, and print the ratio",
    )
    parser.add_argument(
        "--channels-last-ratio",
        action="store_true",
        help="time each case's step with the model and inputs in NCHW and in channels_last, round-robin, "
        "at the precision the trainer uses here (--set cpu_bf16=false: float32), and print the ratio",
    )
    parser.add_argument(
        "--optimizer-ratio",
        action="store_true",
        help="time each case's step with torch's default and the fused AdamW, round-robin, and print the ratio",
    )
    parser.add_argument(
        "--head-warmup-ratio",
        action="store_true",
        help="time each case's stage-2 step with the trunk trained and held (head_warmup_epochs), round-robin",
    )
    parser.add_argument(
        "--early-size-ratio",
        type=int,
        default=None,
        metavar="PX",
        help="time each case's step at its size and at PX (an early_input_size epoch), round-robin",
    )
    parser.add_argument(
        "--batch-ratio",
        type=int,
        default=None,
        metavar="N",
        help="time each case's step at --batch-size and at N images, round-robin, and print images/s of both",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.chunk < 1:
        parser.error(
            "--steps and --chunk must be >= 1, --warmup >= 0 and --batch-size >= 2 (batch norm needs two images)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda: no CUDA device is available to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    from training.train_cmd import parse_sets

    try:
        cases = plan(
            args.backbones,
            args.sizes,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
            trunk=args.trunk,
            px=args.px,
            overrides=parse_sets(args.set),
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    runtime = Runtime(DistEnv(), device)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    report: dict[str, Any] = {
        "benchmark": "bench_train",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "command": " ".join(
            ["python benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "results": [],
    }
    print_header(report)
    for case in cases:
        report["results"].append(bench_case(case, runtime, steps=args.steps, warmup=args.warmup, chunk=args.chunk))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the case's model and optimizer state are gone: free their memory
        print(row(report["results"][-1], clock), flush=True)
    print_footer(report)
    if args.cpu_bf16_ratio and device.type == "cpu":
        report["cpu_precision"] = pair_table(
            cases, bench_cpu_precision, "| backbone | px | native bf16 | float32 img/s | bf16 + channels_last img/s "
            "| bf16 / float32 |", "| --- | ---: | --- | ---: | ---: | ---: |",
            lambda r, c: f"{'yes' if r['native_bf16'] else 'no (emulated)'} | {c['float32_img_s']:.2f} "
            f"| {c['bf16_img_s']:.2f}", runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.channels_last_ratio:
        report["layout"] = pair_table(
            cases, bench_layout, "| backbone | px | NCHW img/s | channels_last img/s | channels_last / NCHW |",
            "| --- | ---: | ---: | ---: | ---: |", lambda r, c: f"{c['nchw_img_s']:.2f} | {c['channels_last_img_s']:.2f}",
            runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.optimizer_ratio:
        report["optimizer"] = pair_table(
            cases, bench_optimizer, "| backbone | px | default AdamW img/s | fused AdamW img/s | fused / default |",
            "| --- | ---: | ---: | ---: | ---: |", lambda r, c: f"{c['default_img_s']:.2f} | {c['fused_img_s']:.2f}",
            runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.head_warmup_ratio:
        report["head_warmup"] = pair_table(
            cases, bench_head_warmup, "| backbone | px | stage-2 step, trunk trained img/s | trunk held img/s "
            "| held / trained |", "| --- | ---: | ---: | ---: | ---: |",
            lambda r, c: f"{c['trained_img_s']:.2f} | {c['held_img_s']:.2f}",
            runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.early_size_ratio:
        report["early_size"] = pair_table(
            cases, partial(bench_early_size, px=args.early_size_ratio), "| backbone | px | early px "
            "| full size img/s | early epoch img/s | early / full |", "| --- | ---: | ---: | ---: | ---: | ---: |",
            lambda r, c: f"{r['early_px']} | {c['full_img_s']:.2f} | {c['early_img_s']:.2f}",
            runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.batch_ratio:
        report["batch"] = pair_table(
            cases, partial(bench_batch, batch=args.batch_ratio), f"| backbone | px | batch {args.batch_size} img/s "
            f"| batch {args.batch_ratio} img/s | ratio |", "| --- | ---: | ---: | ---: | ---: |",
            lambda r, c: f"{c['base_img_s']:.2f} | {c['other_img_s']:.2f}",
            runtime=runtime, clock=clock, steps=args.steps, warmup=args.warmup)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
