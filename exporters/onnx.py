"""Export a PyTorch model to ONNX as an explicit-quantization (QDQ) graph.

The graph computes what `exporters.quantize.quantize_model` computes with the same options: the
float model (BatchNorm folded by the same `fold_bn`) is exported with torch's dynamo exporter,
then every Conv/Gemm/MatMul weight becomes an integer initializer read through
DequantizeLinear, with integers, scales and zero points from `quantize_tensor` itself. With
a Calibration (act_bits 8) each such op's activation input passes through Clip -> QuantizeLinear ->
DequantizeLinear (per-tensor, int8, zero point 0), the form ONNX Runtime and TensorRT accept.

Weight storage: int8/uint8 (symmetric/asymmetric) up to 8 bits, int4/uint4 for bits <= 4 with
int4_storage (opset 21), int16/uint16 for 16 bits (opset 21). fp16=True (float models only)
stores float16 weights and computes in float16; input and output stay float32 via Cast nodes.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
import copy
import dataclasses
import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules import common as rules
from torch import nn

from exporters import act_layout, quantize
from exporters.device import TOOL_VERSION
from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from exporters.device.runtime import QUANTIZATION_KEY

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
DEFAULT_OPSET = 18  # the lowest opset torch's dynamo exporter emits
LOW_BIT_OPSET = 21  # first opset with INT4/UINT4 and INT16/UINT16 DequantizeLinear
_ACT_ZERO_POINT = np.int8(0)
_CLEANUP_RULES = [
    rules.remove_optional_bias_from_conv_rule,
    rules.remove_optional_bias_from_gemm_rule,
    rules.materialize_reshape_shape_rule,
    rules.no_op_expand_rule,
    rules.no_op_cast_rule,
]


class WeightQuant(NamedTuple):
    """A quantized weight in an exported graph: integers as stored (int4/uint4 widened to
    int8/uint8), scale, zero point and the per-channel axis (None per tensor)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


class _WeightUse(NamedTuple):
    """The ONNX node named `node` reads the weight of torch layer `module` from initializer
    `weight`, whose output channels lie along `axis`."""

    node: str
    module: str
    weight: str
    axis: int


@dataclass(frozen=True)
class ExportOptions:
    """How to write the graph (not how to quantize: that is the QuantSpec). `int4_storage`:
    INT4/UINT4 initializers for bits <= 4 (opset 21); `fp16`: a float16 graph (float models
    only); `opset`: None for the lowest that the storage needs; `metadata`: extra
    metadata_props entries written next to hero.quantization."""

    int4_storage: bool = False
    fp16: bool = False
    opset: int | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("int4_storage", "fp16"):
            if not isinstance(getattr(self, name), bool):
                raise HeroError(f"export option {name} must be true or false, got {getattr(self, name)!r}")


def export_onnx(model: nn.Module, path, spec: quantize.QuantSpec, options: ExportOptions = ExportOptions(),
                calibration: quantize.Calibration | None = None, *, input_shape) -> Path:
    """Write `model` to `path` as ONNX computing `quantize_model(model, spec, calibration)`.

    `input_shape` is one sample's shape (C, H, W); the batch dimension is dynamic ("batch"),
    the input is named "input" and the output "logits". The spec, the activation scales, the
    weight storage and the tool version go into one metadata entry, ``hero.quantization``
    (JSON, read back by `read_quantization`). The file is written atomically. Returns the path.
    """
    if not isinstance(spec, quantize.QuantSpec):
        raise HeroError(f"export_onnx takes a QuantSpec, got {type(spec).__name__}: e.g. QuantSpec(bits=4)")
    quantize.check_calibration(spec, calibration)
    _check_options(spec, options)
    opset = _choose_opset(spec.bits, options.int4_storage, options.opset)
    float_model = (quantize.fold_bn(model) if spec.bn != "keep" else copy.deepcopy(model).eval()).cpu()
    integer_layout = calibration is not None and spec.act_layout == "onnxruntime"
    if integer_layout:  # the emulation's own module, float weights: its QDQ export as Q/DQ pairs
        float_model = act_layout.with_qdq(float_model, calibration)
    proto = export_float_graph(float_model, input_shape, opset)
    uses = _weight_uses(proto, float_model) if spec.bits is not None or calibration is not None else []
    if spec.bits is not None:
        codes = quantize.weight_codes(model, spec)
        _quantize_weights(proto, uses, codes, spec, options.int4_storage)
        if integer_layout:
            _quantize_biases(proto, uses, quantize.integer_biases(float_model, codes))
    if calibration is not None and not integer_layout:
        _quantize_activations(proto, uses, quantize.checked_act_scales(float_model, calibration))
    if options.fp16:
        to_float16(proto)
    _strip_exporter_notes(proto)
    entries = {QUANTIZATION_KEY: json.dumps(_quantization_entry(spec, calibration, options), sort_keys=True),
               **{str(k): str(v) for k, v in options.metadata.items()}}
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return write_atomic(path, proto.SerializeToString())


def _check_options(spec: quantize.QuantSpec, options: ExportOptions) -> None:
    if not isinstance(options, ExportOptions):
        raise HeroError(f"options must be an ExportOptions, got {type(options).__name__}")
    if options.fp16 and (spec.bits is not None or spec.act_bits is not None):
        raise HeroError("fp16 export is for float models: use bits=None and act_bits=None, or fp16=False")
    if options.int4_storage and (spec.bits is None or min(_widths(spec)) > 4):
        raise HeroError(f"int4_storage needs bits <= 4, got bits={spec.bits}: drop int4_storage or lower bits")
    if options.int4_storage and spec.grid == "nested":
        raise HeroError("grid nested stores every width as INT8 codes on the 8-bit scale: drop int4_storage")
    if QUANTIZATION_KEY in options.metadata:
        raise HeroError(f"metadata may not set {QUANTIZATION_KEY}: the exporter writes it")


def _choose_opset(bits: int | None, int4_storage: bool, opset: int | None) -> int:
    """The requested opset, checked against what the weight storage needs (ONNX operator
    changelog: per-axis DequantizeLinear from 13, INT4/INT16 inputs from 21; torch's exporter
    emits 18 and up)."""
    needed = LOW_BIT_OPSET if int4_storage or bits == 16 else DEFAULT_OPSET
    if opset is None:
        return needed
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise HeroError(f"opset must be an integer >= {DEFAULT_OPSET} (torch's ONNX exporter), got {opset!r}")
    if opset < needed:
        raise HeroError(f"{'INT4' if int4_storage else 'INT16'} weight storage needs opset >= {needed}, got {opset}")
    return opset


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter logs a warning per torchvision op it cannot register (torchvision is an
    optional extra here) and a FutureWarning from pytree: noise for our users, not problems."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_float_graph(model: nn.Module, input_shape, opset: int) -> onnx.ModelProto:
    """The float ONNX graph of eval-mode `model` from torch's dynamo exporter, with constants
    folded and weights as initializers named after their parameters. The exporter's own optimizer
    is off because it folds BatchNorm into Conv, which must stay separate when fold_bn is False."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if not shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise HeroError(f"input_shape must be one sample's shape as positive integers, e.g. (3, 32, 32), "
                        f"got {input_shape!r}")
    shape = tuple(int(d) for d in shape)
    example = torch.zeros((2, *shape))  # batch 2: torch.export would specialise a batch of 1
    with torch.no_grad():
        model(example)  # a HeroError from the model reaches the caller as itself, not wrapped by torch.export
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(model, (example,), None, dynamo=True, optimize=False, verbose=False,
                                    opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    custom_translation_table=act_layout.TRANSLATIONS,
                                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},))
    graph = program.model
    optimizer.fold_constants_ir(graph, should_fold=lambda node: True if node.op_type == "Transpose" else None)
    rewriter.rewrite(graph, pattern_rewrite_rules=_CLEANUP_RULES)
    ir.passes.Sequential(ir_passes.RemoveUnusedNodesPass(),
                         ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                         ir_passes.RemoveUnusedNodesPass(), ir_passes.NameFixPass())(graph)
    proto = ir.serde.serialize_model(graph)
    _fold_weight_transposes(proto)
    return proto


def _fold_weight_transposes(proto: onnx.ModelProto) -> None:
    """Replace every Transpose of an initializer by one transposed initializer per (weight,
    perm), shared by all its readers, in place. The constant folder above skips large outputs
    of weights with several readers (a Linear called twice on (B, T, D) input), which would
    leave a MatMul reading a Transpose instead of a weight initializer."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    folded: dict[tuple[str, tuple[int, ...]], str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.input[0] not in initializers:
            kept.append(node)
            continue
        array = numpy_helper.to_array(initializers[node.input[0]])
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), tuple(reversed(range(array.ndim))))
        key = (node.input[0], perm)
        if key not in folded:
            graph.initializer.append(numpy_helper.from_array(np.transpose(array, perm), node.output[0]))
            folded[key] = node.output[0]
        renamed[node.output[0]] = folded[key]
    if not renamed:
        return
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    read = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    unused = {name for name, _ in folded} - read
    live = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(live)
    info = [v for v in graph.value_info if v.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(info)
    del graph.node[:]
    graph.node.extend(kept)


def _output_channel_axis(node: onnx.NodeProto) -> int:
    """Axis of the stored weight that indexes output channels (ONNX operator specs): Conv W is
    (M, C/group, k...) -> 0; Gemm B is (K, N), or (N, K) with transB=1; MatMul B is (K, N) -> 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    return 1


def _stored_layout(weight: torch.Tensor, axis: int) -> np.ndarray:
    """The torch (out, in, ...) weight as the ONNX op stores it (transposed when axis is 1)."""
    array = weight.detach().cpu().numpy()
    return array if axis == 0 else array.T


def _scope_modules(node: onnx.NodeProto) -> list[str]:
    """Module names the dynamo exporter recorded for `node`, innermost first."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
    return list(reversed(ast.literal_eval(scopes)))


def _weight_uses(proto: onnx.ModelProto, model: nn.Module) -> list[_WeightUse]:
    """Every Conv/Gemm/MatMul node whose weight input is the weight of one of `model`'s
    Conv/Linear layers, found by initializer name ("conv1.weight") or by the exporter's module
    scope, and confirmed by value. Raises HeroError if a layer's weight is not found."""
    layers = dict(quantize.quantized_layers(model))
    initializers = {t.name: t for t in proto.graph.initializer}
    uses = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        axis = _output_channel_axis(node)
        stored = numpy_helper.to_array(initializers[node.input[1]])
        for name in [node.input[1].removesuffix(".weight"), *_scope_modules(node)]:
            layer = layers.get(name)
            if layer is not None and (axis == 0 or stored.ndim == 2) \
                    and np.array_equal(stored, _stored_layout(layer.weight, axis)):
                uses.append(_WeightUse(node.name, name, node.input[1], axis))
                break
    missing = sorted(layers.keys() - {use.module for use in uses})
    if missing:
        raise HeroError(f"the exported ONNX graph has no Conv/Gemm/MatMul reading the weights of {missing}; "
                        "this model cannot be exported quantized: export it with bits=None")
    return uses


def _widths(spec: quantize.QuantSpec) -> list[int]:
    return [b for _, b in spec.layer_bits] if spec.layer_bits is not None else [spec.bits]


def _storage_type(bits: int, spec: quantize.QuantSpec, int4_storage: bool) -> tuple[int, type]:
    """(ONNX element type, numpy dtype) holding a layer's `bits`-wide integer grid (`quantize.qrange`):
    INT4 where int4_storage and bits <= 4 on the canonical grid, INT16 for 16 bits, else INT8."""
    if int4_storage and bits <= 4 and spec.grid == "canonical":
        return (TensorProto.INT4, ml_dtypes.int4) if spec.symmetric else (TensorProto.UINT4, ml_dtypes.uint4)
    if bits == 16:
        return (TensorProto.INT16, np.int16) if spec.symmetric else (TensorProto.UINT16, np.uint16)
    return (TensorProto.INT8, np.int8) if spec.symmetric else (TensorProto.UINT8, np.uint8)


def _dequantized_name(use: _WeightUse, taken: set[str]) -> str:
    """"<layer>.weight" ("<layer>.weight_transposed" when stored (in, out)) for the dequantized
    weight, so weights keep readable names after the exporter folded a Transpose into "val_N"."""
    name = f"{use.module}.weight" + ("" if use.axis == 0 else "_transposed")
    return name if name == use.weight or name not in taken else use.weight


def _quantize_weights(proto: onnx.ModelProto, uses: list[_WeightUse], codes: dict[str, quantize.WeightCodes],
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
        _, dtype = _storage_type(layer.bits, spec, int4_storage)
        weight = renamed[use.weight] = dequantized[use.module, use.axis] = _dequantized_name(use, taken)
        taken.add(weight)
        names = [f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"]
        graph.initializer.extend([numpy_helper.from_array(_stored_layout(q, use.axis).astype(dtype), names[0]),
                                  numpy_helper.from_array(scale.numpy().astype(np.float32), names[1]),
                                  numpy_helper.from_array(zero_point.numpy().astype(dtype), names[2])])
        axis_attr = {"axis": use.axis} if scale.dim() else {}  # quantize-first: per channel after the fold
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


def _quantize_biases(proto: onnx.ModelProto, uses: list[_WeightUse],
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


def _quantize_activations(proto: onnx.ModelProto, uses: list[_WeightUse], scales: dict[str, float]) -> None:
    """Put Clip -> QuantizeLinear -> DequantizeLinear (int8, zero point 0, per tensor) on the
    activation input of every weight op. QuantizeLinear saturates to [-128, 127]; the Clip to
    [-127 s, 127 s] first gives quantize_model's restricted range [-127, 127]."""
    graph = proto.graph
    qmin, qmax = quantize.qrange(quantize.ACT_BITS, symmetric=True)
    nodes_by_name = {node.name: node for node in graph.node}
    added: set[str] = set()
    before: dict[str, list[onnx.NodeProto]] = {}
    for count, use in enumerate(uses):
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


def to_float16(proto: onnx.ModelProto) -> None:
    """Make a float graph compute in float16, in place: float32 initializers and Cast targets
    become float16; the graph input and output stay float32 through Cast nodes."""
    graph = proto.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    half_in, half_out = f"{INPUT_NAME}_float16", f"{OUTPUT_NAME}_float16"
    for node in graph.node:
        node.input[:] = [half_in if name == INPUT_NAME else name for name in node.input]
        node.output[:] = [half_out if name == OUTPUT_NAME else name for name in node.output]
    nodes = [helper.make_node("Cast", [INPUT_NAME], [half_in], to=TensorProto.FLOAT16, name="input_to_float16"),
             *graph.node,
             helper.make_node("Cast", [half_out], [OUTPUT_NAME], to=TensorProto.FLOAT, name="logits_to_float32")]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def _strip_exporter_notes(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node notes (module scopes, stack traces with local paths): they
    were only needed to map nodes to layers and would dominate a small model's file."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _quantization_entry(spec: quantize.QuantSpec, calibration, options: ExportOptions) -> dict:
    """The hero.quantization metadata: the spec, the activation scales and how weights are stored."""
    if spec.bits is None:
        storage = "float16" if options.fp16 else "float32"
    else:
        storage = "+".join(sorted({np.dtype(_storage_type(b, spec, options.int4_storage)[1]).name
                                   for b in _widths(spec)}))
    return {"spec": spec.to_dict(), "act_scales": None if calibration is None else dict(calibration.scales),
            "act_zero_points": None if calibration is None or calibration.zero_points is None
            else dict(calibration.zero_points), "weight_storage": storage, "tool_version": TOOL_VERSION}


def read_quantization(metadata: Mapping[str, str], source, checkpoint_sha256: str | None = None
                      ) -> tuple[quantize.QuantSpec, quantize.Calibration | None]:
    """The QuantSpec and Calibration an artifact was exported with, from its hero.quantization
    metadata; an artifact without it (not written by hero-deploy) or with a broken one is a HeroError,
    and so is one whose hero.source_sha256 names another checkpoint than `checkpoint_sha256`."""
    source_sha = metadata.get("hero.source_sha256")
    if checkpoint_sha256 is not None and source_sha not in (None, checkpoint_sha256):
        raise HeroError(f"{source} was exported from another checkpoint (sha256 {source_sha[:12]}…)")
    if QUANTIZATION_KEY not in metadata:
        raise HeroError(f"{source} has no {QUANTIZATION_KEY} metadata: use artifacts written by hero export or hero run")
    try:
        entry = json.loads(metadata[QUANTIZATION_KEY])
        spec = quantize.QuantSpec.from_dict(entry["spec"])
        scales, zero_points = entry["act_scales"], entry.get("act_zero_points")
        for name, value in (("act_scales", scales), ("act_zero_points", zero_points)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} is a {type(value).__name__}, not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise HeroError(f"{source}: its {QUANTIZATION_KEY} metadata is not readable ({exc})") from None
    calibration = None if scales is None else quantize.Calibration(scales, zero_points)
    quantize.check_calibration(spec, calibration)
    return spec, calibration


def weight_initializers(onnx_path_or_model) -> dict[str, WeightQuant]:
    """The quantized weights of an exported graph, keyed by the name of the dequantized tensor
    (the float initializer it replaced, e.g. "conv1.weight"): every DequantizeLinear whose
    integer input is an initializer, int32 biases excepted. A missing zero point reads as zeros (ONNX default)."""
    proto = onnx_path_or_model if isinstance(onnx_path_or_model, onnx.ModelProto) else onnx.load(onnx_path_or_model)
    initializers = {t.name: t for t in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        q = numpy_helper.to_array(initializers[node.input[0]])
        if q.dtype == np.int32:  # a bias on its accumulator grid (`_quantize_biases`), not a weight
            continue
        if q.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
            q = q.astype(np.int8 if q.dtype == ml_dtypes.int4 else np.uint8)
        scale = numpy_helper.to_array(initializers[node.input[1]])
        has_zp = len(node.input) > 2 and node.input[2]
        zero_point = numpy_helper.to_array(initializers[node.input[2]]) if has_zp else np.zeros(scale.shape)
        zero_point = zero_point.astype(q.dtype)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim else None
        found[node.output[0]] = WeightQuant(q, scale, zero_point, axis)
    return found
