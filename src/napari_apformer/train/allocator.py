"""Keep freed memory in the process during training (glibc on Linux; elsewhere a no-op).

A CPU training step allocates and frees tensors of 100+ MB (attention maps and their
gradients). glibc serves blocks that large with mmap and returns them to the kernel on free,
so every step faults the same memory in again page by page: on 2 cores half of the CPU time
went to the kernel. Serving them from the heap and never trimming it makes a step faster
(benchmarks/bench_train_step.py; figures in docs/training.md). The cost is that the process
holds its peak memory, so `freed_memory_kept` gives it back when the run ends: a process that
trains and goes on (the viewer, a test session) does not keep the training's peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
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


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory for the duration of a training run, give it back afterwards."""
    kept = keep_freed_memory()
    try:
        yield kept
    finally:
        if kept:
            return_freed_memory()
