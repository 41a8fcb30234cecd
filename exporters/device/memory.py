"""Resident memory of this process, the one reader that host benchmarks and the device share.

`rss_kib` reads VmRSS from /proc/self/status (proc(5)); `trim_heap` hands glibc's free heap pages
back to the kernel (malloc_trim(3)) so that a reading counts what stays live, not what building a
session allocated and freed (without it one ONNX Runtime session's reading varied by a third,
benchmarks/README.md). Where /proc/self/status or VmRSS is missing (macOS, Windows) `rss_kib`
returns None and `unavailable_reason` says why; without glibc `trim_heap` does nothing.

Standard library only: this runs on the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

STATUS = "/proc/self/status"


def rss_kib() -> int | None:
    """This process's resident set size in KiB (VmRSS), or None where the system has no such field."""
    try:
        with open(STATUS) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def unavailable_reason() -> str | None:
    """Why `rss_kib` reads nothing here (one line), or None when it reads."""
    return None if rss_kib() is not None else f"no VmRSS in {STATUS} on this system (Linux only)"


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(libc).malloc_trim if libc else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None


def trim_heap() -> None:
    """Return glibc's free heap pages to the kernel (malloc_trim(0)); a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_delta_kib(before: int | None) -> int | None:
    """VmRSS growth since the reading `before`, after trimming the heap; None where RSS is unreadable."""
    trim_heap()
    after = rss_kib()
    return None if before is None or after is None else after - before


def reading() -> int | None:
    """A VmRSS reading after trimming the heap: the `before` of `resident_delta_kib`."""
    trim_heap()
    return rss_kib()
