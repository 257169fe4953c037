"""Run records and benchmarks name the machine they ran on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hemorrhage_core.machine import cpu_name, device_label


def test_cpu_label_names_the_processor_and_its_cores():
    name = cpu_name()
    assert name and "\n" not in name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert f": {name}" in cpuinfo.read_text()
    assert device_label(torch.device("cpu")) == f"cpu ({name}, {os.cpu_count()} cores)"
