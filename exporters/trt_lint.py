"""Check an ONNX graph against TensorRT's explicit-quantization (Q/DQ) rules before building.

A Q/DQ graph that onnxruntime runs happily can still fail to parse in TensorRT, or build
into an engine that computes something else. This lint runs anywhere (numpy + onnx) so
the exporter can catch that on the training machine. Rules and sources:

- QuantizeLinear / DequantizeLinear zero points are 0 or absent ("x_zero_point must be
  zero", onnx-tensorrt docs/operators.md); their type is signed INT8, FP8 E4M3, FP4 E2M1 or
  INT4 (NvInfer.h IQuantizeLayer output types). UINT8 (also ONNX's default when a Q has no
  zero point) is not a quantized type there.
- Scales are constant, finite, strictly positive floats ("All scale coefficients must have
  strictly positive values", TensorRT IQuantizeLayer docs); float32, float16 or bfloat16
  (the Q input types operators.md lists). In strongly typed networks (every network on
  TensorRT 11) a scale's type must match the float tensor it quantizes or dequantizes to:
  NvInfer.h 10.0-10.12 "input data type must match the scale data type" (Q) and "output data
  type is inferred from scale data type" (DQ); 10.13+ still for float16/bfloat16 scales. The
  lint checks the strict form where the graph declares the tensor's type.
- Scales are a scalar (per tensor), 1-D (per channel) or block-shaped: the input's rank, equal
  to its shape except one of the last two axes. NvInfer.h allows block quantization for INT4,
  FP8 and FP4 (10.13+, 11; 10.0-10.12 headers: INT4 only).
  Per-channel is for constant weights only; activations are quantized per tensor. The
  per-channel axis must be the output-channel axis of the weight's consumer:
  Conv W (M, C/g, k...) axis 0; ConvTranspose W (C, M/g, k...) axis 1; Gemm B axis 0
  with transB=1, axis 1 with transB=0; MatMul B (..., K, N) the last axis. Note ONNX's
  default `axis` is 1, so a Conv weight DQ without an explicit axis=0 is wrong.
- INT4 only as weight-only MatMul/Gemm: TensorRT's guide ("Working with Quantized Types")
  describes INT4 only as weight-only GEMM quantization; the headers do not state the
  restriction, so this rule is conservative. Convolutions below 8 bits stay INT8 codes on the
  n-bit grid.
- Every QuantizeLinear feeds DequantizeLinear nodes with the same scale; every
  DequantizeLinear reads constant weights or a QuantizeLinear output.
- Weight codes use the narrow symmetric range [-127, 127] (INT4: [-7, 7]). TensorRT
  stores and clamps to [-128, 127], so -128 parses, but hero-deploy's symmetric quantizer
  never emits it: a -128 means the codes came from some other quantizer. Pass
  narrow_range=False (CLI --allow-full-range) to accept it.
- Opset 13..MAX_OPSET: per-axis Q/DQ appeared in opset 13; TensorRT 10.0's parser reads
  opsets up to 20 (10.15 reaches 24). Raise max_opset when targeting a newer TensorRT.

`residual_warnings` adds what builds but runs slower than it could: a residual Add outside the
INT8 convolution before it.

Usage: python -m exporters.trt_lint MODEL.onnx  (exit 0 clean, 1 issues, 2 unusable input; warnings
are printed prefixed "warning:" and do not change the exit code)
"""

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from exporters.device.errors import HeroError

MIN_OPSET = 13
MAX_OPSET = 20

_QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1}
_BLOCK_TYPES = {TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1}
_SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_LOWEST_CODE = {TensorProto.INT8: -128, TensorProto.INT4: -8}
_GEMM_OPS = {"MatMul", "Gemm"}


@dataclass
class _Graph:
    """Lookups over one graph: constants, producers, consumers and declared element types."""

    consts: dict[str, TensorProto]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    elem_types: dict[str, int]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(a), np.float32))
        if a.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(a), np.int64))
    return None


def _index(graph: onnx.GraphProto) -> _Graph:
    consts = {t.name: t for t in graph.initializer}
    producers, consumers = {}, {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant_value(node)
            if value is not None:
                consts[node.output[0]] = value
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    elem_types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.value_info, *graph.output]
        if v.type.HasField("tensor_type")
    }
    return _Graph(consts, producers, consumers, elem_types)


def _type_name(data_type: int | None) -> str:
    return "unknown" if data_type is None else TensorProto.DataType.Name(data_type)


def _where(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _quant_type(node: onnx.NodeProto, g: _Graph) -> int | None:
    """The quantized element type a Q produces or a DQ reads (ONNX operator semantics)."""
    if len(node.input) > 2 and node.input[2]:
        zero_point = g.consts.get(node.input[2])
        return zero_point.data_type if zero_point is not None else g.elem_types.get(node.input[2])
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype", 0) or TensorProto.UINT8
    data = node.input[0]
    if data in g.consts:
        return g.consts[data].data_type
    producer = g.producers.get(data)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return _quant_type(producer, g)
    return g.elem_types.get(data)


def _weight_consumers(node: onnx.NodeProto, g: _Graph) -> list[tuple[onnx.NodeProto, int]]:
    """Ops that consume the dequantized weight (through the DQ when `node` is a Q)."""
    if node.op_type == "DequantizeLinear":
        return g.consumers.get(node.output[0], [])
    return [
        use
        for dq, _ in g.consumers.get(node.output[0], [])
        if dq.op_type == "DequantizeLinear"
        for use in g.consumers.get(dq.output[0], [])
    ]


def _weight_name(node: onnx.NodeProto, g: _Graph) -> str | None:
    """The constant weight tensor this Q/DQ quantizes (a DQ may read it through its Q), else None."""
    data = node.input[0]
    if data in g.consts:
        return data
    producer = g.producers.get(data)
    if node.op_type == "DequantizeLinear" and producer is not None and producer.op_type == "QuantizeLinear":
        return producer.input[0] if producer.input[0] in g.consts else None
    return None


def _output_channel_axis(op: onnx.NodeProto, input_index: int, rank: int) -> int | None:
    """Output-channel axis of a weight input, from each op's ONNX weight layout."""
    if input_index != 1:
        return None
    if op.op_type == "Conv":
        return 0
    if op.op_type == "ConvTranspose":
        return 1
    if op.op_type == "Gemm":
        return 0 if _attr(op, "transB", 0) else 1
    if op.op_type == "MatMul":
        return rank - 1
    return None


def _type_issues(node: onnx.NodeProto, g: _Graph, qtype: int | None) -> list[str]:
    where, is_const = _where(node), _weight_name(node, g) is not None
    if qtype == TensorProto.UINT8:
        return [f"{where}: quantized type is UINT8; TensorRT needs signed INT8 with zero point 0 "
                "(give the Q an int8 zero point of 0)"]
    if qtype not in _QUANT_TYPES:
        return [f"{where}: quantized type {_type_name(qtype)} is not one TensorRT quantizes to "
                "(INT8, FP8 E4M3, FP4 E2M1, or INT4 weight-only)"]
    if qtype != TensorProto.INT4:
        return []
    if not is_const:
        return [f"{where}: INT4 on an activation; TensorRT supports INT4 only as weight-only quantization"]
    feeds = {op.op_type for op, _ in _weight_consumers(node, g)}
    if feeds - _GEMM_OPS:
        return [f"{where}: INT4 weights feed {', '.join(sorted(feeds - _GEMM_OPS))}; TensorRT documents INT4 only "
                "as weight-only MatMul/Gemm (a conservative rule: its headers do not state it), so store "
                "convolution weights as INT8 codes on the n-bit grid"]
    return []


def _zero_point_issues(node: onnx.NodeProto, g: _Graph) -> list[str]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    zero_point = g.consts.get(node.input[2])
    if zero_point is None:
        return [f"{_where(node)}: zero point is not a constant; TensorRT needs a constant zero point of 0"]
    values = numpy_helper.to_array(zero_point)
    if np.any(values.astype(np.float64) != 0):
        return [f"{_where(node)}: zero point is {values.ravel()[:4].tolist()}, not 0; TensorRT supports only "
                "symmetric quantization (zero point 0)"]
    return []


def _axis_issues(node: onnx.NodeProto, g: _Graph, n_scales: int) -> list[str]:
    dims = list(g.consts[_weight_name(node, g)].dims)
    axis = _attr(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    if not 0 <= axis < len(dims):
        return [f"{_where(node)}: axis {axis} is out of range for weights of shape {dims}"]
    issues = []
    for op, index in _weight_consumers(node, g):
        expected = _output_channel_axis(op, index, len(dims))
        if expected is not None and expected != axis:
            issues.append(f"{_where(node)}: per-channel axis is {axis} but {op.op_type} '{op.name}' has its "
                          f"output channels on weight axis {expected}; set axis={expected}")
    if not issues and dims[axis] != n_scales:
        issues.append(f"{_where(node)}: {n_scales} scales but weight axis {axis} has {dims[axis]} entries")
    return issues


def _scale_issues(node: onnx.NodeProto, g: _Graph, qtype: int | None) -> list[str]:
    where, proto = _where(node), g.consts.get(node.input[1])
    if proto is None:
        return [f"{where}: scale is not a constant initializer; TensorRT needs constant scales"]
    scale = numpy_helper.to_array(proto).astype(np.float64)
    issues = []
    if proto.data_type not in _SCALE_TYPES:
        issues.append(f"{where}: scale type {_type_name(proto.data_type)}; use float32 (or float16/bfloat16)")
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        issues.append(f"{where}: scales must be finite and strictly positive (smallest is {scale.min():g})")
    is_const = _weight_name(node, g) is not None
    if scale.size <= 1:
        return issues
    if scale.ndim == 1:
        if not is_const:
            return issues + [f"{where}: per-channel scale on an activation; TensorRT quantizes activations "
                             "per tensor (use one scalar scale)"]
        return issues + _axis_issues(node, g, scale.size)
    if qtype not in _BLOCK_TYPES:
        return issues + [f"{where}: block-shaped scale {list(scale.shape)} for {_type_name(qtype)}; TensorRT takes "
                         "block scales only for INT4, FP8 and FP4 (NvInfer.h)"]
    if not is_const:
        return issues + [f"{where}: block-shaped scale on an activation; TensorRT 10's headers allow block "
                         "quantization only for constant weights"]
    dims = list(g.consts[_weight_name(node, g)].dims)
    blocked = [axis for axis, (d, s) in enumerate(zip(dims, scale.shape)) if d != s]
    if scale.ndim != len(dims) or len(blocked) != 1 or blocked[0] < len(dims) - 2:
        issues.append(f"{where}: block-shaped scale {list(scale.shape)} for weights {dims}; TensorRT needs the "
                      "weights' rank and shape except along one of the last two axes")
    return issues


def _float_type(name: str, g: _Graph) -> int | None:
    """The declared element type of a float tensor (a constant's, or from the graph's type info)."""
    return g.consts[name].data_type if name in g.consts else g.elem_types.get(name)


def _scale_type_issues(node: onnx.NodeProto, g: _Graph) -> list[str]:
    """Strongly typed networks: the scale's type is the float type on the float side of the Q/DQ."""
    proto = g.consts.get(node.input[1])
    float_side = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
    declared = _float_type(float_side, g)
    if proto is None or declared is None or declared not in _SCALE_TYPES or declared == proto.data_type:
        return []
    role = "input" if node.op_type == "QuantizeLinear" else "output"
    return [f"{_where(node)}: scale is {_type_name(proto.data_type)} but its {role} is {_type_name(declared)}; "
            f"in strongly typed TensorRT networks they must match: store the scale as {_type_name(declared)}"]


def _pairing_issues(node: onnx.NodeProto, g: _Graph) -> list[str]:
    where = _where(node)
    if node.op_type == "DequantizeLinear":
        producer = g.producers.get(node.input[0])
        if node.input[0] in g.consts or (producer is not None and producer.op_type == "QuantizeLinear"):
            return []
        return [f"{where}: input is neither constant weights nor a QuantizeLinear output"]
    uses = g.consumers.get(node.output[0], [])
    if not uses or any(op.op_type != "DequantizeLinear" for op, _ in uses):
        return [f"{where}: output must feed DequantizeLinear nodes only (every Q needs its DQ)"]
    issues = []
    for dq, _ in uses:
        q_scale, dq_scale = g.consts.get(node.input[1]), g.consts.get(dq.input[1])
        if q_scale is None or dq_scale is None:
            continue
        same = np.array_equal(numpy_helper.to_array(q_scale), numpy_helper.to_array(dq_scale))
        if not same or (numpy_helper.to_array(q_scale).size > 1 and _attr(node, "axis", 1) != _attr(dq, "axis", 1)):
            issues.append(f"{where}: its DequantizeLinear '{dq.name or dq.output[0]}' uses a different scale/axis")
    return issues


def _range_issues(node: onnx.NodeProto, g: _Graph, qtype: int | None) -> list[str]:
    weights = g.consts.get(node.input[0])
    if node.op_type != "DequantizeLinear" or weights is None or qtype not in _LOWEST_CODE:
        return []
    codes = numpy_helper.to_array(weights).astype(np.int16)
    lowest = _LOWEST_CODE[qtype]
    if codes.size and codes.min() == lowest:
        return [f"{_where(node)}: weight codes reach {lowest}; the symmetric range is "
                f"[{lowest + 1}, {-lowest - 1}] (requantize, or lint with narrow_range=False)"]
    return []


def _opset_issues(model: onnx.ModelProto, max_opset: int) -> list[str]:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        return ["model declares no default-domain opset"]
    if version < MIN_OPSET:
        return [f"opset {version} is older than {MIN_OPSET}, the first with per-axis QuantizeLinear/"
                f"DequantizeLinear; re-export with opset_version >= {MIN_OPSET}"]
    if version > max_opset:
        return [f"opset {version} is newer than {max_opset}, the newest the targeted TensorRT ONNX parser "
                "reads; re-export with a lower opset_version (or raise max_opset for a newer TensorRT)"]
    return []


def _load(model: "str | os.PathLike | onnx.ModelProto") -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model))
    except (OSError, DecodeError) as exc:
        raise HeroError(f"cannot read ONNX model {model}: {exc}; check the path and that it is an .onnx file") from exc


def lint_explicit_quantization(
    model: "str | os.PathLike | onnx.ModelProto", *, max_opset: int = MAX_OPSET, narrow_range: bool = True
) -> list[str]:
    """Issues that keep `model` from building as an explicitly quantized TensorRT engine ([] = OK).

    Raises HeroError when the file cannot be read as ONNX.
    """
    model = _load(model)
    try:  # the declared types of intermediate tensors, for the scale-type rule
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an uninferable graph is linted with the types it declares
        typed = model
    g = _index(typed.graph)
    issues = _opset_issues(model, max_opset)
    for node in typed.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.domain not in ("", "ai.onnx"):
            issues.append(f"{_where(node)}: domain '{node.domain}'; TensorRT parses only standard ONNX Q/DQ")
            continue
        qtype = _quant_type(node, g)
        issues += _type_issues(node, g, qtype)
        issues += _zero_point_issues(node, g)
        issues += _scale_issues(node, g, qtype)
        issues += _scale_type_issues(node, g)
        issues += _pairing_issues(node, g)
        if narrow_range:
            issues += _range_issues(node, g, qtype)
    return issues


_FUSING_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _weighted_producer(name: str, g: _Graph) -> onnx.NodeProto | None:
    """The Conv/Gemm/MatMul whose output `name` is, through a BatchNormalization TensorRT fuses."""
    node = g.producers.get(name)
    while node is not None and node.op_type == "BatchNormalization":
        node = g.producers.get(node.input[0])
    return node if node is not None and node.op_type in _FUSING_OPS else None


def residual_warnings(model: "str | os.PathLike | onnx.ModelProto") -> list[str]:
    """Adds that TensorRT cannot run inside an INT8 convolution ([] = none, or no quantized activations).

    TensorRT fuses an element-wise Add into the Conv/Gemm producing one of its inputs, in INT8, when
    the other input, the residual, comes through a Q/DQ pair (TensorRT developer guide, "Q/DQ
    Layer-Placement Recommendations"; hero-deploy's tensorrt layout places it: `exporters.act_layout.
    residual_points`). An Add reading a weighted op's output and no DequantizeLinear output then runs
    apart, in float. Not a build error, so not an `lint_explicit_quantization` issue: a warning."""
    model = _load(model)
    g = _index(model.graph)
    if not any(n.op_type == "QuantizeLinear" and n.input[0] not in g.consts for n in model.graph.node):
        return []  # weight-only: every activation is float anyway
    warnings = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in g.consts for i in node.input):
            continue  # a bias Add, not a residual one
        weighted = [_weighted_producer(i, g) for i in node.input]
        quantized = [getattr(g.producers.get(i), "op_type", None) == "DequantizeLinear" for i in node.input]
        if any(weighted) and not any(quantized):
            op = next(w for w in weighted if w is not None)
            warnings.append(f"{_where(node)}: no input comes through a Q/DQ pair, so TensorRT cannot fuse it into the "
                            f"INT8 {_where(op)}: quantize its residual input (act_layout tensorrt does, on models "
                            "torch.fx can trace)")
    return warnings


def main(argv: list[str] | None = None) -> int:
    """CLI: print one issue per line; exit 0 clean, 1 with issues, 2 on unusable input."""
    parser = argparse.ArgumentParser(
        prog="python -m exporters.trt_lint", description="Lint an ONNX Q/DQ graph for TensorRT explicit quantization."
    )
    parser.add_argument("model", help="path to the .onnx file")
    parser.add_argument("--max-opset", type=int, default=MAX_OPSET, help=f"newest opset accepted (default {MAX_OPSET})")
    parser.add_argument("--allow-full-range", action="store_true", help="accept weight code -128 (INT4: -8)")
    args = parser.parse_args(argv)
    try:
        issues = lint_explicit_quantization(args.model, max_opset=args.max_opset, narrow_range=not args.allow_full_range)
    except HeroError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for issue in issues:
        print(issue)
    for warning in residual_warnings(args.model):
        print(f"warning: {warning}")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
