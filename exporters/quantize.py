"""Linear uniform post-training quantization (PTQ) of Conv/Linear weights and activations.

The quantizer is the linear uniform one of HERO (Yang et al., DAC 2022), Theorem 2: a tensor is
mapped onto 2^bits evenly spaced levels and back. Weights are quantized per output channel
(axis 0) or per tensor, symmetric (TensorRT's restricted range, zero point 0) or asymmetric;
input activations optionally per tensor, symmetric int8, with scales from calibration. BatchNorm
is folded into the preceding Conv/Linear before quantization (bn "fold-first", as an inference engine
would do), after it (into the scales: "quantize-first", the weights HERO trained) or kept (QuantSpec).

This module is the single source of the quantization math: the ONNX exporter calls the same
functions, so the fake-quantized PyTorch model and the exported QDQ graph compute the same thing.
All arithmetic is float32 (the dtype of ONNX QuantizeLinear scales), rounding is half to even
(torch.round, like ONNX QuantizeLinear).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from exporters import act_layout, attention
from exporters.bn_fold import QUANTIZED_LAYER_TYPES, bn_factors, fold_bn
from exporters.device.bits import check_bits
from exporters.device.errors import HeroError, unknown_choice
from exporters.device.schema import ACT_BITS, ACT_LAYOUTS, BN_MODES, GRIDS
# Theorem 2's quantizer lives in exporters.grid; its names are importable from here too, beside the spec.
from exporters.grid import (WeightCodes, asymmetric_qparams, dequantize, fake_quantize,  # noqa: F401
                            fold_into_scales, qrange, quantize_bias, quantize_tensor, quantize_with_qparams,
                            symmetric_qparams)

_ACT_METHODS = ("max", "percentile", "mse")  # exporters.calibrate


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a model, the one object that says it. Every field is checked here, once.

    - `bits`: weight bits (None = full precision); with `layer_bits` the widest layer's.
    - `symmetric`, `per_channel`: the grid's zero point and scale granularity.
    - `bn`: "fold-first" folds BatchNorm into the Conv/Linear, then quantizes the folded weights;
      "quantize-first" quantizes the weights HERO trained (before folding), then folds BatchNorm
      into the DequantizeLinear scales (per output channel) and a float bias, so the integer codes
      are those of the trained weights (symmetric only); "keep" leaves BatchNorm a float op.
    - `grid`: "canonical" (step amax / (2^(b-1) - 1)) or "nested" (every width stored as INT8 codes
      on the 8-bit scale, `exporters.device.nested_grid`: one set of Q/DQ scales for every precision, so a
      TensorRT engine switches precision by refitting weights only; symmetric, bits <= 8).
    - `layer_bits`: mixed precision, a width per quantized layer (name -> bits), else None.
    - `act_bits`: None (float activations) or 8, ranges from `exporters.calibrate` on training
      batches by `act_method` ("max", "percentile" with `act_percentile`, or "mse").
    - `act_layout`: where 8-bit activations are quantized, for whose integer kernels.
      "onnxruntime": asymmetric uint8 at every point ONNX Runtime's CPU kernels fuse (the output of
      every Conv/Linear, Add, Concat and average pool, and the inputs they need;
      `exporters.act_layout`), so Conv, Gemm, Add and pooling run as QLinear* integer ops.
      "tensorrt": symmetric int8 (zero point 0) on the input of every Conv/Linear and on the
      residual input of every Add TensorRT fuses into a convolution, TensorRT's
      explicit-quantization placement (`exporters.act_layout.residual_points`).
    - `block_size`: None, or the weights of every Linear quantized per block of `block_size` inputs
      within each output row (`exporters.grid.blockwise_symmetric`; a power of two >= 16, what
      ONNX Runtime's MatMulNBits takes), Conv weights staying per channel: the INT4 GEMM grid.
      Symmetric, canonical grid, BatchNorm folded first or kept. With act_bits 8 the inputs of
      block-wise Linear layers at <= 4 bits are quantized as MatMulNBits does at accuracy level 4,
      per block on every call (`exporters.grid.dynamic_block_qdq`; no calibration, `dynamic_blocks`);
      other activations stay float, and act_layout does not apply.
    """

    bits: int | None = None
    symmetric: bool = True
    per_channel: bool = True
    bn: str = BN_MODES[0]
    grid: str = GRIDS[0]
    layer_bits: tuple[tuple[str, int], ...] | None = None
    act_bits: int | None = None
    act_method: str = "max"
    act_percentile: float = 99.99
    act_layout: str = ACT_LAYOUTS[0]
    block_size: int | None = None

    def __post_init__(self):
        for name in ("symmetric", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise HeroError(f"quantization option {name} must be true or false, got {getattr(self, name)!r}")
        if self.bn not in BN_MODES:
            raise HeroError(unknown_choice("bn", self.bn, BN_MODES))
        if self.grid not in GRIDS:
            raise HeroError(unknown_choice("grid", self.grid, GRIDS))
        if self.layer_bits is not None:
            pairs = self.layer_bits.items() if isinstance(self.layer_bits, Mapping) else self.layer_bits
            try:
                pairs = tuple((str(name), check_bits(b)) for name, b in pairs)
            except (TypeError, ValueError):
                raise HeroError(f"layer_bits must map layer names to bit widths, got {self.layer_bits!r}") from None
            if not pairs or len({n for n, _ in pairs}) != len(pairs):
                raise HeroError("layer_bits must name each layer once, and at least one")
            object.__setattr__(self, "layer_bits", pairs)
            widest = max(b for _, b in pairs)
            if self.bits is not None and check_bits(self.bits) != widest:
                raise HeroError(f"with layer_bits, bits is the widest layer's ({widest}), got {self.bits}")
            object.__setattr__(self, "bits", widest)
        if self.bits is not None:
            object.__setattr__(self, "bits", check_bits(self.bits))
        if self.grid == "nested" and (not self.symmetric or (self.bits or 0) > 8):
            raise HeroError("grid nested is symmetric and at most 8 bits (INT8 codes on the 8-bit scale): "
                            "use symmetric: true and bits <= 8, or grid canonical")
        if self.bn == "quantize-first" and not self.symmetric:
            raise HeroError("bn quantize-first is defined for symmetric grids only (a negative BatchNorm gain "
                            "negates the codes, which an asymmetric grid is not closed under): use symmetric: "
                            "true, or bn fold-first")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits != ACT_BITS):
            raise HeroError(f"act_bits must be null or {ACT_BITS}, got {self.act_bits!r}")
        _check_act_method(self.act_method, self.act_percentile)
        if self.act_layout not in ACT_LAYOUTS:
            raise HeroError(unknown_choice("act_layout", self.act_layout, ACT_LAYOUTS))
        if self.act_bits is None:  # no activation is quantized anywhere: one spec, whatever the layout says
            object.__setattr__(self, "act_layout", ACT_LAYOUTS[0])
        self._check_block_size()

    def _check_block_size(self) -> None:
        b = self.block_size
        if b is None:
            return
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 16 or b & (b - 1):
            raise HeroError(f"block_size must be null or a power of two >= 16 (MatMulNBits' blocks), got {b!r}")
        object.__setattr__(self, "block_size", int(b))
        object.__setattr__(self, "act_layout", ACT_LAYOUTS[0])  # dynamic block activations: no layout
        clashes = [what for what, bad in (("a float model (bits null)", self.bits is None),
                                          ("symmetric false", not self.symmetric), ("per_channel false", not self.per_channel),
                                          ("grid nested", self.grid == "nested"), ("bn quantize-first", self.bn == "quantize-first"))
                   if bad]
        if clashes:
            raise HeroError(f"block_size (block-wise INT4 GEMM weights) does not combine with {clashes[0]}: "
                            "drop block_size or that option")
        widths = [b for _, b in self.layer_bits] if self.layer_bits else [self.bits]
        if self.act_bits is not None and min(widths) > 4:
            raise HeroError(f"block_size with act_bits 8 quantizes the inputs of MatMulNBits layers, which are 4 bits "
                            f"or fewer; got bits {min(widths)}: use bits <= 4, or act_bits null")

    @property
    def integer_activations(self) -> bool:
        """Whether activations are laid out for ONNX Runtime's integer kernels (act_bits 8, act_layout
        "onnxruntime"): what the emulation, the exporter and the run's storage choice branch on."""
        return self.act_bits is not None and self.act_layout == "onnxruntime" and self.block_size is None

    @property
    def dynamic_blocks(self) -> bool:
        """Whether Linear inputs are quantized per block on every call (block_size with act_bits 8,
        MatMulNBits' int8 compute) instead of with calibrated ranges."""
        return self.act_bits is not None and self.block_size is not None

    @property
    def calibrated(self) -> bool:
        """Whether activations take ranges from a Calibration (act_bits 8 without block_size)."""
        return self.act_bits is not None and self.block_size is None

    def bits_for(self, layer: str) -> int | None:
        """The width of one layer: its layer_bits entry, else bits."""
        if self.layer_bits is None:
            return self.bits
        widths = dict(self.layer_bits)
        if layer not in widths:
            raise HeroError(f"layer_bits gives no width for layer {layer!r}: name every Conv/Linear of the model")
        return widths[layer]

    def to_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["layer_bits"] = None if self.layer_bits is None else dict(self.layer_bits)
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> QuantSpec:
        """The spec `to_dict` wrote; unknown or missing fields are a HeroError."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) != names:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise HeroError(f"a quantization spec has the fields {sorted(names)}, got {got}")
        return cls(**fields)


@dataclass(frozen=True)
class Calibration:
    """Per-tensor 8-bit activation parameters, what `exporters.calibrate` measured and what W{n}A8
    emulation and export both use. act_layout "tensorrt": `scales` of the inputs of the model's
    Conv/Linear layers keyed by module name, zero point 0 (`zero_points` None). "onnxruntime":
    `scales` and uint8 `zero_points` keyed by quantization point (`exporters.act_layout.Plan`)."""

    scales: Mapping[str, float]
    zero_points: Mapping[str, int] | None = None

    def __post_init__(self):
        bad = {k: v for k, v in self.scales.items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0)}
        if bad:
            raise HeroError(f"activation scales must be positive and finite, got {bad}: recalibrate")
        object.__setattr__(self, "scales", {str(k): float(v) for k, v in self.scales.items()})
        if self.zero_points is not None:
            zps = self.zero_points
            if set(zps) != set(self.scales) or any(isinstance(z, bool) or not isinstance(z, numbers.Integral)
                                                   or not 0 <= z <= 255 for z in zps.values()):
                raise HeroError("activation zero points must be integers in [0, 255], one per activation scale: recalibrate")
            object.__setattr__(self, "zero_points", {str(k): int(v) for k, v in zps.items()})


def check_calibration(spec: QuantSpec, calibration: Calibration | None) -> None:
    """act_bits 8 needs a Calibration and a Calibration needs act_bits 8 (with block_size, activations
    are quantized per call and take none)."""
    if calibration is not None and not isinstance(calibration, Calibration):
        raise HeroError(f"calibration must be a Calibration from calibrate_activations, got {type(calibration).__name__}")
    if spec.dynamic_blocks and calibration is not None:
        raise HeroError("block_size with act_bits=8 quantizes activations per call: pass no Calibration")
    if not spec.dynamic_blocks and (spec.act_bits is None) != (calibration is None):
        raise HeroError("act_bits=8 needs a Calibration from calibrate_activations, and a Calibration needs act_bits=8")
    if calibration is not None and (calibration.zero_points is None) != (spec.act_layout == "tensorrt"):
        raise HeroError(f"this Calibration was made for another act_layout than {spec.act_layout!r}: "
                        "calibrate with the spec you export")


def _check_act_method(method, percentile) -> None:
    if method not in _ACT_METHODS:
        raise HeroError(unknown_choice("activation calibration method", method, _ACT_METHODS))
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile <= 100:
        raise HeroError(f"act_percentile must be a number in (0, 100], got {percentile!r}")


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) of every Conv1d/2d/3d and Linear, in registration order, and of
    every nn.MultiheadAttention's input projection, "<mha>.in_proj": a Linear sharing its
    in_proj_weight (`exporters.attention.in_projection`), just before its out_proj."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            layers.append((f"{name}.in_proj" if name else "in_proj", attention.in_projection(m, name)))
        elif isinstance(m, QUANTIZED_LAYER_TYPES):
            layers.append((name, m))
    return layers


def exported_weights(model: nn.Module, exported: nn.Module) -> dict[str, torch.Tensor | None]:
    """{layer of `quantized_layers(model)`: its weight in `exported`} (`float_copy(model)`, maybe
    traced: torch.fx keeps a layer only used through F.linear as its bare weight), None where
    `exported` does not hold it (a layer forward never uses)."""
    weights = {}
    for name, _ in quantized_layers(model):
        try:
            weights[name] = exported.get_parameter(f"{name}.weight")
        except AttributeError:
            weights[name] = None
    return weights


def float_copy(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """The eval-mode float model that the emulation quantizes and the exporter exports (`model` is
    never modified): BatchNorm folded unless spec.bn is "keep" (`fold_bn`), and every
    nn.MultiheadAttention decomposed into two Linear layers (`exporters.attention`)."""
    return attention.decompose_attention(fold_bn(model) if spec.bn != "keep" else copy.deepcopy(model).eval())


def called_layers(model: nn.Module, example: torch.Tensor) -> set[str]:
    """The quantized layers of `model` that one forward on `example` calls as modules (a weight only
    passed to F.linear is not among them)."""
    called: set[str] = set()
    handles = [layer.register_forward_pre_hook(lambda _, args, name=name: called.add(name))
               for name, layer in quantized_layers(model)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


def checked_act_scales(model: nn.Module, calibration: Calibration, residual: Iterable[str] = ()) -> dict[str, float]:
    """The calibration's scales for exactly the model's Conv/Linear layers, in layer order, or a
    HeroError; the calibration must also hold the `residual` points (`act_layout.residual_points`)."""
    names = {name for name, _ in quantized_layers(model)} | set(residual)
    scales = calibration.scales
    missing, unknown = sorted(names - scales.keys()), sorted(scales.keys() - names)
    if missing or unknown:
        raise HeroError(f"activation scales do not match the model's Conv/Linear inputs and residual Adds (missing: "
                        f"{missing}, unknown: {unknown}): calibrate this model with calibrate_activations")
    return {name: scales[name] for name, _ in quantized_layers(model)}


def with_residual_qdq(folded: nn.Module, calibration: Calibration) -> tuple[nn.Module, dict[str, float]]:
    """The tensorrt layout's graph: `folded` with a `SymmetricQDQ` on the residual input of every
    Add that TensorRT fuses into a convolution (`act_layout.residual_plan`), and the scales of its
    Conv/Linear inputs, which the caller quantizes (emulation: pre-hooks; export: Q/DQ nodes)."""
    module, points = act_layout.residual_plan(folded)
    scales = checked_act_scales(module, calibration, points)
    act_layout.insert_residual(module, points, {p: act_layout.SymmetricQDQ(calibration.scales[p]) for p in points})
    return module, scales


def weight_codes(model: nn.Module, spec: QuantSpec) -> dict[str, WeightCodes]:
    """{layer name: WeightCodes} of every Conv/Linear as `spec` quantizes `model` (the trained, unfolded
    model; names are the same after folding): the one place both the emulation (`quantize_model`)
    and the exporter take weights from. fold-first quantizes the folded weight, keep the trained
    one, quantize-first the trained one with BatchNorm folded into its scales (`fold_into_scales`)."""
    if spec.bits is None:
        return {}
    source = fold_bn(model) if spec.bn == "fold-first" else model
    factors = bn_factors(model) if spec.bn == "quantize-first" else {}
    out = {}
    for name, layer in quantized_layers(source):
        bits = spec.bits_for(name)
        block_size = spec.block_size if isinstance(layer, nn.Linear) else None
        q, scale, zero_point = quantize_tensor(layer.weight, bits, symmetric=spec.symmetric,
                                               per_channel=spec.per_channel, axis=0, grid=spec.grid,
                                               block_size=block_size)
        if name in factors:
            q, scale = fold_into_scales(q, scale, factors[name].to(q.device))
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        out[name] = WeightCodes(q, scale, zero_point, bits, block_size)
    if spec.layer_bits is not None:
        unknown = sorted(set(dict(spec.layer_bits)) - set(out))
        if unknown:
            raise HeroError(f"layer_bits names layers the model does not have: {unknown}")
    return out


def integer_biases(traced: nn.Module, codes: Mapping[str, WeightCodes]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: `quantize_bias` of its bias} for every quantized layer of an onnxruntime-layout module
    (`exporters.act_layout.with_qdq`) with a bias and a quantized input."""
    out = {}
    for name, input_scale in act_layout.input_scales(traced).items():
        bias = traced.get_submodule(name).bias
        if bias is not None and name in codes:
            out[name] = quantize_bias(bias, input_scale, codes[name].scale)
    return out


def quantize_model(model: nn.Module, spec: QuantSpec, calibration: Calibration | None = None) -> nn.Module:
    """An eval-mode copy of `model` (never modified) computing what the exported graph computes:
    BatchNorm folded unless spec.bn is "keep", every Conv/Linear weight replaced by its dequantized
    `weight_codes`; biases stay float. With spec.act_bits 8 (which needs `calibration`) each
    Conv/Linear also fake-quantizes its input to int8 through a `SymmetricQDQ` child `<layer>.act_quant`
    run by a forward pre-hook, so layer names do not change, and the residual input of every Add
    TensorRT fuses into a convolution passes a `SymmetricQDQ` (`with_residual_qdq`: the copy is then
    a torch.fx GraphModule); the copy's `act_scales` attribute is then the calibration's scales."""
    if not isinstance(spec, QuantSpec):
        raise HeroError(f"quantize_model takes a QuantSpec, got {type(spec).__name__}: e.g. QuantSpec(bits=4)")
    check_calibration(spec, calibration)
    quantized = float_copy(model, spec)
    codes = weight_codes(model, spec)
    with torch.no_grad():
        for name, layer in quantized_layers(quantized):
            if name in codes:
                layer.weight.copy_(codes[name].dequantized().to(layer.weight.dtype))
    if spec.dynamic_blocks:
        for name, layer in quantized_layers(quantized):
            if name in codes and codes[name].block_size is not None and codes[name].bits <= 4:
                layer.act_quant = act_layout.DynamicBlockQuant(codes[name].block_size)
                layer.register_forward_pre_hook(act_layout.quantize_input)
        return quantized
    if spec.integer_activations:
        quantized = act_layout.with_qdq(quantized, calibration)
        for name, (q, scale) in integer_biases(quantized, codes).items():
            act_layout.use_integer_bias(quantized.get_submodule(name), dequantize(q, scale, torch.zeros_like(q)))
        quantized.act_scales = dict(calibration.scales)
        return quantized.eval()
    if calibration is None:
        return quantized
    quantized, scales = with_residual_qdq(quantized, calibration)
    for name, layer in quantized_layers(quantized):
        layer.act_quant = act_layout.SymmetricQDQ(scales[name])
        layer.register_forward_pre_hook(act_layout.quantize_input)
    quantized.act_scales = dict(calibration.scales)
    return quantized.eval()


def packed_weight_bytes(model: nn.Module, spec: QuantSpec) -> int:
    """Bytes of the Conv/Linear weights packed at each layer's width (`spec.bits_for`), ceil(bits * n / 8)
    per layer, float32 for a float spec. Biases, BN and other float parameters are not counted."""
    total = 0
    for name, layer in quantized_layers(model):
        bits = 32 if spec.bits is None else spec.bits_for(name)
        total += bits * layer.weight.numel()
    return math.ceil(total / 8)


def average_bits(model: nn.Module, spec: QuantSpec) -> float | None:
    """Weight bits per Conv/Linear weight element (None for a float spec)."""
    if spec.bits is None:
        return None
    n = sum(layer.weight.numel() for _, layer in quantized_layers(model))
    return sum(spec.bits_for(name) * layer.weight.numel() for name, layer in quantized_layers(model)) / n
