"""Q/DQ on an exported float graph (the ONNX half of `exporters.onnx.export_onnx`): which node reads
which layer's weight, the weight codes as integer initializers read through DequantizeLinear, int32
biases on the accumulator grid for ONNX Runtime's integer kernels, and the tensorrt layout's
activation Clip -> QuantizeLinear -> DequantizeLinear on every Conv/Gemm/MatMul input. Every number
comes from `exporters.quantize`; this module only places it.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters import quantize
from exporters.device.errors import HeroError

_ACT_ZERO_POINT = np.int8(0)


class WeightUse(NamedTuple):
    """The ONNX node named `node` reads the weight of torch layer `module` from initializer
    `weight`, whose output channels lie along `axis`."""

    node: str
    module: str
    weight: str
    axis: int


def output_channel_axis(node: onnx.NodeProto) -> int:
    """Axis of the stored weight that indexes output channels (ONNX operator specs): Conv W is
    (M, C/group, k...) -> 0; Gemm B is (K, N), or (N, K) with transB=1; MatMul B is (K, N) -> 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    return 1


def stored_layout(weight: torch.Tensor, axis: int) -> np.ndarray:
    """The torch (out, in, ...) weight as the ONNX op stores it (transposed when axis is 1)."""
    array = weight.detach().cpu().numpy()
    return array if axis == 0 else array.T


def _scope_modules(node: onnx.NodeProto) -> list[str]:
    """Module names the dynamo exporter recorded for `node`, innermost first."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
    return list(reversed(ast.literal_eval(scopes)))


def weight_uses(proto: onnx.ModelProto, weights: Mapping[str, torch.Tensor | None]) -> list[WeightUse]:
    """Every Conv/Gemm/MatMul node whose weight input is one of `weights` ({layer: its weight as
    exported, None for a layer the exported module does not hold}: `quantize.exported_weights`),
    as stored or transposed. Found by initializer name ("conv1.weight"), by the exporter's module
    scope, or else by value alone (a weight passed to F.linear or F.conv2d outside its module:
    torchvision's Swin attention), always confirmed by value. Raises HeroError naming every layer
    whose weight no such node reads."""
    layers = {name: weight for name, weight in weights.items() if weight is not None}
    initializers = {t.name: t for t in proto.graph.initializer}
    layouts: dict[tuple[str, int], np.ndarray] = {}

    def layout(name: str, axis: int) -> np.ndarray:
        if (name, axis) not in layouts:
            layouts[name, axis] = stored_layout(layers[name], axis)
        return layouts[name, axis]

    def matches(name: str, stored: np.ndarray, axis: int) -> bool:
        weight = layers[name]
        shape = tuple(weight.shape) if axis == 0 else tuple(weight.shape)[::-1]
        return (axis == 0 or weight.dim() == 2) and stored.shape == shape and np.array_equal(stored, layout(name, axis))

    uses = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        axis = output_channel_axis(node)
        stored = numpy_helper.to_array(initializers[node.input[1]])
        named = [n for n in [node.input[1].removesuffix(".weight"), *_scope_modules(node)] if n in layers]
        found = next((n for n in named if matches(n, stored, axis)), None)
        if found is None:  # by value: of equal weights, one not placed yet
            equal = [n for n in layers if matches(n, stored, axis)]
            taken = {use.module for use in uses}
            found = next((n for n in equal if n not in taken), equal[0] if equal else None)
        if found is not None:
            uses.append(WeightUse(node.name, found, node.input[1], axis))
    missing = sorted(weights.keys() - {use.module for use in uses})
    if missing:
        raise HeroError(f"the exported ONNX graph has no Conv/Gemm/MatMul reading the weights of {missing}; "
                        "this model cannot be exported quantized: export it with bits=None")
    return uses


def widths(spec: quantize.QuantSpec) -> list[int]:
    return [b for _, b in spec.layer_bits] if spec.layer_bits is not None else [spec.bits]


def storage_type(bits: int, spec: quantize.QuantSpec, int4_storage: bool) -> tuple[int, type]:
    """(ONNX element type, numpy dtype) holding a layer's `bits`-wide integer grid (`quantize.qrange`):
    INT4 where int4_storage and bits <= 4 on the canonical grid, INT16 for 16 bits, else INT8."""
    if int4_storage and bits <= 4 and spec.grid == "canonical":
        return (TensorProto.INT4, ml_dtypes.int4) if spec.symmetric else (TensorProto.UINT4, ml_dtypes.uint4)
    if bits == 16:
        return (TensorProto.INT16, np.int16) if spec.symmetric else (TensorProto.UINT16, np.uint16)
    return (TensorProto.INT8, np.int8) if spec.symmetric else (TensorProto.UINT8, np.uint8)


def _dequantized_name(use: WeightUse, taken: set[str]) -> str:
    """"<layer>.weight" ("<layer>.weight_transposed" when stored (in, out)) for the dequantized
    weight, so weights keep readable names after the exporter folded a Transpose into "val_N"."""
    name = f"{use.module}.weight" + ("" if use.axis == 0 else "_transposed")
    return name if name == use.weight or name not in taken else use.weight


def quantize_weights(proto: onnx.ModelProto, uses: list[WeightUse], codes: dict[str, quantize.WeightCodes],
                      spec: quantize.QuantSpec, int4_storage: bool) -> None:
    """Replace each used float weight initializer by DequantizeLinear(W_quantized, W_scale,
    W_zero_point) -> W, so its consumers read the dequantized weight W: one per layer and stored
    layout, which copies of one weight (a layer called twice) share."""
    graph = proto.graph
    taken = {t.name for t in graph.initializer} | {out for node in graph.node for out in node.output}
    renamed: dict[str, str] = {}
    dequantized: dict[tuple[str, int], str] = {}
    dq_nodes = []
    for use in uses:
        if use.weight in renamed:
            continue
        if (use.module, use.axis) in dequantized:
            renamed[use.weight] = dequantized[use.module, use.axis]
            continue
        layer = codes[use.module]
        q, scale, zero_point = layer.q.cpu(), layer.scale.cpu(), layer.zero_point.cpu()
        _, dtype = storage_type(layer.bits, spec, int4_storage)
        weight = renamed[use.weight] = dequantized[use.module, use.axis] = _dequantized_name(use, taken)
        taken.add(weight)
        names = [f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"]
        if layer.block_size is not None:  # DequantizeLinear-21 blocked along the stored input axis
            scale, zero_point = stored_layout(scale, use.axis), stored_layout(zero_point, use.axis)
            axis_attr = {"axis": 1 - use.axis, "block_size": layer.block_size}
        else:
            scale, zero_point = scale.numpy(), zero_point.numpy()
            axis_attr = {"axis": use.axis} if scale.ndim else {}  # quantize-first: per channel after the fold
        graph.initializer.extend([numpy_helper.from_array(stored_layout(q, use.axis).astype(dtype), names[0]),
                                  numpy_helper.from_array(scale.astype(np.float32), names[1]),
                                  numpy_helper.from_array(zero_point.astype(dtype), names[2])])
        dq_nodes.append(helper.make_node("DequantizeLinear", names, [weight], name=f"{weight}_DequantizeLinear",
                                         **axis_attr))
    kept = [t for t in graph.initializer if t.name not in renamed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    kept_info = [v for v in graph.value_info if v.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    nodes = dq_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def quantize_biases(proto: onnx.ModelProto, uses: list[WeightUse],
                     biases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace the float bias initializer of each Conv/Gemm in `biases` by int32 codes read through
    DequantizeLinear (scale input scale x weight scale, axis 0), `quantize.quantize_bias`'s grid:
    what QLinearConv adds to its accumulator, written out so the graph says it."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    done: dict[str, str] = {}
    added = []
    for use in uses:
        node = nodes[use.node]
        if use.module not in biases or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        if node.input[2] in done:
            node.input[2] = done[node.input[2]]
            continue
        if node.input[2] not in initializers:
            continue
        q, scale = biases[use.module]
        name = f"{use.module}.bias_dequantized"
        graph.initializer.extend([numpy_helper.from_array(q.numpy().astype(np.int32), f"{use.module}.bias_quantized"),
                                  numpy_helper.from_array(scale.numpy().astype(np.float32), f"{use.module}.bias_scale")])
        added.append(helper.make_node("DequantizeLinear", [f"{use.module}.bias_quantized", f"{use.module}.bias_scale"],
                                      [name], name=f"{name}_DequantizeLinear", axis=0))
        done[node.input[2]] = name
        node.input[2] = name
    read = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name not in done or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(live)
    nodes_now = added + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes_now)


def quantize_activations(proto: onnx.ModelProto, uses: list[WeightUse], scales: dict[str, float]) -> None:
    """Put Clip -> QuantizeLinear -> DequantizeLinear (int8, zero point 0, per tensor) on the
    activation input of every weight op whose layer has a scale in `scales`. QuantizeLinear saturates to [-128, 127]; the Clip to
    [-127 s, 127 s] first gives quantize_model's restricted range [-127, 127]."""
    graph = proto.graph
    qmin, qmax = quantize.qrange(quantize.ACT_BITS, symmetric=True)
    nodes_by_name = {node.name: node for node in graph.node}
    added: set[str] = set()
    before: dict[str, list[onnx.NodeProto]] = {}
    for count, use in enumerate(uses):
        if use.module not in scales:  # a weight used outside its module (F.linear): its input stays float
            continue
        node = nodes_by_name[use.node]
        prefix = f"{use.module}.input"
        scale = np.float32(scales[use.module])
        if prefix not in added:
            graph.initializer.extend([numpy_helper.from_array(scale, f"{prefix}_scale"),
                                      numpy_helper.from_array(_ACT_ZERO_POINT, f"{prefix}_zero_point"),
                                      numpy_helper.from_array(np.float32(qmin * scale), f"{prefix}_min"),
                                      numpy_helper.from_array(np.float32(qmax * scale), f"{prefix}_max")])
            added.add(prefix)
        tag = f"{prefix}_{count}"
        qdq = [f"{prefix}_scale", f"{prefix}_zero_point"]
        before[use.node] = [
            helper.make_node("Clip", [node.input[0], f"{prefix}_min", f"{prefix}_max"], [f"{tag}_clipped"],
                             name=f"{tag}_Clip"),
            helper.make_node("QuantizeLinear", [f"{tag}_clipped", *qdq], [f"{tag}_quantized"],
                             name=f"{tag}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tag}_quantized", *qdq], [f"{tag}_dequantized"],
                             name=f"{tag}_DequantizeLinear"),
        ]
        node.input[0] = f"{tag}_dequantized"
    nodes = [n for node in graph.node for n in [*before.get(node.name, []), node]]
    del graph.node[:]
    graph.node.extend(nodes)
