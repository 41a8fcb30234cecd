"""The linear uniform quantizer of HERO (Yang et al., DAC 2022), Theorem 2, on its own: the integer
grid, its scale and zero point, and the ONNX QuantizeLinear / DequantizeLinear maps between them.
Everything that quantizes (`exporters.quantize` for weights, `exporters.act_layout` and
`exporters.calibrate` for activations) takes its arithmetic from here. float32, rounding half to
even (torch.round, like ONNX QuantizeLinear). The integer grid (`qrange`) and the nested grid
(`exporters.device.nested_grid`, numpy) are torch-free, in `exporters.device`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporters.bn_fold import _along
from exporters.device.bits import qrange
from exporters.device.errors import HeroError
from exporters.device.nested_grid import nested_grid_codes


def symmetric_qparams(amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HERO paper Theorem 2 (linear uniform quantizer), symmetric form:
    scale = amax / (2^(bits-1) - 1), zero point 0. Where amax is 0 the scale is 1 (ONNX and
    TensorRT need a positive scale; the values there are all 0 and stay exactly 0)."""
    _, qmax = qrange(bits, symmetric=True)
    amax = amax.to(torch.float32)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def asymmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HERO paper Theorem 2 (linear uniform quantizer), asymmetric form over [lo, hi] with
    lo <= 0 <= hi: scale = (hi - lo) / (2^bits - 1), zero point = round(-lo / scale), so 0 is
    exactly representable. Where hi == lo == 0 the scale is 1 and the zero point 0."""
    _, qmax = qrange(bits, symmetric=False)
    width = hi.to(torch.float32) - lo.to(torch.float32)
    scale = torch.where(width > 0, width / qmax, torch.ones_like(width))
    zero_point = torch.round(-lo.to(torch.float32) / scale).clamp(0, qmax).to(torch.int32)
    return scale, zero_point


def quantize_with_qparams(x, scale, zero_point, qmin: int, qmax: int, axis: int = 0) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, qmin, qmax) as int32: ONNX QuantizeLinear
    (onnx.ai/onnx/operators/onnx__QuantizeLinear.html), computed in float32."""
    x = x.to(torch.float32)
    q = torch.round(x / _along(scale, x.dim(), axis)) + _along(zero_point, x.dim(), axis)
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """x = (q - zero_point) * scale in float32: ONNX DequantizeLinear."""
    shifted = (q.to(torch.int32) - _along(zero_point, q.dim(), axis)).to(torch.float32)
    return shifted * _along(scale, q.dim(), axis)


def expand_blocks(t: torch.Tensor, block_size: int, columns: int) -> torch.Tensor:
    """A per-block tensor (rows, ceil(columns / block_size)) repeated over each block's columns:
    (rows, columns), what multiplies the codes elementwise."""
    return t.repeat_interleave(block_size, dim=1)[:, :columns]


def blockwise_symmetric(w: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Theorem 2's symmetric quantizer per block: a 2-D weight (rows = output channels, columns =
    inputs) split along its columns into blocks of `block_size` (the last one shorter), each with its
    own scale max|w_block| / (2^(b-1) - 1). The grid of block-quantized INT4 GEMM kernels (ONNX
    DequantizeLinear-21 with `block_size`, ONNX Runtime's MatMulNBits). Returns int32 codes (rows,
    columns), float32 scales and int32 zero points (rows, number of blocks)."""
    rows, columns = w.shape
    blocks = -(-columns // block_size)
    padded = torch.nn.functional.pad(w.to(torch.float32), (0, blocks * block_size - columns))
    scale, zero_point = symmetric_qparams(padded.reshape(rows, blocks, block_size).abs().amax(dim=2), bits)
    qmin, qmax = qrange(bits, symmetric=True)
    q = torch.round(w.to(torch.float32) / expand_blocks(scale, block_size, columns)).clamp(qmin, qmax)
    return q.to(torch.int32), scale, zero_point


def dynamic_block_qdq(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Activations as ONNX Runtime's MatMulNBits quantizes them at accuracy_level 4 (MLAS CompInt8,
    QuantizeARow_CompInt8): each block of `block_size` along the last axis gets its own symmetric
    int8 scale amax / 127 (Theorem 2 with the range measured on the tensor itself, every call),
    codes round_half_even(x * (127 / amax)); returned dequantized, codes x scale, in float32. The
    same float32 operations as the kernel, so the codes are the kernel's."""
    columns = x.shape[-1]
    blocks = -(-columns // block_size)
    padded = torch.nn.functional.pad(x.to(torch.float32), (0, blocks * block_size - columns))
    grouped = padded.reshape(*x.shape[:-1], blocks, block_size)
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    _, qmax = qrange(8, symmetric=True)
    inverse = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    q = torch.round(grouped * inverse)
    return (q * (amax / qmax)).reshape(*x.shape[:-1], blocks * block_size)[..., :columns].to(x.dtype)


def quantize_tensor(w: torch.Tensor, bits: int, *, symmetric: bool = True, per_channel: bool = True,
                    axis: int = 0, grid: str = "canonical",
                    block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `w` (cast to float32) to `bits`: returns int32 q on the grid of `qrange`, float32
    scale and int32 zero point, each of shape (w.shape[axis],) per channel or () per tensor.
    Ranges come from the tensor itself (symmetric: max |w|; asymmetric: [min(w, 0), max(w, 0)]),
    per slice along `axis` when per_channel. grid "nested": the n-bit grid as INT8 codes on the
    8-bit scale (`exporters.device.nested_grid.nested_grid_codes`, symmetric only). `block_size`: a 2-D
    weight per block of its columns (`exporters.grid.blockwise_symmetric`; scales (rows, blocks))."""
    if not torch.isfinite(w).all():
        raise HeroError("cannot quantize a tensor with NaN or infinite values: check the checkpoint")
    qmin, qmax = qrange(bits, symmetric)
    w = w.detach().to(torch.float32)
    if block_size is not None:
        return blockwise_symmetric(w, bits, block_size)
    if grid == "nested":
        if not symmetric:
            raise HeroError("grid nested is symmetric only")
        codes, s8 = nested_grid_codes(w.cpu().numpy(), bits, axis if per_channel else None)
        scale = torch.from_numpy(s8).to(w.device)
        return torch.from_numpy(codes).to(torch.int32).to(w.device), scale, torch.zeros_like(scale, dtype=torch.int32)
    flat = w.movedim(axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
    if symmetric:
        scale, zero_point = symmetric_qparams(flat.abs().amax(dim=1), bits)
    else:
        lo, hi = flat.amin(dim=1).clamp(max=0), flat.amax(dim=1).clamp(min=0)
        scale, zero_point = asymmetric_qparams(lo, hi, bits)
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]
    return quantize_with_qparams(w, scale, zero_point, qmin, qmax, axis), scale, zero_point


def fake_quantize(w: torch.Tensor, bits: int, *, symmetric: bool = True, per_channel: bool = True,
                  axis: int = 0) -> torch.Tensor:
    """dequantize(quantize_tensor(w, ...)), returned in w's dtype (computed in float32)."""
    q, scale, zero_point = quantize_tensor(w, bits, symmetric=symmetric, per_channel=per_channel, axis=axis)
    return dequantize(q, scale, zero_point, axis).to(w.dtype)


@dataclass(frozen=True)
class WeightCodes:
    """One layer's quantized weight as the graph stores it: int32 codes `q` (the layer's weight
    shape), float32 `scale` and int32 `zero_point` of shape (out channels,) or () per tensor, and
    the layer's `bits` (which sets the storage type). Dequantized: (q - zero_point) * scale."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    block_size: int | None = None

    def dequantized(self) -> torch.Tensor:
        if self.block_size is not None:  # scale (rows, blocks) over the columns of a 2-D weight
            columns = self.q.shape[1]
            shifted = self.q - expand_blocks(self.zero_point, self.block_size, columns)
            return shifted.to(torch.float32) * expand_blocks(self.scale, self.block_size, columns)
        return dequantize(self.q, self.scale, self.zero_point, axis=0)


def fold_into_scales(q: torch.Tensor, scale: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize first, then fold BatchNorm: k_c·(s_c·q_c) = (|k_c|·s_c)·(sign(k_c)·q_c), so the
    folded weight keeps the trained weight's integer codes under per-output-channel scales
    s'_c = |k_c|·s_c (k = gamma / sqrt(var + eps), `exporters.bn_fold.bn_factor`). Scales stay
    strictly positive: a negative k_c negates that channel's codes (the symmetric grid is closed
    under negation); where k_c = 0 (or s'_c underflows) the channel is the constant 0: zero codes
    under the positive scale s_c. Returns (codes, float32 per-channel scale)."""
    s = (scale.double().expand(k.shape) if scale.dim() == 0 else scale.double()) * k.abs()
    s32 = s.to(torch.float32)
    dead = ~(s32 > 0)
    s32 = torch.where(dead, scale.to(torch.float32).expand(k.shape), s32)
    sign = torch.where(dead, torch.zeros_like(k), torch.sign(k)).to(torch.int32)
    return q * _along(sign, q.dim(), 0), s32


def quantize_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias as an integer kernel adds it: int32 codes on the scale input_scale * weight_scale (per
    output channel) with zero point 0, the accumulator's own grid (ONNX QLinearConv, input B).
    Returns (int32 codes, float32 scale); dequantized: codes * scale."""
    scale = (torch.tensor(input_scale, dtype=torch.float32) * weight_scale.to(torch.float32)).expand(bias.shape)
    q = torch.round(bias.detach().to(torch.float32) / scale).clamp(-(2**31) + 1, 2**31 - 1)
    return q.to(torch.int32), scale.contiguous()
