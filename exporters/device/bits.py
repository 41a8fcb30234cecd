"""The weight bit widths hero-deploy quantizes to, and the one check and parser of them.

Torch-free, so `hero check`, the bundle manifest reader and the device can check a bit width the
same way the quantizer does (`exporters.quantize` imports them from here).
"""

from __future__ import annotations

import numbers

from exporters.device.errors import HeroError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits) -> int:
    """Return `bits` as an int if it is one of SUPPORTED_BITS, else raise HeroError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in SUPPORTED_BITS:
        raise HeroError(f"unsupported bit width {bits!r}: use one of {', '.join(map(str, SUPPORTED_BITS))}")
    return int(bits)


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
