"""Block-wise INT4 weights as ONNX Runtime's MatMulNBits, written into the graph (export option).

A block-wise weight (`QuantSpec.block_size`) is exported as standard ONNX: DequantizeLinear-21 with
`block_size` -> MatMul. ONNX Runtime's CPU provider fuses that pattern into its contrib operator
com.microsoft.MatMulNBits when the codes are stored as INT4 (`ExportOptions.int4_storage`) and the
weight is MatMul's B; this rewrite writes the operator itself, for every block-wise layer at 4 bits
or fewer read by MatMul or Gemm (a 2-D Linear), so the kernel does not depend on the runtime's
fusion rules. ONNX Runtime only: TensorRT and OpenVINO read the DequantizeLinear form.

MatMulNBits (onnxruntime/docs/ContribOperators.md): Y = A @ dequantize(B)^T, with B uint8
(N, blocks, block_size / 2), two 4-bit codes per byte, the lower-indexed one in the low nibble;
scales (N * blocks) in A's type; no zero points input, so each code's zero point is 8: a stored
u = q + 8 dequantizes to (u - 8) * scale = q * scale, exactly the emulation's value (codes of a
2- or 3-bit grid are 4-bit codes that use fewer levels). accuracy_level 0: A stays float32, so the
product is the emulation's up to float32 summation order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.device.errors import HeroError

DOMAIN = "com.microsoft"
BITS = 4
_ZERO = 1 << (BITS - 1)  # MatMulNBits' default zero point


def pack(q: np.ndarray, block_size: int) -> np.ndarray:
    """Codes (N, K) on a symmetric grid of at most 4 bits -> MatMulNBits' B, uint8 (N, blocks,
    block_size / 2): u = q + 8, the last block padded with the code of 0, nibbles low-first."""
    n, k = q.shape
    blocks = -(-k // block_size)
    u = np.full((n, blocks * block_size), _ZERO, dtype=np.uint8)
    u[:, :k] = (q.astype(np.int16) + _ZERO).astype(np.uint8)
    u = u.reshape(n, blocks, block_size // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def _fits(codes: np.ndarray) -> bool:
    return codes.size > 0 and -_ZERO <= int(codes.min()) and int(codes.max()) < _ZERO


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def rewrite(proto: onnx.ModelProto, int8_nodes: set[str] = frozenset()) -> int:
    """Replace each MatMul/Gemm that reads a block-wise DequantizeLinear weight whose codes fit 4
    bits ([-8, 7]: a layer at 4 bits or fewer) by MatMulNBits (plus an Add for a Gemm's bias), in
    place; the DequantizeLinear and its initializers go where nothing else reads them. Nodes named
    in `int8_nodes` get accuracy_level 4 (activations quantized to int8 per block, what
    `QuantSpec.dynamic_blocks` emulates), the others 0 (float activations). Returns the number of
    nodes rewritten."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    blocked = {n.output[0]: (n, numpy_helper.to_array(initializers[n.input[0]]).astype(np.int8)) for n in graph.node
               if n.op_type == "DequantizeLinear" and _attr(n, "block_size", 0) and n.input[0] in initializers}
    dequantizers = {name: (dq, codes) for name, (dq, codes) in blocked.items() if _fits(codes)}
    nodes, rewritten = [], 0
    for node in graph.node:
        dq, codes = dequantizers.get(node.input[1], (None, None)) if node.op_type in ("MatMul", "Gemm") \
            and len(node.input) > 1 else (None, None)
        if dq is None or (node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                                      or _attr(node, "beta", 1.0) != 1.0)):
            nodes.append(node)
            continue
        scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32)
        if _attr(dq, "axis", 1) == 0:  # stored (K, N), blocked along K: MatMul's B, Gemm with transB=0
            codes, scale = codes.T, scale.T
        if node.op_type == "Gemm" and _attr(node, "transB", 0) != (_attr(dq, "axis", 1) == 1):
            nodes.append(node)  # a layout this rewrite does not know: the DequantizeLinear form stays
            continue
        block_size = _attr(dq, "block_size", 0)
        n, k = codes.shape
        name = dq.output[0].removesuffix("_transposed")
        graph.initializer.extend([numpy_helper.from_array(pack(codes, block_size), f"{name}_nbits"),
                                  numpy_helper.from_array(np.ascontiguousarray(scale).reshape(-1), f"{name}_nbits_scale")])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = f"{node.output[0]}_nbits" if bias else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{name}_nbits", f"{name}_nbits_scale"], [out],
                                      name=f"{node.name or name}_MatMulNBits", domain=DOMAIN, K=k, N=n, bits=BITS,
                                      block_size=block_size, accuracy_level=4 if node.name in int8_nodes else 0))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name or name}_bias"))
        rewritten += 1
    if not rewritten:
        raise HeroError("matmul_nbits found no block-wise weight of 4 bits or fewer read by a MatMul or Gemm: "
                        "set quantize block_size and bits <= 4, or drop matmul_nbits")
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] in read]
    read = {i for n in nodes for i in n.input}
    live = [t for t in graph.initializer if t.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(live)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewritten
