"""Will a run fit in memory? Checked before anything large is allocated, so that a volume
too large gets a message with the size it needs instead of a crash part-way."""

from __future__ import annotations

from pathlib import Path

# Working memory per slice of a batch, an upper estimate: on the CPU a 256 x 256 x 180 volume
# at batch 8 peaked 349 MiB above its input, labels included (docs/performance.md).
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
