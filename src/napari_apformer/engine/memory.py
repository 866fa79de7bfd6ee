"""Will a run fit in memory? Checked before anything large is allocated, so that a volume
too large gets a message with the size it needs instead of a crash part-way."""

from __future__ import annotations

from pathlib import Path

# Working memory of one slice in a batch: measured peak of the model's activations at
# 256 x 256 (about 40 MiB on the CPU, see docs/performance.md), rounded up.
WORKING_BYTES_PER_SLICE = 48 * 2**20
MEMINFO = Path("/proc/meminfo")


def available_bytes() -> int | None:
    """Memory the system can still hand out (Linux MemAvailable); None where unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
