"""Run an exported ONNX model with ONNX Runtime: batched prediction, accuracy and latency; the one
latency timer (`latency_stats`, `median_ms`) and top-1 measure (`top1`) of host and device alike; and
which kernels a session ran (`OnnxRuntimeRunner.executed_ops`, `weight_op_counts`).

Imports numpy and, when a runner is built, onnxruntime only, so it runs on a device without torch;
the timer and `top1` also run where only TensorRT is installed.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from exporters.device.errors import HeroError, unknown_choice
from exporters.device.onnx_metadata import read_metadata

DEFAULT_BATCH_SIZE = 256
QUANTIZATION_KEY = "hero.quantization"  # the exporter's one metadata entry (JSON, see _has_quantized_weights)
SOURCE_KEY = "hero.source_sha256"  # metadata a deploy run adds: the checkpoint's sha256
VARIANT_KEY = "hero.variant"  # ... and the variant's name
_OPTIMIZATION_LEVELS = {"default": "ORT_ENABLE_ALL", "disabled": "ORT_DISABLE_ALL"}  # ort.GraphOptimizationLevel
# ORT rewrites DequantizeLinear -> MatMul into MatMulNBits, which by default (accuracy level 4)
# quantizes the activations to int8 as well and so no longer computes the graph as written;
# level 1 keeps float32 activations (onnxruntime_session_options_config_keys.h).
_MATMUL_NBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")
# ORT keeps DequantizeLinear on constant weights for its QDQ fusions into int8 kernels. Our graphs
# give it none to fuse (weight-only, or activation Q/DQ without a Q on the op output), so the
# dequantization ran on every inference and blocked weight prepacking (about half FP32 speed on
# ResNet20, benchmarks/runtime_speed.py). With QDQ handling off, constant folding turns those DequantizeLinear nodes into float
# initializers, computed by the same DequantizeLinear kernel (onnxruntime_session_options_config_keys.h,
# kOrtSessionOptionsDisableQuantQDQ); activation Q/DQ still run as written.
_DISABLE_QDQ_FUSION = ("session.disable_quant_qdq", "1")
WEIGHT_DEQUANT_MODES = ("auto", "folded", "runtime")
# Folding is measured on the CPU EP only; TensorRT and the NPU EPs read Q/DQ themselves and must see them.
_FOLDING_PROVIDERS = {"CPUExecutionProvider"}
_UNUSABLE_PROVIDERS = ("AzureExecutionProvider",)  # remote inference, not a local device
_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
# A Conv/Gemm/MatMul of a quantized artifact runs either as one of ONNX Runtime's integer kernels
# or as a float kernel on dequantized or folded weights (the same sets as exporters/kernels.py, the
# host's reading of the optimised graph; ORT contrib op names, ContribOperators.md).
INTEGER_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                         "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeMatMul"})
FLOAT_WEIGHT_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


def _run_times(fn, repeats: int, warmup: int) -> list[float]:
    if repeats < 1 or warmup < 0:
        raise HeroError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of `fn()` over `repeats` timed calls, after `warmup` untimed
    ones (the first run allocates and picks kernels). Host and device latency_ms both come from here."""
    return statistics.median(_run_times(fn, repeats, warmup))


def latency_stats(fn, repeats: int, warmup: int = 1) -> dict:
    """{"median_ms", "p99_ms", "repeats"} of `fn()` timed as `median_ms` times it. p99_ms is the 99th
    percentile by linear interpolation between order statistics (numpy.percentile's default), so
    with fewer than 100 repeats it lies between the two slowest runs."""
    times = _run_times(fn, repeats, warmup)
    return {"median_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99)), "repeats": repeats}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of `logits` whose arg-max is the row's label: top-1 accuracy against true
    labels (agreement with another run: exporters.device.compare)."""
    labels = np.asarray(labels)
    if labels.shape != (len(logits),):
        raise HeroError(f"got {len(logits)} predictions but labels of shape {labels.shape}: pass one label per image")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _has_quantized_weights(metadata: dict) -> bool:
    """Whether the artifact's `hero.quantization` metadata (JSON, written by exporters.onnx:
    {"spec": {"bits": int|null, "act_bits": 8|null, "act_layout": ..., "block_size": ..., ...},
    "act_scales": ..., "weight_storage": ..., "matmul_nbits": ..., "tool_version": ...}) says it runs
    float kernels on quantized weights: quantized weights, and activations float or quantized for TensorRT. An artifact laid out for ONNX
    Runtime's integer kernels (act_bits 8, act_layout "onnxruntime") is not: folding its weights would
    stop the QLinearConv fusions it was made for; nor is one with block-wise INT4 weights read through
    DequantizeLinear (block_size, int4 storage, no MatMulNBits written), which ORT fuses into
    MatMulNBits. Absent or unreadable metadata (a foreign artifact): False."""
    try:
        entry = json.loads(metadata[QUANTIZATION_KEY])
        spec, storage, matmul_nbits = entry["spec"], str(entry["weight_storage"]), entry["matmul_nbits"]
        bits, act_bits, layout, block_size = spec["bits"], spec["act_bits"], spec["act_layout"], spec["block_size"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    integer_kernels = (act_bits is not None and layout == "onnxruntime" and block_size is None) or (
        block_size is not None and "int4" in storage.split("+") and not matmul_nbits)
    return isinstance(bits, int) and not isinstance(bits, bool) and not integer_kernels


def _ort():
    """onnxruntime, imported on first use (see the module docstring)."""
    try:
        import onnxruntime
    except ImportError:
        raise HeroError("onnxruntime is not installed on this machine: pip install onnxruntime "
                        "(onnxruntime-gpu for CUDA), or use the tensorrt runtime") from None
    return onnxruntime


def default_providers() -> list[str]:
    """ONNX Runtime's available execution providers in its priority order (TensorRT and CUDA
    before CPU), without the remote Azure provider."""
    return [p for p in _ort().get_available_providers() if p not in _UNUSABLE_PROVIDERS]


def checked_providers(providers) -> list[str]:
    """The requested providers this build of ONNX Runtime has, in the requested order.

    A deploy config names the device's providers in priority order (TensorRT, CUDA, CPU); those a
    build lacks are skipped, as on a host without a GPU. A name ONNX Runtime does not know at all is
    a typo, and an error."""
    if providers is None:
        return default_providers()
    ort = _ort()
    providers = [providers] if isinstance(providers, str) else list(providers)
    unknown = [p for p in providers if p not in ort.get_all_providers()]
    usable = [p for p in providers if p in ort.get_available_providers()]
    if unknown or not usable:
        raise HeroError(f"execution providers {unknown or providers} are not available in this ONNX Runtime: "
                        f"choose from {', '.join(ort.get_available_providers())}")
    return usable


def session_options(optimization: str, fold: bool, intra_op_threads: int | None = None):
    """The SessionOptions every hero session uses: `optimization` "default" or "disabled", MatMulNBits
    on float activations, and (fold) ORT's QDQ handling off so constant weight DequantizeLinear
    folds into float weights. For sessions the runner cannot make (several outputs: pipeline.debug)."""
    if optimization not in _OPTIMIZATION_LEVELS:
        raise HeroError(unknown_choice("optimization", optimization, _OPTIMIZATION_LEVELS))
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[optimization])
    options.add_session_config_entry(*_MATMUL_NBITS_ACCURACY)
    if fold:
        options.add_session_config_entry(*_DISABLE_QDQ_FUSION)
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    return options


def folds_weights(providers: list[str]) -> bool:
    """Whether weight DequantizeLinear is folded at load for these providers (the CPU EP only)."""
    return set(providers) <= _FOLDING_PROVIDERS


def auto_folds(metadata: dict, providers: list[str]) -> bool:
    """weight_dequant "auto" under optimization "default": fold where the artifact's weights are
    quantized for float kernels (`_has_quantized_weights`) and the CPU is the only provider."""
    return _has_quantized_weights(metadata) and folds_weights(providers)


class OnnxRuntimeRunner:
    """An ONNX Runtime session on one exported model with a single input and output.

    `optimization` is "default" (ORT_ENABLE_ALL, ORT's default) or "disabled" (ORT_DISABLE_ALL,
    which runs the literal graph); `providers` default to `default_providers()`.

    `weight_dequant` says how DequantizeLinear on constant weights runs under "default":
    "folded" folds it into float weights when the session is built (ORT's QDQ fusions off),
    "runtime" leaves ORT's QDQ handling on, so it runs every inference unless ORT fuses it into an
    int8 kernel; "auto" folds for hero artifacts whose weights are quantized for float kernels
    (`_has_quantized_weights`: weight-only, or activations quantized for TensorRT) when the CPU is the
    only provider, and is "runtime" otherwise (float, foreign or damaged metadata, and artifacts laid
    out for ONNX Runtime's integer kernels, which then run as QLinearConv/QLinearAdd/QGemm). Either way the outputs equal the literal graph's
    up to float rounding. The attribute `weight_dequant` is the mode the session runs in.

    `input_shape` is one sample's shape (dims without the batch one; a symbolic dim is its name),
    `metadata` the model's metadata_props.
    """

    def __init__(self, path, providers=None, *, optimization: str = "default", intra_op_threads: int | None = None,
                 weight_dequant: str = "auto"):
        self.path = Path(path)
        if optimization not in _OPTIMIZATION_LEVELS:
            raise HeroError(unknown_choice("optimization", optimization, _OPTIMIZATION_LEVELS))
        if weight_dequant not in WEIGHT_DEQUANT_MODES:
            raise HeroError(unknown_choice("weight_dequant", weight_dequant, WEIGHT_DEQUANT_MODES))
        if weight_dequant == "folded" and optimization == "disabled":
            raise HeroError("weight_dequant='folded' needs optimization='default': 'disabled' runs the literal graph")
        if not self.path.is_file():
            raise HeroError(f"ONNX model {self.path} does not exist: export it first or fix the path")
        providers = checked_providers(providers)
        # "auto" decides from the file's metadata, read without a session (exporters.device.onnx_metadata):
        # one session is built, not a folded one and then another (whose leftovers stayed resident).
        fold = weight_dequant == "folded" or (weight_dequant == "auto" and optimization == "default"
                                              and auto_folds(read_metadata(self.path) or {}, providers))
        self._settings = (providers, optimization, intra_op_threads)
        self.session = self._open(providers, optimization, intra_op_threads, fold)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.weight_dequant = "folded" if fold else "runtime"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise HeroError(f"{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                            "the runner needs exactly one of each")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape[1:])
        self.input_dtype = _ELEMENT_TYPES.get(inputs[0].type)
        if self.input_dtype is None:
            raise HeroError(f"{self.path} takes {inputs[0].type} input; the runner feeds float images")
        self.providers = self.session.get_providers()

    def executed_ops(self, x: np.ndarray) -> dict:
        """`weight_op_counts` of the kernels one run of `x` executes, with "how" saying how they were
        read: a second session with this one's options and ONNX Runtime's profiler on
        (SessionOptions.enable_profiling), whose trace (Chrome trace JSON) has one "Node" event per
        kernel run, naming its op ("args.op_name") after graph optimisation. JSON only: no onnx."""
        providers, optimization, threads = self._settings
        with tempfile.TemporaryDirectory() as scratch:
            options = session_options(optimization, self.weight_dequant == "folded", threads)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(scratch, "profile")
            session = self._open(providers, optimization, threads, self.weight_dequant == "folded", options)
            session.run(None, {self.input_name: np.asarray(x[:1]).astype(self.input_dtype, copy=False)})
            with open(session.end_profiling()) as trace:
                events = json.load(trace)
        ops = Counter(e["args"]["op_name"] for e in events if e.get("cat") == "Node"
                      and str(e.get("name", "")).endswith("_kernel_time") and "op_name" in e.get("args", {}))
        return {**weight_op_counts(ops), "how": "ONNX Runtime profiler: the kernels one batch-1 run executed"}

    def _open(self, providers: list[str], optimization: str, intra_op_threads: int | None,
              fold: bool, options=None):
        ort = _ort()
        from onnxruntime.capi import onnxruntime_pybind11_state as errors

        options = options or session_options(optimization, fold, intra_op_threads)
        try:
            return ort.InferenceSession(str(self.path), options, providers=providers)
        except (errors.Fail, errors.InvalidArgument, errors.InvalidGraph, errors.InvalidProtobuf, errors.NoSuchFile,
                errors.NotImplemented, errors.RuntimeException, errors.EPFail) as exc:
            raise HeroError(f"ONNX Runtime cannot load {self.path} ({exc}): the file is corrupt or not an ONNX "
                            "model this runtime supports; export it again") from None

    def predict(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 logits for the samples of `x` (any count), run `batch_size` at a time with x
        cast to the model's input dtype."""
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or not _shape_fits(x.shape[1:], self.input_shape):
            raise HeroError(f"input of shape {x.shape} does not fit the model input (batch, "
                            f"{', '.join(map(str, self.input_shape))}): reshape or resize the data")
        if len(x) == 0 or batch_size < 1:
            raise HeroError(f"predict needs at least one sample and batch_size >= 1, got {len(x)} and {batch_size}")
        x = x.astype(self.input_dtype, copy=False)
        chunks = [self.session.run(None, {self.input_name: x[i:i + batch_size]})[0]
                  for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks).astype(np.float32, copy=False)


def _shape_fits(shape: tuple, expected: tuple) -> bool:
    return all(not isinstance(want, int) or want == got for got, want in zip(shape, expected))


def evaluate_accuracy(runner: OnnxRuntimeRunner, images: np.ndarray, labels: np.ndarray,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[float, np.ndarray]:
    """(top-1 accuracy, logits) of `runner` on labelled images."""
    logits = runner.predict(images, batch_size=batch_size)
    return top1(logits, labels), logits


def weight_op_counts(ops: Counter) -> dict:
    """{"integer": n, "float": n, "by_type": {op: count}} of the kernels an ONNX Runtime session ran:
    how many Conv/Gemm/MatMul-kind kernels ran integer (`INTEGER_OPS`) and how many float
    (`FLOAT_WEIGHT_OPS`), and every kernel by op type."""
    return {"integer": sum(n for op, n in ops.items() if op in INTEGER_OPS),
            "float": sum(n for op, n in ops.items() if op in FLOAT_WEIGHT_OPS),
            "by_type": dict(sorted(ops.items()))}


def time_batches(runner, x: np.ndarray, repeats: int) -> float:
    """`median_ms` of `runner.predict(x)` (any runner: ONNX Runtime, TensorRT, a PrecisionSwitcher)
    over `repeats` runs after one warm-up run: the latency_ms of host and device reports."""
    return median_ms(lambda: runner.predict(x), repeats)
