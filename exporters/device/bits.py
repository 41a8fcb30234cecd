"""The weight bit widths hero-deploy quantizes to, the one check and parser of them, and the
integer grid each width quantizes to.

Torch-free, so `hero check`, the bundle manifest reader and the device can check a bit width the
same way the quantizer does (`exporters.grid` and `exporters.quantize` import them from here).
"""

from __future__ import annotations

import numbers

from exporters.device.errors import HeroError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def _spoken(widths: tuple[int, ...]) -> str:
    """(2, 3, ..., 8, 16) -> 'between 2 and 8 or 16'."""
    runs: list[list[int]] = []
    for b in sorted(widths):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return " or ".join(f"between {lo} and {hi}" if hi > lo else str(lo) for lo, hi in runs)


def check_bits(bits, supported: tuple[int, ...] = SUPPORTED_BITS, what: str = "bit width") -> int:
    """Return `bits` as an int if it is one of `supported`, else raise HeroError naming `what`."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in supported:
        raise HeroError(f"unsupported {what} {bits!r}: use one {_spoken(supported)}")
    return int(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid of the linear uniform quantizer (HERO paper, Theorem 2): symmetric uses
    TensorRT's restricted range [-(2^(b-1)-1), 2^(b-1)-1] (NVIDIA, "Integer Quantization for Deep
    Learning Inference", 2020, Sec. 3.1), asymmetric the full unsigned range [0, 2^b - 1]."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def parse_bits(text: str, option: str = "--bits") -> tuple[int, ...]:
    """'4,8' -> (4, 8), '2-8' -> (2, ..., 8), each checked with `check_bits`; a reversed or empty
    range, a repeated width or an empty list is a HeroError naming `option`."""
    out: list[int] = []
    for part in str(text).split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise HeroError(f"{option} takes a list like 4,8 or a range like 2-8 (got {text!r})") from None
        if last < first:
            raise HeroError(f"{option}: the range {part.strip()} is reversed or empty: write it low-high, e.g. 2-8")
        out += [check_bits(b) for b in range(first, last + 1)]
    if len(set(out)) != len(out):
        raise HeroError(f"{option} names a bit width twice (got {text!r})")
    return tuple(out)
