"""What a timing was measured on: the CPU's model name and vector extensions, threads, device.

Speed depends on the CPU far more than on anything else (AVX-512 or AMX against AVX2 alone), so
every benchmark table and every card's wall time names the CPU and its flags.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The extensions that decide how fast torch's CPU kernels run, in the order printed.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    return (
        _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    )


def cpu_flags() -> list[str]:
    """The vector extensions of VECTOR_FLAGS this CPU has ([] where /proc/cpuinfo is absent)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in VECTOR_FLAGS if f in flags]


def describe(device: torch.device | str = "cpu") -> str:
    """One line: CPU model and flags, cores, torch threads, device (imports torch, so the
    command line's start-up, which names the CPU only, does not)."""
    import torch

    device = torch.device(device)
    flags = ", ".join(cpu_flags()) or "flags unknown"
    text = (
        f"{cpu_name()} ({flags}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, {device.type}"
    )
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    return text
