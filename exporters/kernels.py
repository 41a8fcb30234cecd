"""How ONNX Runtime ran an artifact: the graph its session executes after optimisation, read back
(SessionOptions.optimized_model_filepath), and which of its weight ops run integer kernels.

A quantized artifact's Conv/Gemm/MatMul either became an integer op (QLinearConv, QGemm, QLinearMatMul,
MatMulInteger, ConvInteger, MatMulIntegerToFloat, MatMulNBits, DynamicQuantizeMatMul) or stayed a
float op (Conv, FusedConv, NhwcFusedConv, Gemm, FusedGemm, MatMul, FusedMatMul) reading dequantized
or folded weights. An artifact laid out for integer kernels (act_layout "onnxruntime") whose weight
op stayed float did not fuse: `integer_lint` names those nodes.

Host side: it needs the onnx package to read the optimised graph back.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from exporters.device import runtime as ort_runtime

INTEGER_OPS, FLOAT_WEIGHT_OPS = ort_runtime.INTEGER_OPS, ort_runtime.FLOAT_WEIGHT_OPS  # one definition, on the device


def optimized_graph(proto: onnx.ModelProto, path, providers=None, threads: int | None = None) -> onnx.ModelProto:
    """The graph an `OnnxRuntimeRunner(path, providers)` session runs (weight_dequant "auto",
    `runtime.auto_folds` on the artifact's metadata), as ONNX Runtime serialises it after optimisation."""
    import onnxruntime

    providers = ort_runtime.checked_providers(providers)
    fold = ort_runtime.auto_folds({p.key: p.value for p in proto.metadata_props}, providers)
    with tempfile.TemporaryDirectory() as scratch:
        options = ort_runtime.session_options("default", fold, threads)
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        options.log_severity_level = 3  # ORT warns that an optimised graph is specific to this machine
        onnxruntime.InferenceSession(str(path), options, providers=providers)
        return onnx.load(options.optimized_model_filepath)


def _weight_ops(proto: onnx.ModelProto) -> set[str]:
    """Names of the Conv/Gemm/MatMul nodes of the artifact that read a quantized weight (the output
    of a DequantizeLinear of an integer initializer)."""
    initializers = {t.name for t in proto.graph.initializer}
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    return {n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and len(n.input) > 1 and n.input[1] in dequantized}


def kernel_summary(path, providers=None, threads: int | None = None) -> dict:
    """{"integer_ops": n, "float_weight_ops": n, "unfused": [node names], "ops": {op type: count}} of the
    session ONNX Runtime builds for `path`: the report's "kernels" entry. `float_weight_ops` counts the
    float Conv/Gemm/MatMul reading a constant or dequantized weight (not a MatMul of two activations,
    as attention's q.k); `unfused` lists the weight
    ops of the artifact (Conv/Gemm/MatMul reading a quantized weight through DequantizeLinear) that
    still run as float ops under their own name (ORT renames the float Conv it moves to its NCHWc
    layout, which only happens to weights it folded: weight-only and tensorrt-layout artifacts)."""
    proto = onnx.load(str(path), load_external_data=False)
    quantized = _weight_ops(proto)
    graph = optimized_graph(proto, path, providers, threads).graph
    ops = Counter(n.op_type for n in graph.node)
    initializers = {t.name for t in graph.initializer}
    constant = initializers | {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    float_weight = [n for n in graph.node if n.op_type in FLOAT_WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constant]
    return {"integer_ops": sum(c for op, c in ops.items() if op in INTEGER_OPS), "float_weight_ops": len(float_weight),
            "unfused": sorted(n.name for n in float_weight if n.name in quantized), "ops": dict(sorted(ops.items()))}


def integer_lint(spec, summary: dict) -> list[str]:
    """Warnings for an artifact meant for integer kernels (act_bits 8, act_layout "onnxruntime") whose
    weight ops did not all fuse, naming them; [] otherwise."""
    if not spec.integer_activations or not summary["unfused"]:
        return []
    names = summary["unfused"]
    return [f"{len(names)} weight op(s) meant for integer kernels run as float ops after ONNX Runtime's "
            f"optimisation: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''} (their Q/DQ pattern "
            "did not fuse: see hero debug, or report the model)"]
