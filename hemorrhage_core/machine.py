"""What a run or a benchmark ran on, in words: timings mean little without the machine's name."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the label: the benchmarks that time whole processes don't load it
    import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_label(device: torch.device) -> str:
    """``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (Intel(R) Xeon(R) ..., 2 cores)``."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores)"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast pays.

    Elsewhere torch emulates bf16 and autocast is slower than float32, so callers fall back to it.
    ``HEMORRHAGE_CPU_BF16=0`` or ``=1`` overrides the detection (for measurements and tests).
    """
    forced = os.environ.get("HEMORRHAGE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
