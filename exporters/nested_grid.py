"""Nested quantization grids: every bit width stored as INT8 codes on one shared 8-bit scale.

Why: a TensorRT engine built from an explicitly quantized (Q/DQ) graph bakes in the DQ
scales, and whether the refitter can change Q/DQ scales is not documented. If the n-bit
grid is a sub-grid of the 8-bit grid, every precision's engine has the *same* DQ scale
s8 = amax / 127 and switching precision by refit changes only INT8 weight values, which
refit is documented to support (same count and dtype).

The nested n-bit grid is {k * 2^(8-n) * s8 : |k| <= 2^(n-1) - 1}, i.e. step
s_n = 2^(8-n) * s8. The canonical symmetric quantizer (linear uniform quantizer, HERO
paper Theorem 2) uses step amax / (2^(n-1) - 1) instead. The nested step is finer
(4 bits: 16/127 = 0.126 amax vs 1/7 = 0.143 amax) but the grid ends at
(2^(n-1) - 1) * 2^(8-n) / 127 of amax (4 bits: 112/127 = 0.882 amax), so the largest
weights are clipped. `nested_grid_error` measures the trade on real weights.

numpy only: this module runs on the deploy device.
"""

from dataclasses import dataclass

import numpy as np

from exporters.device.errors import HeroError

INT8_MAX = 127


def _check_bits(bits: int) -> None:
    if not 2 <= int(bits) <= 8:
        raise HeroError(f"nested-grid bits must be between 2 and 8, got {bits}")


def _amax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per slice along `axis` (per channel), or over the whole tensor if axis is None."""
    if axis is None:
        return np.max(np.abs(w)).reshape(())
    axis = axis % w.ndim
    others = tuple(d for d in range(w.ndim) if d != axis)
    return np.max(np.abs(w), axis=others) if others else np.abs(w)


def _broadcast(per_channel: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return per_channel
    shape = [1] * ndim
    shape[axis % ndim] = per_channel.size
    return per_channel.reshape(shape)


def scale8(w: np.ndarray, axis: int | None = 0) -> np.ndarray:
    """8-bit symmetric scale s8 = amax / 127 (TensorRT INT8, narrow range [-127, 127]).

    An all-zero channel gets scale 1.0: its codes are 0 whatever the scale, and TensorRT
    requires strictly positive scales (IQuantizeLayer docs).
    """
    amax = _amax(np.asarray(w, dtype=np.float64), axis)
    return np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)


def nested_step_multiplier(bits: int) -> int:
    """m = 2^(8 - bits): the n-bit step in units of the 8-bit step s8."""
    _check_bits(bits)
    return 2 ** (8 - int(bits))


def nested_clip_fraction(bits: int) -> float:
    """Largest nested n-bit magnitude as a fraction of amax: (2^(n-1) - 1) * 2^(8-n) / 127."""
    return (2 ** (int(bits) - 1) - 1) * nested_step_multiplier(bits) / INT8_MAX


def nested_grid_codes(w: np.ndarray, bits: int, axis: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quantize `w` to the nested n-bit grid; return (INT8 codes on the 8-bit scale, s8).

    codes = clamp(round(w / s_n), -(2^(n-1) - 1), 2^(n-1) - 1) * 2^(8-n), s_n = 2^(8-n) * s8,
    rounding half to even as ONNX QuantizeLinear and TensorRT do. Dequantize with
    codes * s8 (s8 broadcast along `axis`), exactly what a DQ node with scale s8 computes.
    """
    w = np.asarray(w, dtype=np.float64)
    m = nested_step_multiplier(bits)
    qmax = 2 ** (int(bits) - 1) - 1
    s8 = scale8(w, axis)
    q = np.clip(np.rint(w / (m * _broadcast(s8.astype(np.float64), w.ndim, axis))), -qmax, qmax)
    return (q * m).astype(np.int8), s8


def canonical_quantize(w: np.ndarray, bits: int, axis: int | None = 0) -> np.ndarray:
    """Reference canonical symmetric quantizer, dequantized: q * s with s = amax / (2^(n-1) - 1).

    Linear uniform quantizer of the HERO paper (Theorem 2), symmetric, narrow range.
    """
    _check_bits(bits)
    w = np.asarray(w, dtype=np.float64)
    qmax = 2 ** (int(bits) - 1) - 1
    amax = _amax(w, axis)
    s = _broadcast(np.where(amax > 0, amax / qmax, 1.0), w.ndim, axis)
    return np.clip(np.rint(w / s), -qmax, qmax) * s


@dataclass(frozen=True)
class GridError:
    """Mean squared weight error of the nested and the canonical n-bit grids."""

    bits: int
    nested_mse: float
    canonical_mse: float

    @property
    def ratio(self) -> float:
        """nested_mse / canonical_mse (> 1: the nested grid costs accuracy on these weights)."""
        return self.nested_mse / self.canonical_mse if self.canonical_mse > 0 else float("inf")


def nested_grid_error(w: np.ndarray, bits: int, axis: int | None = 0) -> GridError:
    """Compare the nested grid against the canonical quantizer on the same weights."""
    w = np.asarray(w, dtype=np.float64)
    codes, s8 = nested_grid_codes(w, bits, axis)
    nested = codes.astype(np.float64) * _broadcast(s8.astype(np.float64), w.ndim, axis)
    canonical = canonical_quantize(w, bits, axis)
    return GridError(
        bits=int(bits),
        nested_mse=float(np.mean((w - nested) ** 2)),
        canonical_mse=float(np.mean((w - canonical) ** 2)),
    )
