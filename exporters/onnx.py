"""Export a PyTorch model to ONNX as an explicit-quantization (QDQ) graph.

The graph computes what `exporters.quantize.quantize_model` computes with the same options: the
float model (BatchNorm folded by the same `fold_bn`) is exported with torch's dynamo exporter,
then every Conv/Gemm/MatMul weight becomes an integer initializer read through
DequantizeLinear, with integers, scales and zero points from `quantize_tensor` itself
(`exporters.qdq_graph` places them). With a Calibration (act_bits 8) the activations are quantized
where spec.act_layout says: "onnxruntime" exports the emulation's own traced module, whose
hero::qdq_u8 ops become QuantizeLinear/DequantizeLinear pairs (`exporters.act_layout`), with int32
biases; "tensorrt" puts Clip -> QuantizeLinear -> DequantizeLinear (per tensor, int8, zero point 0)
on each weight op's activation input.

Weight storage: int8/uint8 (symmetric/asymmetric) up to 8 bits, int4/uint4 for bits <= 4 with
int4_storage (opset 21), int16/uint16 for 16 bits (opset 21). fp16=True (float models only)
stores float16 weights and computes in float16; input and output stay float32 via Cast nodes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
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

from exporters import act_layout, matmul_nbits, qdq_graph, quantize
from exporters.device import TOOL_VERSION
from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from exporters.device.runtime import QUANTIZATION_KEY, SOURCE_KEY

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
DEFAULT_OPSET = 18  # the lowest opset torch's dynamo exporter emits
LOW_BIT_OPSET = 21  # first opset with INT4/UINT4 and INT16/UINT16 DequantizeLinear
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


@dataclass(frozen=True)
class ExportOptions:
    """How to write the graph (not how to quantize: that is the QuantSpec). `int4_storage`:
    INT4/UINT4 initializers for bits <= 4 (opset 21); `fp16`: a float16 graph (float models
    only); `opset`: None for the lowest that the storage needs; `metadata`: extra
    metadata_props entries written next to hero.quantization; `matmul_nbits`: block-wise weights at
    <= 4 bits (QuantSpec.block_size) as ONNX Runtime's MatMulNBits (`exporters.matmul_nbits`)."""

    int4_storage: bool = False
    fp16: bool = False
    opset: int | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    matmul_nbits: bool = False

    def __post_init__(self):
        for name in ("int4_storage", "fp16", "matmul_nbits"):
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
    opset = _choose_opset(spec, options.int4_storage, options.opset)
    float_model = quantize.float_copy(model, spec).cpu()
    layer_scales = None
    if spec.integer_activations:  # the emulation's own module, float weights: its QDQ export as Q/DQ pairs
        float_model = act_layout.with_qdq(float_model, calibration)
    elif calibration is not None:  # the same for the residual inputs; Conv/Linear inputs below
        float_model, layer_scales = quantize.with_residual_qdq(float_model, calibration)
    proto = export_float_graph(float_model, input_shape, opset)
    uses = qdq_graph.weight_uses(proto, quantize.exported_weights(model, float_model)) \
        if spec.bits is not None or calibration is not None else []
    if spec.bits is not None:
        codes = quantize.weight_codes(model, spec)
        qdq_graph.quantize_weights(proto, uses, codes, spec, options.int4_storage)
        if spec.integer_activations:
            qdq_graph.quantize_biases(proto, uses, quantize.integer_biases(float_model, codes))
    if layer_scales is not None:
        qdq_graph.quantize_activations(proto, uses, layer_scales)
    if options.matmul_nbits:
        int8_nodes = set()
        if spec.dynamic_blocks:  # int8 compute where the emulation quantizes the input: module calls
            called = quantize.called_layers(float_model, torch.zeros((2, *input_shape)))
            int8_nodes = {use.node for use in uses if use.module in called}
        matmul_nbits.rewrite(proto, int8_nodes)
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
    if options.int4_storage and (spec.bits is None or min(qdq_graph.widths(spec)) > 4):
        raise HeroError(f"int4_storage needs bits <= 4, got bits={spec.bits}: drop int4_storage or lower bits")
    if options.matmul_nbits and spec.block_size is None:
        raise HeroError("matmul_nbits writes block-wise weights: set block_size (e.g. 32) with bits <= 4, "
                        "or drop matmul_nbits")
    if spec.dynamic_blocks and not options.matmul_nbits:
        raise HeroError("block_size with act_bits=8 (int8 activations per block) runs only as MatMulNBits: "
                        "set matmul_nbits (export.matmul_nbits: true), or act_bits null")
    if options.int4_storage and spec.grid == "nested":
        raise HeroError("grid nested stores every width as INT8 codes on the 8-bit scale: drop int4_storage")
    if QUANTIZATION_KEY in options.metadata:
        raise HeroError(f"metadata may not set {QUANTIZATION_KEY}: the exporter writes it")


def _choose_opset(spec: quantize.QuantSpec, int4_storage: bool, opset: int | None) -> int:
    """The requested opset, checked against what the weight storage needs (ONNX operator
    changelog: per-axis DequantizeLinear from 13, INT4/INT16 inputs and blocked scales from 21;
    torch's exporter emits 18 and up)."""
    needs = [what for what, used in (("INT4 weight storage", int4_storage), ("INT16 weight storage", spec.bits == 16),
                                     ("block-wise weights (block_size)", spec.block_size is not None)) if used]
    needed = LOW_BIT_OPSET if needs else DEFAULT_OPSET
    if opset is None:
        return needed
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise HeroError(f"opset must be an integer >= {DEFAULT_OPSET} (torch's ONNX exporter), got {opset!r}")
    if opset < needed:
        raise HeroError(f"{needs[0]} needs opset >= {needed}, got {opset}")
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
        storage = "+".join(sorted({np.dtype(qdq_graph.storage_type(b, spec, options.int4_storage)[1]).name
                                   for b in qdq_graph.widths(spec)}))
    return {"spec": spec.to_dict(), "act_scales": None if calibration is None else dict(calibration.scales),
            "act_zero_points": None if calibration is None or calibration.zero_points is None
            else dict(calibration.zero_points), "weight_storage": storage, "matmul_nbits": options.matmul_nbits,
            "tool_version": TOOL_VERSION}


def read_quantization(metadata: Mapping[str, str], source, checkpoint_sha256: str | None = None
                      ) -> tuple[quantize.QuantSpec, quantize.Calibration | None]:
    """The QuantSpec and Calibration an artifact was exported with, from its hero.quantization
    metadata; an artifact without it (not written by hero-deploy) or with a broken one is a HeroError,
    and so is one whose hero.source_sha256 names another checkpoint than `checkpoint_sha256`."""
    source_sha = metadata.get(SOURCE_KEY)
    if checkpoint_sha256 is not None and source_sha not in (None, checkpoint_sha256):
        raise HeroError(f"{source} was exported from another checkpoint (sha256 {source_sha[:12]}…)")
    if QUANTIZATION_KEY not in metadata:
        raise HeroError(f"{source} has no {QUANTIZATION_KEY} metadata: use artifacts written by hero export or hero run")
    try:
        entry = json.loads(metadata[QUANTIZATION_KEY])
        spec = quantize.QuantSpec.from_dict(entry["spec"])
        scales, zero_points = entry["act_scales"], entry["act_zero_points"]
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
        if q.dtype == np.int32:  # a bias on its accumulator grid (`qdq_graph.quantize_biases`), not a weight
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
