"""Keep freed memory in the process while a model runs or trains (glibc on Linux; elsewhere a
no-op).

glibc serves a block larger than its mmap threshold with mmap and returns it to the kernel on
free, and it hands the free top of its heap back too. A pass of the model allocates and frees
tensors of tens of MB (attention scores), training 100+ MB (and their gradients). Whether glibc
keeps them depends on what the process did before: its mmap threshold adapts to the blocks it
has seen, and stops adapting for good once any program option is set. When it does not keep
them, every pass faults the same memory in again page by page: 34,000 minor faults per slice
and 0.83 x the speed in a 512 x 512 x 300 volume, 37,000 per change of the gate in the widget,
half of the CPU time in a training step (docs/performance.md, docs/training.md).

So while a model runs (a training run; a batch of the engine) the process keeps what it frees:
no mmap, no trimming. Afterwards, large blocks go to mmap again and free heap at the top of up
to KEEP_BETWEEN_RUNS stays in the process, so the next slider change finds its memory in place.
Training and a run of several batches (a volume) hand everything they freed back to the kernel
when they end, so a viewer does not keep a volume's peak.
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
DEFAULT_MMAP_MAX = 65536  # glibc's default
NEVER = 2**31 - 1
KEEP_BETWEEN_RUNS = 256 * 2**20


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


_LIBC = _glibc()
_lock = threading.Lock()
_runs = 0  # runs going now, in any thread
_give_back = False  # asked for while runs were going: done when the last one ends


@contextlib.contextmanager
def freed_memory_kept(give_back: bool = True) -> Iterator[bool]:
    """Keep freed memory while the block runs (blocks in several threads share the setting);
    yields whether that took effect. give_back: hand what was freed back to the kernel when
    the last block ends (give_back_freed_memory); otherwise up to KEEP_BETWEEN_RUNS of free
    heap stays for the next run."""
    global _runs
    if _LIBC is None:
        yield False
        return
    with _lock:
        if _runs == 0:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, NEVER)
        _runs += 1
    try:
        yield True
    finally:
        with _lock:
            _runs -= 1
            pending = _runs == 0 and _give_back  # asked for while this block went on
            if _runs == 0:
                _LIBC.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_BETWEEN_RUNS)
        if give_back or pending:
            give_back_freed_memory()


def give_back_freed_memory() -> None:
    """Hand the memory freed so far back to the kernel: now, or when the blocks that keep
    freed memory now have all ended."""
    global _give_back
    if _LIBC is None:
        return
    with _lock:
        if _runs:
            _give_back = True
            return
        _give_back = False
    _LIBC.malloc_trim(0)
