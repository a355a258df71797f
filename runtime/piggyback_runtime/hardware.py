"""What machine this is, in words: for profile keys and for labelling benchmark results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model with its core count (where a benchmark's figures come from)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model_name()} ({os.cpu_count()} cores)"
