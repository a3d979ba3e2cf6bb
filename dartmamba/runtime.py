"""Process settings for CPU runs: glibc malloc's thresholds.

torch's CPU tensors come from ``malloc``. glibc returns the top of its heap to the system whenever more than
``M_TRIM_THRESHOLD`` of it is free (by default twice the largest block it has handed out by ``mmap`` so far), and it
serves blocks above ``M_MMAP_THRESHOLD`` by ``mmap`` each time; either way the next tensor of that size is new memory
that the kernel zero-fills page by page on first touch. A Vim layer frees many megabytes of temporaries at a time,
so in eager CPU inference the heap is trimmed and refaulted every layer: tens of thousands of minor page faults per
forward, against almost none with the thresholds raised (measured in docs/benchmarks.md). PyTorch's CPU
tuning guide gets the same effect by preloading jemalloc or tcmalloc; :func:`tune_cpu_allocator` does it with glibc's
own ``mallopt``, process-wide, so the process keeps freed memory (up to the trim threshold) for its next tensors
instead of returning it: its resident size stays at its high-water mark.

Nothing here runs at import. dartmamba's CPU entry points (training on CPU, the demo, the CPU benchmarks) call it
and say so in their logs; ``DARTMAMBA_TUNE_MALLOC=0`` leaves malloc as it is. In your own process, call it once at
the start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_cpu_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20     # blocks above 32 MiB still come from mmap (and go back at once)
TRIM_THRESHOLD = 512 << 20    # keep up to 512 MiB of free heap top
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3    # glibc's mallopt parameters (malloc.h)
_STATE: dict = {}


def _glibc():
    """glibc's C library, or None where the C library is another (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_cpu_allocator() -> str:
    """Raise glibc malloc's mmap and trim thresholds for this process (see the module docstring), once.

    Returns a line for logs saying what was done: the thresholds set, or why nothing was (the environment variable
    ``DARTMAMBA_TUNE_MALLOC=0``, a C library other than glibc, or ``mallopt`` refusing the values).
    """
    if "line" in _STATE:
        return _STATE["line"]
    if os.environ.get("DARTMAMBA_TUNE_MALLOC", "1").strip() == "0":
        line = "malloc left as it is (DARTMAMBA_TUNE_MALLOC=0)"
    else:
        libc = _glibc()
        if libc is None:
            line = f"malloc left as it is (the C library is not glibc: {platform.system()} {platform.libc_ver()[0]})"
        elif libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD) != 1:
            line = "malloc left as it is (glibc's mallopt refused the thresholds)"
        else:
            line = (f"glibc malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} "
                    f"MiB (freed tensors' memory is reused, not refaulted; DARTMAMBA_TUNE_MALLOC=0 to keep the "
                    f"defaults)")
    _STATE["line"] = line
    return line
