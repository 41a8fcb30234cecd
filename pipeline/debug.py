"""``hero debug ARTIFACT --checkpoint CKPT``: where, layer by layer, an artifact parts from its
PyTorch emulation, and where quantization error builds up.

On the same inputs (the first ``--limit-test`` test samples) three models run, with every
quantized layer's output (every Conv/Linear, exporters.quantize.quantized_layers) exposed:

- the artifact in ONNX Runtime: a modified copy of its graph (the file is never touched) with
  those layers' outputs added as graph outputs, under both optimisation levels the validation
  uses (``default``, weight DequantizeLinear folded on the CPU, and ``disabled``, the literal graph);
- its PyTorch emulation, quantize_model with the spec and activation scales of the artifact's
  hero.quantization metadata, with forward hooks on the same layers;
- the float model in the same form (BatchNorm folded as the spec says, nothing quantized).

Per layer, in graph order: ``sqnr_db`` = 10·log10(Σ f² / Σ (e − f)²) of the emulation's output e
against the float output f (where quantization error accumulates), ``sqnr_runtime_db`` the same
for the runtime's output r, and ``max_abs_diff`` = max |r − e| over both optimisation levels,
consistent by exporters.device.compare's policy (`tolerance`, `layer_consistent`: validate's logit
check applied to one layer's output). `first_divergence` names the first layer beyond it.

ONNX nodes to torch modules. exporters.onnx exports with torch.onnx.export (dynamo); its node
names ("node_Conv_9", "node_linear") say nothing about modules, and the per-node module scopes it
records are stripped from the artifact. The weight input of every Conv/Gemm/MatMul that computes
a quantized layer does name it: exporters.onnx calls a dequantized weight "<module>.weight" (stored
(out, in, ...)) or "<module>.weight_transposed" (a MatMul or Gemm weight stored (in, out)), and a
float graph keeps the parameter's name "<module>.weight" as the initializer's. Where neither name
is there (a float MatMul reading a folded transpose "val_N"; the exporter's fallback when a name
was taken) the node is matched by value: its weight, dequantized, equals the emulation's weight in
the stored layout. The layer's output is the node's, except for a MatMul whose only reader is an
Add of a constant (a Linear on (B, T, D) input exports as MatMul + Add of the bias): the Add's.
A module called k times maps to its k nodes, paired in graph order with the k calls the hooks
see; modules without a node are listed as ``unmapped``.

On a device with exporters/ only (numpy and onnxruntime, no torch, no onnx): not as one command.
The emulation needs torch, and adding graph outputs needs the onnx package. What runs there is the
runtime half: make the instrumented copy on the host (`instrumented_graph`, saved with
onnx.save) and ship it with the inputs; on the device an onnxruntime.InferenceSession on it
returns every layer's output (session.run(None, {"input": x})); bring those back and compare
them on the host against `torch_layer_outputs` with `compare_layers` (numpy only). exporters/device
has no command that does the device half yet.

Schema of ``debug.json``:

- ``artifact``, ``sha256``, ``checkpoint``, ``variant``, ``spec`` (QuantSpec fields),
  ``samples``, ``atol``, ``providers``
- ``layers``: ``[{"module", "call", "node", "op_type", "output", "sqnr_db", "sqnr_runtime_db",
  "max_abs_diff", "max_abs_diff_unoptimized", "tolerance", "consistent"}]`` in graph order
  (SQNR null where not finite: identical outputs, or an all-zero float output)
- ``unmapped``: modules with no node found; ``first_divergence``: null or the first inconsistent row
- ``forced_codes``: null, or for a calibrated A8 artifact ``{"agrees", "points", "flip_rate_bound",
  "worst": {"tensor", "rate", "max_step"}}`` from `exporters.forced_codes` on the first batch: the
  literal graph with every quantization point fed the emulation's codes, so a divergence above that
  comes from rounding flips carried on through the network shows here as agreement
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from exporters.device import compare
from exporters.device import runtime as ort_runtime
from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.forced_codes import FORCED_FLIP_RATE, forced_comparison
from exporters.onnx import read_quantization, weight_initializers
from exporters.quantize import quantize_model, quantized_layers

if TYPE_CHECKING:
    from hero_train.checkpoint import Deployable

DEFAULT_SAMPLES = 256
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


class LayerTap(NamedTuple):
    """Layer `module` (its `call`-th call) is ONNX node `node`, whose tensor `output` is its output."""

    module: str
    call: int
    node: str
    op_type: str
    output: str


@dataclass
class _Stats:
    """Running sums of one layer over the batches: e the emulation's output, f the float model's, r the runtime's."""

    signal: float = 0.0  # Σ f²
    noise: compare.Difference = field(default_factory=compare.Difference)  # e against f
    noise_runtime: compare.Difference = field(default_factory=compare.Difference)  # r (optimised) against f
    runtime: compare.Difference = field(default_factory=compare.Difference)  # r (optimised) against e
    literal: compare.Difference = field(default_factory=compare.Difference)  # r (literal graph) against e


# --------------------------------------------------------------------------- the measures


def sqnr_db(signal_energy: float, noise_energy: float) -> float | None:
    """Signal-to-quantization-noise ratio 10·log10(Σ f² / Σ (q − f)²) in dB of a quantized output q
    against the float one f (the per-layer measure of quantization debuggers such as AIMET's layer
    output analysis and torch.ao.ns); None where it is not finite: identical outputs (no noise)
    or an all-zero float output."""
    if noise_energy == 0.0 or signal_energy == 0.0:
        return None
    return 10.0 * math.log10(signal_energy / noise_energy)


# --------------------------------------------------------------------------- mapping


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _weight_values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float initializer, and every DequantizeLinear output of integer initializers dequantized."""
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    for name, w in weight_initializers(proto).items():
        shape = [1] * w.q.ndim
        if w.axis is not None:
            shape[w.axis] = -1
        shift = w.q.astype(np.float32) - w.zero_point.astype(np.float32).reshape(shape)
        values[name] = shift * w.scale.astype(np.float32).reshape(shape)
    return values


def _matches(stored: np.ndarray, weight: np.ndarray) -> bool:
    """Whether `stored` is `weight` ((out, in, ...)) as an ONNX op stores it, itself or transposed."""
    for layout in (weight, weight.T if weight.ndim == 2 else None):
        if layout is not None and stored.shape == layout.shape and np.allclose(
                stored, layout, rtol=1e-6, atol=compare.tolerance(1e-7, float(np.abs(layout).max()))):
            return True
    return False


def layer_taps(proto: onnx.ModelProto, emulation: torch.nn.Module) -> tuple[list[LayerTap], list[str]]:
    """The taps of `emulation`'s Conv/Linear layers in the graph `proto`, in graph order, and the
    layers left unmapped (see the module docstring for how nodes are matched)."""
    layers = dict(quantized_layers(emulation))
    by_name = {f"{m}.weight": m for m in layers} | {f"{m}.weight_transposed": m for m in layers}
    values = _weight_values(proto)
    readers = _consumers(proto.graph)
    taps, calls = [], dict.fromkeys(layers, 0)
    for node in proto.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        module = by_name.get(weight)
        if module is None and weight in values:
            module = next((m for m, layer in layers.items()
                           if _matches(values[weight], layer.weight.detach().cpu().numpy())), None)
        if module is None:
            continue  # a MatMul of two activations (attention), or a weight of no quantized layer
        output = node.output[0]
        after = readers.get(output, [])
        if node.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add" \
                and any(name in values or name.endswith(".bias") for name in after[0].input if name != output):
            output = after[0].output[0]
        taps.append(LayerTap(module, calls[module], node.name, node.op_type, output))
        calls[module] += 1
    return taps, [m for m, count in calls.items() if count == 0]


def instrumented_graph(proto: onnx.ModelProto, taps: Sequence[LayerTap]) -> onnx.ModelProto:
    """A copy of `proto` whose graph also outputs every tap's tensor (types from ONNX shape inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    present = {o.name for o in out.graph.output}
    for tap in taps:
        if tap.output not in present:
            out.graph.output.append(helper.make_tensor_value_info(tap.output, types.get(tap.output, onnx.TensorProto.FLOAT),
                                                                  None))
            present.add(tap.output)
    return out


# --------------------------------------------------------------------------- running


def _session(model_bytes: bytes, providers: list[str], optimization: str, fold: bool):
    """An ONNX Runtime session configured as exporters.device.runtime.OnnxRuntimeRunner configures
    one (which takes a single output, so it cannot run the instrumented copy itself)."""
    import onnxruntime

    options = ort_runtime.session_options(optimization, fold)
    return onnxruntime.InferenceSession(model_bytes, options, providers=providers)


def torch_layer_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """{(module, call): output} of every Conv/Linear of `model` (eval mode) on `x`, by forward hooks."""
    seen: dict[tuple[str, int], np.ndarray] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def record(_, __, output):
            seen[name, calls.get(name, 0)] = output.detach().float().cpu().numpy()
            calls[name] = calls.get(name, 0) + 1
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in quantized_layers(model)]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def compare_layers(taps: Sequence[LayerTap], runtime: Sequence[dict[str, np.ndarray]],
                   emulated: dict[tuple[str, int], np.ndarray], floating: dict[tuple[str, int], np.ndarray],
                   stats: list[_Stats] | None = None) -> list[_Stats]:
    """Add one batch to each tap's running sums. `runtime` holds the outputs {tensor name: array}
    of the optimised and then the literal session (one run's dict twice where there is one, such
    as a device's); numpy only, so outputs brought back from a device compare the same way."""
    stats = stats or [_Stats() for _ in taps]
    for tap, s in zip(taps, stats):
        e, f = emulated[tap.module, tap.call].astype(np.float64), floating[tap.module, tap.call].astype(np.float64)
        optimised, literal = (r[tap.output].astype(np.float64).reshape(e.shape) for r in runtime)
        s.signal += float((f * f).sum())
        s.noise.add(f, e)
        s.noise_runtime.add(f, optimised)
        s.runtime.add(e, optimised)
        s.literal.add(e, literal)
    return stats


def first_divergence_row(rows: Sequence[dict]) -> dict | None:
    """The first row (graph order) whose runtime output is beyond tolerance, or None."""
    return next((row for row in rows if not row["consistent"]), None)


def debug_artifact(loaded: Deployable, path: Path, x: np.ndarray, *, atol: float = 1e-3, batch_size: int = 64,
                   providers: Sequence[str] | None = None) -> dict:
    """The debug.json dict of the artifact at `path` (exported from `loaded`) on inputs `x`."""
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (math.isfinite(atol) and atol > 0):
        raise HeroError(f"--atol must be a positive number (got {atol!r})")
    if batch_size < 1 or not len(x):
        raise HeroError(f"hero debug needs batch_size >= 1 and at least one sample (got {batch_size}, {len(x)})")
    proto = onnx.load(str(path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    spec, calibration = read_quantization(metadata, path, loaded.sha256)
    emulation = quantize_model(loaded.model, spec, calibration)
    floating = quantize_model(loaded.model, dataclasses.replace(spec, bits=None, act_bits=None, block_size=None))
    taps, unmapped = layer_taps(proto, emulation)
    if not taps:
        raise HeroError(f"{path} has no Conv/Gemm/MatMul that computes a layer of {loaded.path}'s model: "
                        "was it exported from this checkpoint?")
    model_bytes = instrumented_graph(proto, taps).SerializeToString()
    providers = ort_runtime.checked_providers(providers)
    fold = ort_runtime.auto_folds(metadata, providers)
    sessions = [_session(model_bytes, providers, "default", fold), _session(model_bytes, providers, "disabled", False)]
    names = list(dict.fromkeys(tap.output for tap in taps))
    input_name = sessions[0].get_inputs()[0].name
    stats = None
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        runtime = [dict(zip(names, s.run(names, {input_name: batch}))) for s in sessions]
        stats = compare_layers(taps, runtime, torch_layer_outputs(emulation, batch),
                               torch_layer_outputs(floating, batch), stats)
    rows = []
    for tap, s in zip(taps, stats):
        # An A8 layer carries on a rounding flip of the layers before it (README, "Known behaviour").
        noise = s.noise if spec.act_bits is not None else None
        rows.append({**tap._asdict(), "sqnr_db": sqnr_db(s.signal, s.noise.sum_squares),
                     "sqnr_runtime_db": sqnr_db(s.signal, s.noise_runtime.sum_squares),
                     "max_abs_diff": s.runtime.max_abs, "max_abs_diff_unoptimized": s.literal.max_abs,
                     "tolerance": compare.tolerance(atol, s.runtime.reference_max),
                     "consistent": compare.layer_consistent([s.runtime, s.literal], atol, noise)})
    return {"artifact": str(path), "sha256": sha256_file(path), "checkpoint": str(loaded.path),
            "variant": metadata.get(ort_runtime.VARIANT_KEY, Path(path).stem), "spec": spec.to_dict(), "samples": int(len(x)), "atol": atol,
            "providers": list(providers), "layers": rows, "unmapped": unmapped,
            "first_divergence": first_divergence_row(rows), "forced_codes": _forced(path, emulation, spec, x, batch_size)}


def _forced(path: Path, emulation: torch.nn.Module, spec, x: np.ndarray, batch_size: int) -> dict | None:
    """For calibrated A8 artifacts, `exporters.forced_codes` on the first batch: whether the graph
    computes the emulation once rounding flips cannot carry on (what a divergence of the layer rows
    above means on a network that amplifies them), and its worst point."""
    if not spec.calibrated:
        return None
    result = forced_comparison(path, emulation, np.ascontiguousarray(x[:batch_size], dtype=np.float32))
    worst = result.worst
    return {"agrees": result.agrees, "points": len(result.points), "flip_rate_bound": FORCED_FLIP_RATE,
            "worst": None if worst is None else {"tensor": worst.tensor, "rate": worst.rate, "max_step": worst.max_step}}


def first_divergence(loaded: Deployable, path: Path, x: np.ndarray, *, atol: float = 1e-3,
                     providers: Sequence[str] | None = None) -> dict | None:
    """The first layer, in graph order, where the artifact at `path` parts from its emulation on
    `x` beyond tolerance: its debug.json row ("module", "node", "max_abs_diff", "tolerance", ...),
    or None when every layer agrees. What `hero run` can call on a variant marked inconsistent
    (e.g. `first_divergence(loaded, artifact.path, x[:256], atol=v.logit_atol)`)."""
    return debug_artifact(loaded, path, x, atol=atol, providers=providers)["first_divergence"]


# --------------------------------------------------------------------------- report


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def debug_table(result: dict) -> str:
    """The layer rows as a fixed-width text table, the first divergence marked."""
    first = result["first_divergence"]
    lines = [f"{'layer':<28} {'op':<7} {'SQNR emu dB':>11} {'SQNR rt dB':>10} {'max |Δ|':>10} {'tolerance':>10}  ok"]
    for row in result["layers"]:
        name = row["module"] + (f"#{row['call']}" if row["call"] else "")
        mark = "<- first divergence" if row is first else ""
        lines.append(f"{name:<28} {row['op_type']:<7} {_db(row['sqnr_db']):>11} {_db(row['sqnr_runtime_db']):>10} "
                     f"{max(row['max_abs_diff'], row['max_abs_diff_unoptimized']):>10.3g} {row['tolerance']:>10.3g}  "
                     f"{'yes' if row['consistent'] else 'NO'} {mark}".rstrip())
    if result["unmapped"]:
        lines.append(f"not found in the graph: {', '.join(result['unmapped'])}")
    lines.append("runtime and emulation agree on every layer" if first is None else
                 f"first divergence: {first['module']} (ONNX node {first['node']}, max |Δ| "
                 f"{max(first['max_abs_diff'], first['max_abs_diff_unoptimized']):.3g} > {first['tolerance']:.3g})")
    forced = result.get("forced_codes")
    if forced and forced["worst"]:
        worst = forced["worst"]
        lines.append(f"forced codes (every quantization point fed the emulation's codes): "
                     f"{'the graph computes the emulation' if forced['agrees'] else 'the graph computes something else'}; "
                     f"worst of {forced['points']} points {worst['tensor']}: {worst['rate']:.1%} of codes differ, "
                     f"by up to {worst['max_step']} step(s) (bound {forced['flip_rate_bound']:.0%}, 1 step)")
    return "\n".join(lines)
