"""Linear uniform post-training quantization (PTQ) of Conv/Linear weights and activations.

The quantizer is the linear uniform one of HERO (Yang et al., DAC 2022), Theorem 2: a tensor is
mapped onto 2^bits evenly spaced levels and back. Weights are quantized per output channel
(axis 0) or per tensor, symmetric (TensorRT's restricted range, zero point 0) or asymmetric;
input activations optionally per tensor, symmetric int8, with scales from calibration. BatchNorm
is folded into the preceding Conv/Linear first, as an inference engine would do.

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
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from exporters.device.bits import SUPPORTED_BITS, check_bits, parse_bits  # noqa: F401 (re-exported)
from exporters.device.errors import HeroError, unknown_choice

ACT_BITS = 8
QUANTIZED_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACT_METHODS = ("max", "percentile")
_QUANTILE_MAX_SAMPLES = 1 << 20  # torch.quantile refuses inputs above 2^24 elements


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a model, the one object that says it: weight `bits` (None = full
    precision), scheme, BN folding, activations. Every field is checked here, once.

    `act_bits` is None (float activations) or 8 (per-tensor symmetric int8 on the input of every
    Conv/Linear, scales from `calibrate_activations` with `act_method`/`act_percentile`).
    """

    bits: int | None = None
    symmetric: bool = True
    per_channel: bool = True
    fold_bn: bool = True
    act_bits: int | None = None
    act_method: str = "max"
    act_percentile: float = 99.99

    def __post_init__(self):
        if self.bits is not None:
            object.__setattr__(self, "bits", check_bits(self.bits))
        for name in ("symmetric", "per_channel", "fold_bn"):
            if not isinstance(getattr(self, name), bool):
                raise HeroError(f"quantization option {name} must be true or false, got {getattr(self, name)!r}")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits != ACT_BITS):
            raise HeroError(f"act_bits must be null or {ACT_BITS}, got {self.act_bits!r}")
        _check_act_method(self.act_method, self.act_percentile)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
    """Per-tensor int8 input scales of a model's Conv/Linear layers, keyed by module name: what
    `calibrate_activations` measured and what W{n}A8 emulation and export both use."""

    scales: Mapping[str, float]

    def __post_init__(self):
        bad = {k: v for k, v in self.scales.items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0)}
        if bad:
            raise HeroError(f"activation scales must be positive and finite, got {bad}: recalibrate")
        object.__setattr__(self, "scales", {str(k): float(v) for k, v in self.scales.items()})


def check_calibration(spec: QuantSpec, calibration: Calibration | None) -> None:
    """act_bits 8 needs a Calibration and a Calibration needs act_bits 8."""
    if calibration is not None and not isinstance(calibration, Calibration):
        raise HeroError(f"calibration must be a Calibration from calibrate_activations, got {type(calibration).__name__}")
    if (spec.act_bits is None) != (calibration is None):
        raise HeroError("act_bits=8 needs a Calibration from calibrate_activations, and a Calibration needs act_bits=8")


def _check_act_method(method, percentile) -> None:
    if method not in _ACT_METHODS:
        raise HeroError(unknown_choice("activation calibration method", method, _ACT_METHODS))
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile <= 100:
        raise HeroError(f"act_percentile must be a number in (0, 100], got {percentile!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid of the quantizer: symmetric uses TensorRT's restricted range
    [-(2^(b-1)-1), 2^(b-1)-1] (NVIDIA, "Integer Quantization for Deep Learning Inference", 2020,
    Sec. 3.1), asymmetric the full unsigned range [0, 2^b - 1]."""
    bits = check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


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


def _along(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim-dimensional tensor."""
    if t.dim() == 0:
        return t
    return t.reshape([-1 if d == axis % ndim else 1 for d in range(ndim)])


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


def quantize_tensor(w: torch.Tensor, bits: int, *, symmetric: bool = True, per_channel: bool = True,
                    axis: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `w` (cast to float32) to `bits`: returns int32 q on the grid of `qrange`, float32
    scale and int32 zero point, each of shape (w.shape[axis],) per channel or () per tensor.
    Ranges come from the tensor itself (symmetric: max |w|; asymmetric: [min(w, 0), max(w, 0)]),
    per slice along `axis` when per_channel."""
    if not torch.isfinite(w).all():
        raise HeroError("cannot quantize a tensor with NaN or infinite values: check the checkpoint")
    qmin, qmax = qrange(bits, symmetric)
    w = w.detach().to(torch.float32)
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


def fold_conv_bn_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                         bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer (Jacob et al., "Quantization and
    Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018,
    Sec. 3.2): with k = gamma / sqrt(var + eps) per output channel,
    W' = W * k and b' = (b - mean) * k + beta. Computed in float64, returned in weight's dtype."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    b = bias.double() if bias is not None else torch.zeros_like(var)
    k = gamma / torch.sqrt(var + bn.eps)
    folded_weight = weight.double() * _along(k, weight.dim(), 0)
    return folded_weight.to(weight.dtype), ((b - mean) * k + beta).to(weight.dtype)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, QUANTIZED_LAYER_TYPES) or not isinstance(bn, _BN_TYPES):
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.running_mean is not None and bn.num_features == channels


def _traced_pairs(model: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """(layer, bn) names where the bn's only input is the layer's output and nothing else uses it,
    from the torch.fx graph of `model`; modules called more than once are left alone."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] == 1 and calls[source.target] == 1:
            if _foldable(model.get_submodule(source.target), model.get_submodule(node.target)):
                pairs.append((source.target, node.target))
    return pairs


def _consecutive_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names of a Conv/Linear registered directly before a BN in the same parent: exact
    for nn.Sequential, a convention (self.conv1 then self.bn1) for attributes."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:]):
            if _foldable(layer, bn):
                pairs.append((prefix + layer_name, prefix + bn_name))
    return pairs


class _FoldedIntoLinear(nn.Identity):
    """What replaces a BatchNorm folded into the Linear before it. A BatchNorm normalizes dim 1,
    which is the Linear's feature dim only for 2-D (batch, features) input; on a (B, T, D) input
    with T == D the fold would silently compute something else, so that raises instead."""

    def __init__(self, layer: str, bn: str):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise HeroError(f"BatchNorm {self.bn} normalizes dim 1 of the {x.dim()}-D output of Linear {self.layer}, "
                            "not its features, so it cannot be folded into it: quantize with fold_bn=False")
        return x


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping a `_FoldedIntoLinear` (whose shape check fx cannot trace) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, _FoldedIntoLinear) or super().is_leaf_module(m, qualified_name)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of `model` with every BatchNorm that directly follows a Conv/Linear
    folded into it (`fold_conv_bn_weights`) and replaced by nn.Identity; module names stay the
    same. Pairs come from torch.fx tracing; a model that does not trace falls back to
    `_consecutive_pairs` (with a warning). A BN with no preceding Conv/Linear stays. A BN folded
    into a Linear is replaced by an identity that raises HeroError on other than 2-D input
    (`_FoldedIntoLinear`): tracing has no shapes, and only on 2-D input is the fold exact."""
    folded = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(folded)
    except Exception as exc:  # fx raises many types for untraceable control flow
        warnings.warn(f"torch.fx could not trace {type(model).__name__} ({exc}); folding BatchNorm into "
                      "the Conv/Linear registered just before it", stacklevel=2)
        pairs = _consecutive_pairs(folded)
    else:
        pairs = _traced_pairs(folded, graph)
    for layer_name, bn_name in pairs:
        layer = folded.get_submodule(layer_name)
        weight, bias = fold_conv_bn_weights(layer.weight.detach(), layer.bias, folded.get_submodule(bn_name))
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias)
        _replace(folded, bn_name, _FoldedIntoLinear(layer_name, bn_name) if isinstance(layer, nn.Linear)
                 else nn.Identity())
    return folded


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) of every Conv1d/2d/3d and Linear, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYER_TYPES)]


class ActQuant(nn.Module):
    """Per-tensor symmetric int8 fake quantization of an activation with a fixed `scale`."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(ACT_BITS, symmetric=True)
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        q = quantize_with_qparams(x, self.scale, zero_point, qmin, qmax)
        return dequantize(q, self.scale, zero_point).to(x.dtype)


def _quantize_input(layer: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: pass the layer's input through its `act_quant` child."""
    return (layer.act_quant(args[0]), *args[1:])


def activation_scales(model: nn.Module) -> dict[str, float]:
    """{layer name: input scale} of the layers `quantize_model` gave an ActQuant."""
    return {name: float(m.act_quant.scale) for name, m in quantized_layers(model) if hasattr(m, "act_quant")}


def checked_act_scales(model: nn.Module, calibration: Calibration) -> dict[str, float]:
    """The calibration's scales for exactly the model's Conv/Linear layers, in layer order, or a HeroError."""
    names = {name for name, _ in quantized_layers(model)}
    scales = calibration.scales
    missing, unknown = sorted(names - scales.keys()), sorted(scales.keys() - names)
    if missing or unknown:
        raise HeroError(f"activation scales do not match the model's Conv/Linear layers (missing: {missing}, "
                        f"unknown: {unknown}): calibrate this model with calibrate_activations")
    return {name: scales[name] for name, _ in quantized_layers(model)}


def quantize_model(model: nn.Module, spec: QuantSpec, calibration: Calibration | None = None) -> nn.Module:
    """An eval-mode copy of `model` (never modified) quantized as `spec` says: BN folded (if
    spec.fold_bn) and every Conv/Linear weight fake-quantized to spec.bits per output channel
    (axis 0) or per tensor; biases stay float. With spec.act_bits 8 (which needs `calibration`)
    each Conv/Linear also fake-quantizes its input to int8 through an ActQuant child
    `<layer>.act_quant` run by a forward pre-hook, so layer names do not change; the copy's
    `act_scales` attribute is then the {layer name: scale} dict."""
    if not isinstance(spec, QuantSpec):
        raise HeroError(f"quantize_model takes a QuantSpec, got {type(spec).__name__}: e.g. QuantSpec(bits=4)")
    check_calibration(spec, calibration)
    quantized = fold_bn(model) if spec.fold_bn else copy.deepcopy(model).eval()
    scales = None if calibration is None else checked_act_scales(quantized, calibration)
    with torch.no_grad():
        for name, layer in quantized_layers(quantized):
            if spec.bits is not None:
                layer.weight.copy_(fake_quantize(layer.weight, spec.bits, symmetric=spec.symmetric,
                                                 per_channel=spec.per_channel, axis=0))
            if scales is not None:
                layer.act_quant = ActQuant(scales[name]).to(layer.weight.device)
                layer.register_forward_pre_hook(_quantize_input)
    if scales is not None:
        quantized.act_scales = scales
    return quantized


def _percentile_of_abs(x: torch.Tensor, percentile: float, generator: torch.Generator) -> float:
    """The `percentile` of |x| on at most 2^20 uniformly drawn elements (torch.quantile has an
    input size limit, and a fixed-seed sample keeps calibration deterministic)."""
    flat = x.detach().reshape(-1).abs().to(torch.float32)
    if flat.numel() > _QUANTILE_MAX_SAMPLES:
        index = torch.randint(flat.numel(), (_QUANTILE_MAX_SAMPLES,), generator=generator)
        flat = flat[index.to(flat.device)]
    return float(torch.quantile(flat, percentile / 100.0))


def calibrate_activations(model: nn.Module, batches: Iterable, spec: QuantSpec) -> Calibration:
    """Per-tensor symmetric int8 input scale (`symmetric_qparams` with amax) of every Conv/Linear,
    keyed by qualified module name, from running `model` in eval mode over `batches` (tensors, or
    tuples whose first item is the input). amax is the running max of |x| (spec.act_method
    "max") or the mean over batches of the per-batch spec.act_percentile of |x| ("percentile").
    BatchNorm in eval mode is an affine map after its Conv, so the inputs of the Conv/Linear
    layers are the same whether or not it is folded. Modes are restored afterwards."""
    method, percentile = spec.act_method, spec.act_percentile
    layers = quantized_layers(model)
    stats: dict[str, list[float]] = {name: [] for name, _ in layers}
    generator = torch.Generator().manual_seed(0)

    def observe(name):
        def hook(_, args):
            x = args[0]
            if not torch.isfinite(x).all():
                raise HeroError(f"non-finite activations entering {name} during calibration: check the model and data")
            stats[name].append(float(x.detach().abs().max()) if method == "max"
                               else _percentile_of_abs(x, percentile, generator))
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_pre_hook(observe(name)) for name, layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    unseen = [name for name, seen in stats.items() if not seen]
    if unseen:
        raise HeroError(f"layers {unseen} saw no input during calibration: pass at least one batch "
                        "and make sure every Conv/Linear runs in forward")
    amax = {name: max(seen) if method == "max" else sum(seen) / len(seen) for name, seen in stats.items()}
    return Calibration({name: float(symmetric_qparams(torch.tensor(a), ACT_BITS)[0]) for name, a in amax.items()})


def packed_weight_bytes(model: nn.Module, bits: int | None) -> int:
    """Bytes of the Conv/Linear weights packed at `bits` per element: ceil(bits * n / 8), with
    bits None meaning float32. Biases, BN and other float parameters are not counted."""
    bits = 32 if bits is None else check_bits(bits)
    return math.ceil(bits * sum(m.weight.numel() for _, m in quantized_layers(model)) / 8)
