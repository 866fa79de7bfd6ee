"""Keep freed memory in the process during training (glibc on Linux; elsewhere a no-op).

A CPU training step allocates and frees tensors of 100+ MB (attention maps and their
gradients). glibc serves blocks that large with mmap and returns them to the kernel on free,
so every step faults the same memory in again page by page: on 2 cores half of the CPU time
went to the kernel. Serving them from the heap and never trimming it makes a step faster
(benchmarks/bench_train_step.py; figures in docs/training.md); the cost is that the process
keeps its peak memory until it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; True where it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    no_mmap = mallopt(M_MMAP_MAX, 0) == 1
    no_trim = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return no_mmap and no_trim
