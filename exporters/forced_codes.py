"""Teacher-forced check of an A8 artifact against its emulation: does the graph compute the
emulation, apart from float rounding, even where rounding flips cascade?

End to end, a runtime and the emulation round some activation to different codes wherever float
rounding puts it within a hair of a rounding boundary, and in a deep network that flip moves later
values enough to flip more: on chaotic (e.g. random-weight) networks the logits then part as far as
the activation quantization itself moves them, so no end-to-end tolerance can tell a correct export
from a wrong one (`benchmarks/architecture_coverage.py`, float32 reach). Forcing removes the
cascade: every activation QuantizeLinear of the graph keeps computing its codes, but every consumer
of those codes (its DequantizeLinear) reads the emulation's codes at that point instead, fed as an
extra graph input. Each stretch of float computation between quantization points then starts from
exactly the emulation's values, and each point's codes can differ from the emulation's only where
that one stretch's float rounding crosses a boundary.

Bound (`FORCED_FLIP_RATE`): one stretch's float32 rounding moves its result by about K * 2^-24 of
its magnitude (K terms summed; Higham, Sec. 3.1), some 1e-4 of a quantization step at most here,
so a code differs on about that fraction of elements and by one step. A graph that computes
something else (a weight left float or mis-scaled, a misplaced or mis-scaled activation
quantization) moves most codes of the stretch it is in by a step or more. So: at every point at
most `FORCED_FLIP_RATE` of the codes differ, and none by more than one step.

The artifact runs on ONNX Runtime with graph optimisations off (the graph as written): the forced
graph is the export's arithmetic, not the integer kernels' (their fusions need the Q -> DQ pairs
this rewires). Pairing: the emulation's quantizers (`act_layout.QDQ` and `SymmetricQDQ` modules)
are called in the order the graph's activation QuantizeLinear nodes appear, the export being a
trace of the same module; each pair's scales must agree, or the check refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from exporters import act_layout
from exporters.device.errors import HeroError
from exporters.grid import quantize_with_qparams

FORCED_FLIP_RATE = 1e-2
FORCED_PREFIX = "hero_forced_"


@dataclass(frozen=True)
class PointCodes:
    """One activation quantization point: the graph tensor it quantizes, its element count, how many
    codes differ from the emulation's and the largest difference (in steps)."""

    tensor: str
    elements: int
    differing: int
    max_step: int

    @property
    def rate(self) -> float:
        return self.differing / max(1, self.elements)


@dataclass(frozen=True)
class ForcedComparison:
    points: list[PointCodes]
    logits_max_diff: float  # the forced graph's logits against the emulation's

    @property
    def agrees(self) -> bool:
        return all(p.max_step <= 1 and p.rate <= FORCED_FLIP_RATE for p in self.points)

    @property
    def worst(self) -> PointCodes | None:
        return max(self.points, key=lambda p: (p.max_step > 1, p.rate), default=None)


def emulated_codes(emulation: nn.Module, x: torch.Tensor) -> tuple[list[tuple[float, np.ndarray]], np.ndarray]:
    """The emulation's logits on `x` and, in call order, (scale, codes) at every activation
    quantizer it calls (`act_layout.QDQ`: uint8; `SymmetricQDQ`: int8 on [-127, 127])."""
    calls = []

    def record(module, inputs, _output):
        zero_point = getattr(module, "zero_point", 0)
        qmin, qmax = act_layout.U8 if isinstance(module, act_layout.QDQ) else act_layout.S8
        codes = quantize_with_qparams(inputs[0].detach(), torch.tensor(module.scale, dtype=torch.float32),
                                      torch.tensor(zero_point, dtype=torch.int32), qmin, qmax)
        calls.append((module.scale, codes.numpy().astype(np.uint8 if qmin == 0 else np.int8)))

    hooks = [m.register_forward_hook(record) for m in emulation.modules()
             if isinstance(m, (act_layout.QDQ, act_layout.SymmetricQDQ))]
    try:
        with torch.no_grad():
            logits = emulation(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return calls, logits


def _scalar(graph: onnx.GraphProto, name: str) -> float:
    for init in graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return float(numpy_helper.to_array(helper.get_attribute_value(node.attribute[0])).reshape(-1)[0])
    raise HeroError(f"the scale {name!r} of a QuantizeLinear is neither an initializer nor a Constant")


def activation_quantizers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes, in graph order: weights are stored as codes, so each quantizes an
    activation (or a float Parameter the forward reads as one, e.g. a position embedding)."""
    return [n for n in graph.node if n.op_type == "QuantizeLinear"]


def forced_graph(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """A copy of `proto` whose activation QuantizeLinear outputs are graph outputs and whose readers
    of those outputs read graph inputs FORCED_PREFIX<i> instead; and the quantizers, in order."""
    forced = onnx.ModelProto()
    forced.CopyFrom(proto)
    graph = forced.graph
    quantizers = activation_quantizers(graph)
    renamed = {q.output[0]: f"{FORCED_PREFIX}{i}" for i, q in enumerate(quantizers)}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    for q in quantizers:
        elem = onnx.TensorProto.UINT8 if len(q.input) < 3 else _zero_point_type(graph, q.input[2])
        graph.input.append(helper.make_tensor_value_info(renamed[q.output[0]], elem, None))
        graph.output.append(helper.make_tensor_value_info(q.output[0], elem, None))
    return forced, quantizers


def _zero_point_type(graph: onnx.GraphProto, name: str) -> int:
    for init in graph.initializer:
        if init.name == name:
            return init.data_type
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(name)
    if node is not None and node.op_type == "Cast":
        return helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
    if node is not None and node.op_type == "Constant":
        return helper.get_attribute_value(node.attribute[0]).data_type
    raise HeroError(f"cannot tell the code type of the QuantizeLinear zero point {name!r}")


def forced_comparison(path, emulation: nn.Module, x: np.ndarray) -> ForcedComparison:
    """Run the artifact at `path` forced with `emulation`'s codes on `x` (module docstring) and
    compare every point's codes and the logits with the emulation's."""
    import onnxruntime as ort

    calls, logits = emulated_codes(emulation, torch.from_numpy(x))
    proto = onnx.load(str(path))
    forced, quantizers = forced_graph(proto)
    if len(quantizers) != len(calls):
        raise HeroError(f"{path} has {len(quantizers)} activation QuantizeLinear nodes, the emulation calls "
                        f"{len(calls)} quantizers: cannot pair them")
    for i, (q, (scale, _)) in enumerate(zip(quantizers, calls)):
        if not np.isclose(_scalar(forced.graph, q.input[1]), scale, rtol=1e-6, atol=0):
            raise HeroError(f"quantization point {i} ({q.input[0]!r}) has scale {_scalar(forced.graph, q.input[1]):.6g} "
                            f"in the graph and {scale:.6g} in the emulation: cannot pair them")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(forced.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x, **{f"{FORCED_PREFIX}{i}": codes for i, (_, codes) in enumerate(calls)}}
    names = [session.get_outputs()[0].name] + [q.output[0] for q in quantizers]
    got_logits, *got_codes = session.run(names, feeds)
    points = []
    for q, got, (_, want) in zip(quantizers, got_codes, calls):
        step = np.abs(got.astype(np.int32) - want.astype(np.int32))
        points.append(PointCodes(q.input[0], int(step.size), int((step > 0).sum()), int(step.max(initial=0))))
    return ForcedComparison(points, float(np.abs(got_logits - logits).max()))
