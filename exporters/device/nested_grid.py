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

numpy and the standard library only, like everything in `exporters.device`: the host quantizer
(`exporters.grid.quantize_tensor`, grid "nested") takes its codes from here, and TensorRT's switch
by refit (`exporters.device.tensorrt`) rests on the one scale they share. Bit widths are checked
and the integer grid is taken from `exporters.device.bits`; `symmetric_scale` and
`symmetric_codes` are Theorem 2's symmetric quantizer in numpy (float64), the counterpart of
`exporters.grid.symmetric_qparams` and `quantize_with_qparams`.
"""

from dataclasses import dataclass

import numpy as np

from exporters.device.bits import SUPPORTED_BITS, check_bits, qrange

NESTED_BITS = tuple(b for b in SUPPORTED_BITS if b <= 8)  # INT8 codes: at most the 8-bit grid


def _nested_bits(bits) -> int:
    return check_bits(bits, NESTED_BITS, "nested-grid bit width")


def symmetric_scale(amax: np.ndarray, bits: int) -> np.ndarray:
    """HERO paper Theorem 2, symmetric: scale = amax / (2^(bits-1) - 1) in float64; 1 where amax is 0
    (its codes are 0 whatever the scale, and ONNX and TensorRT need a positive scale)."""
    _, qmax = qrange(bits, symmetric=True)
    return np.where(amax > 0, amax / qmax, 1.0)


def symmetric_codes(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """clamp(round(w / scale), -(2^(bits-1) - 1), 2^(bits-1) - 1) in float64, rounding half to even:
    ONNX QuantizeLinear with zero point 0 (onnx.ai/onnx/operators/onnx__QuantizeLinear.html)."""
    qmin, qmax = qrange(bits, symmetric=True)
    return np.clip(np.rint(w / scale), qmin, qmax)


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
    return symmetric_scale(_amax(np.asarray(w, dtype=np.float64), axis), 8).astype(np.float32)


def nested_step_multiplier(bits: int) -> int:
    """m = 2^(8 - bits): the n-bit step in units of the 8-bit step s8."""
    return 2 ** (8 - _nested_bits(bits))


def nested_clip_fraction(bits: int) -> float:
    """Largest nested n-bit magnitude as a fraction of amax: (2^(n-1) - 1) * 2^(8-n) / 127."""
    m = nested_step_multiplier(bits)
    return qrange(bits, symmetric=True)[1] * m / qrange(8, symmetric=True)[1]


def nested_grid_codes(w: np.ndarray, bits: int, axis: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quantize `w` to the nested n-bit grid; return (INT8 codes on the 8-bit scale, s8).

    codes = clamp(round(w / s_n), -(2^(n-1) - 1), 2^(n-1) - 1) * 2^(8-n), s_n = 2^(8-n) * s8,
    rounding half to even as ONNX QuantizeLinear and TensorRT do. Dequantize with
    codes * s8 (s8 broadcast along `axis`), exactly what a DQ node with scale s8 computes.
    """
    w = np.asarray(w, dtype=np.float64)
    m = nested_step_multiplier(bits)
    s8 = scale8(w, axis)
    q = symmetric_codes(w, m * _broadcast(s8.astype(np.float64), w.ndim, axis), bits)
    return (q * m).astype(np.int8), s8


def canonical_quantize(w: np.ndarray, bits: int, axis: int | None = 0) -> np.ndarray:
    """Reference canonical symmetric quantizer, dequantized: q * s with s = amax / (2^(n-1) - 1)
    (`symmetric_scale`, `symmetric_codes`), at the nested grid's widths."""
    w = np.asarray(w, dtype=np.float64)
    s = _broadcast(symmetric_scale(_amax(w, axis), _nested_bits(bits)), w.ndim, axis)
    return symmetric_codes(w, s, bits) * s


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
