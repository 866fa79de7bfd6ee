"""Will it fit in memory? Checked before anything large is allocated, so that a file or a run
too large gets one line with the size it needs instead of a crash part-way.

What is available is the smaller of the system's MemAvailable and what the memory cgroup
(a container's or a batch job's limit, v1 or v2) leaves to this process.
"""

from __future__ import annotations

from pathlib import Path

from napari_apformer.errors import InputError

# Working memory per slice of a batch at the model's 256 x 256 input, an upper estimate: on
# the CPU a 256 x 256 x 180 volume at batch 8 peaked 349 MiB above its input, labels included
# (docs/performance.md). What grows with the slice's own size is in working_bytes_per_slice.
WORKING_BYTES_PER_SLICE = 48 * 2**20
MEMINFO = Path("/proc/meminfo")
SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**60  # cgroup v1 writes about 2**63 for "no limit"
# (controller folder under CGROUP_ROOT, limit file, usage file, reclaimable page cache in
# memory.stat) for cgroup v2 and v1
CGROUP_FILES = {
    "v2": ("", "memory.max", "memory.current", "inactive_file"),
    "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def available_bytes() -> int | None:
    """Memory this process can still get: the smaller of MemAvailable and what the memory
    cgroups it is in (and those above them) leave; None where neither is known."""
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return min(known) if known else None


def working_bytes_per_slice(
    height: int, width: int, channels: int = 1, n_classes: int = 4, probabilities: bool = False
) -> int:
    """Working memory of one slice of a batch whose slices are height x width pixels: the
    model's fixed part at 256 x 256 plus what scales with the slice (two float32 copies of the
    input, float32 logits for every class at full size, the int64 argmax and uint8 labels,
    and float32 probabilities on request)."""
    per_pixel = 8 * channels + 4 * n_classes + 9 + (4 * n_classes if probabilities else 0)
    return WORKING_BYTES_PER_SLICE + height * width * per_pixel


def require_memory(needed: int, source: object, action: str = "reading it") -> None:
    """InputError naming `source`, what `action` needs and what is available, when it would
    not fit."""
    free = available_bytes()
    if free is not None and needed > free:
        raise InputError(
            f"{action} needs {size_text(needed)} of memory but only {size_text(free)} "
            "is available; close other programs or use a machine with more memory",
            source,
        )


def size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _meminfo_available() -> int | None:
    """Linux MemAvailable; None where unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """The least that any limiting memory cgroup of this process leaves (limit - usage, page
    cache that can be dropped counted as free); None where no limit is set or readable."""
    free = []
    for folder, version in _cgroup_folders():
        _, limit_name, usage_name, cache_name = CGROUP_FILES[version]
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is None or usage is None or limit >= NO_LIMIT:
            continue  # "max" (v2) or no limit (v1)
        free.append(max(0, limit - usage + _stat_value(folder / "memory.stat", cache_name)))
    return min(free, default=None)


def _cgroup_folders() -> list[tuple[Path, str]]:
    """This process's memory cgroup folders and every folder above them, with the version.

    /proc/self/cgroup has "0::/path" (v2) and "N:memory:/path" (v1). Inside a container the
    path may name a folder not mounted there: the folders above it (up to the mount, which is
    the container's own cgroup) are still read."""
    try:
        lines = SELF_CGROUP.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else ""
        if not version:
            continue
        base = CGROUP_ROOT / CGROUP_FILES[version][0]
        folder = base / path.strip("/")
        while True:
            folders.append((folder, version))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return folders


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
