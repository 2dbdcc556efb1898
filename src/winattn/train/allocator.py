"""glibc malloc settings for a training process on the CPU.

A training step allocates and frees the same large tensors (activations, attention
probabilities, gradients) every step. glibc serves blocks above its mmap threshold (128 KiB at
start, raised as such blocks are freed, at most 32 MiB) with fresh pages from the kernel, and
returns the top of its heap to the kernel whenever more than its trim threshold lies free
there. Either way the next step's tensors land on new pages, and every 4 KiB page costs a
page fault when first written: about 0.7 us each on the hosts measured, i.e. a cast of a
15 MB tensor into fresh memory took 1.8 ms against 0.5 ms into reused memory.

:func:`tune_malloc` sets both thresholds so that blocks up to 32 MiB come from the heap and the
heap is kept: freed memory is reused by the next step instead of being returned and faulted
in again. A Swin-T step on the CPU (batch 8, 224x224, ``benchmarks/ablate_malloc.py``)
measured 1.02x as fast in float32 and 1.06x in bf16, for a peak resident set 1-3% larger
(docs/training.md, "The allocator"). It is process-wide, so the ``winattn`` command applies it
to its own training processes; importing winattn never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

#: mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): blocks above it are
#: always mapped. mallopt refuses larger values, and so does the MALLOC_MMAP_THRESHOLD_
#: environment variable, silently.
MMAP_THRESHOLD = 32 * 1024 * 1024

#: Free bytes at the top of the heap before glibc gives them back: the largest value mallopt
#: takes (an ``int``), 2 GiB, i.e. in effect never during training (the memory is needed again
#: next step).
TRIM_THRESHOLD = 2**31 - 1

#: Environment variables through which a user sets glibc's malloc: left alone when present.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES")

#: Allocators that replace glibc's malloc when preloaded.
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> Any | None:
    """The C library, if it is glibc (the only one whose mallopt takes these parameters)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(environ: dict[str, str] | None = None, libc: Any | None = None) -> str:
    """Keep freed heap memory for reuse (see the module docstring), unless the user chose.

    Args:
        environ: the environment to read (default ``os.environ``).
        libc: the C library to call (default: this process's, when it is glibc).

    Returns:
        What was done, for the log: ``"tuned"``, or why not (``"not glibc"``,
        ``"MALLOC_TRIM_THRESHOLD_ is set"``, ``"jemalloc is preloaded"``, ``"mallopt refused"``).
    """
    environ = os.environ if environ is None else environ
    for name in USER_SETTINGS:
        if name in environ:
            return f"{name} is set"
    preload = environ.get("LD_PRELOAD", "")
    for allocator in OTHER_ALLOCATORS:
        if allocator in preload:
            return f"{allocator} is preloaded"
    libc = _glibc() if libc is None else libc
    if libc is None:
        return "not glibc"
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    return "tuned" if ok else "mallopt refused"
