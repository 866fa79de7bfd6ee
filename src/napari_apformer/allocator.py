"""Keep freed memory in the process while a run lasts (glibc on Linux; elsewhere a no-op).

A CPU training step allocates and frees tensors of 100+ MB (attention maps and their
gradients). glibc serves blocks that large with mmap and returns them to the kernel on free,
so every step faults the same memory in again page by page: on 2 cores half of the CPU time
went to the kernel. Inference meets the same on a smaller scale (MobileUtr faulted about
100 MB per slice). Serving such blocks from the heap and never trimming it makes a step faster
(benchmarks/bench_train_step.py, benchmarks/bench_inference.py; figures in docs/training.md and
docs/performance.md). The cost is that the process holds its peak memory, so
`freed_memory_kept` gives it back when the last run that asked for it ends: a process that
trains or segments and goes on (the viewer, a test session) does not keep the run's peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults, restored afterwards
DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    return libc


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; True where it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    no_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
    no_trim = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return no_mmap and no_trim


def return_freed_memory() -> None:
    """Restore glibc's defaults and hand the memory freed so far back to the kernel."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)


_lock = threading.Lock()
_holders = 0  # runs inside freed_memory_kept (runs in several threads may overlap)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory while the block runs; give it back when the last such block ends."""
    global _holders
    with _lock:
        kept = keep_freed_memory() if _holders == 0 else True
        _holders += kept
    try:
        yield kept
    finally:
        with _lock:
            _holders -= kept
            if kept and _holders == 0:
                return_freed_memory()
