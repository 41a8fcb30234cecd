"""glibc malloc settings for CPU training: keep freed activation blocks instead of re-faulting them.

A training step allocates and frees the same activation-sized blocks (megabytes each) every step.
With glibc's defaults, blocks above the mmap threshold are mapped fresh and unmapped when freed,
and a free top of the heap is trimmed back to the OS, so each step page-faults its activations in
again: a ResNet20 SGD step at batch 128 on 3x32x32 took 41,000 minor faults and ~110 ms of system
time (of ~400 ms) here. PyTorch's CPU tuning guide answers this by preloading jemalloc or
tcmalloc; glibc's own knobs (mallopt(3)) do the same job without a preload: raise the mmap
threshold to its ceiling and the trim threshold out of reach. Measured here (2-core VM, torch
2.13): ResNet20 SGD steps at batch 128 on 3x32x32, one process per setting, 289-318 ms against
342-371 ms; a 5,120-image Fashion-MNIST SGD epoch 18.9-19.0 s against 19.9-21.8 s; exact HERO's
double backward gains most (255,000 faults per step before). It changes the whole process, so
it is never a side effect: `hero train` calls it for CPU training, and a training loop of your own
calls `keep_freed_memory()` once before its first step to get the same step cost (as
`benchmarks/step_cost.py` does). The price: the process keeps its peak heap until it exits.
HERO_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30  # the largest power of two a C int holds
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OPT_OUT = "HERO_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults


def keep_freed_memory() -> bool:
    """Set the two thresholds; True if they took, False off glibc or where the user set their own.

    Idempotent and process-wide. Settings the user gave through glibc's MALLOC_*_ environment
    variables win, and HERO_KEEP_FREED_MEMORY=0 opts out: then this does nothing.
    """
    if os.environ.get(OPT_OUT) == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
