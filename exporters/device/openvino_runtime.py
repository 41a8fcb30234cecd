"""Run an exported ONNX model with OpenVINO, with the interface of `exporters.device.runtime.OnnxRuntimeRunner`.

OpenVINO is optional (`pip install -e '.[openvino]'`): it is imported when a runner is built, and
its absence is a one-line HeroError. The model is read from the ONNX file as exported (dynamic
batch) and compiled once for `device` ("CPU", "GPU", "NPU": OpenVINO's device names).

`inference_precision` sets INFERENCE_PRECISION_HINT, the precision OpenVINO runs float layers in:
"f32" (the default on the CPU) or "bf16" when the user asks for it. Without the hint OpenVINO runs
float layers in bf16 on AMX CPUs (and f16 on GPUs), and the device's accuracy would part from the
host's for a reason that is not the artifact; so f32 is set on the CPU unless bf16 is asked for,
and on another device the hint is set only when asked (None: that device's default). Integer
layers of Q/DQ graphs stay integer either way: the hint applies to float layers (OpenVINO docs,
"Precision Control"). Q/DQ graphs run on OpenVINO's integer kernels where it fuses them
(benchmarks/README.md measures how far they part from the literal graph). numpy and openvino only:
this runs on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.device.errors import HeroError, unknown_choice
from exporters.device.runtime import DEFAULT_BATCH_SIZE

DEFAULT_DEVICE = "CPU"
INFERENCE_PRECISIONS = ("f32", "bf16")
# The runtime graph's layer types that hold a layer's weights (OpenVINO CPU plugin node names): an
# integer kernel when its activation input (input 0) is an integer type (u8/i8), else a float one.
# Not the layer's "runtimePrecision": a FullyConnected on compressed weights (float activations,
# int8/int4 weights decompressed in the kernel) reports the weights' i8 or i4 there.
WEIGHT_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"})
INSTALL_HINT = "openvino is not installed on this machine: pip install openvino (or the hero-deploy extra .[openvino])"


def import_openvino():
    """openvino, imported on first use; its absence is a HeroError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise HeroError(INSTALL_HINT) from None
    return openvino


def compile_config(device: str, intra_op_threads: int | None, inference_precision: str | None = None) -> dict:
    """compile_model's properties: the inference precision (module docstring: f32 on the CPU unless
    `inference_precision` says otherwise) and, when given, the thread count."""
    if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
        raise HeroError(unknown_choice("inference_precision", inference_precision, INFERENCE_PRECISIONS))
    precision = inference_precision or ("f32" if device == "CPU" else None)
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    if intra_op_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(intra_op_threads)
    return config


class OpenVinoRunner:
    """An OpenVINO compiled model and one infer request on one exported model with a single input and
    output. `input_shape` is one sample's shape (a dynamic dim is None), `providers` is [device];
    `inference_precision`: module docstring."""

    def __init__(self, path, device: str = DEFAULT_DEVICE, *, intra_op_threads: int | None = None,
                 inference_precision: str | None = None):
        self.path = Path(path)
        config = compile_config(device, intra_op_threads, inference_precision)
        if not self.path.is_file():
            raise HeroError(f"ONNX model {self.path} does not exist: export it first or fix the path")
        ov = import_openvino()
        core = ov.Core()
        if device not in core.available_devices:
            raise HeroError(f"OpenVINO device {device!r} is not available here: choose one of "
                            f"{', '.join(core.available_devices)}")
        try:
            model = core.read_model(str(self.path))
            self._compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HeroError(f"OpenVINO cannot load {self.path} ({first}): the file is corrupt or not an ONNX "
                            "model this runtime supports; export it again") from None
        inputs, outputs = self._compiled.inputs, self._compiled.outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise HeroError(f"{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                            "the runner needs exactly one of each")
        shape = inputs[0].get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in list(shape)[1:])
        self._request = self._compiled.create_infer_request()
        self.providers = [device]

    def executed_ops(self, x: np.ndarray) -> dict:
        """{"integer", "float", "by_type", "how"}: the compiled model's runtime graph
        (CompiledModel.get_runtime_model), each node's rt_info "layerType" and "runtimePrecision";
        "integer"/"float" count the `WEIGHT_LAYERS` by their activation input's type, "by_type" every
        node as "layerType/runtimePrecision". `x` is unused: the graph is fixed at compilation."""
        ops: dict = {}
        integer = floating = 0
        for node in self._compiled.get_runtime_model().get_ordered_ops():
            info = node.get_rt_info()
            layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            ops[f"{layer}/{precision}"] = ops.get(f"{layer}/{precision}", 0) + 1
            if layer in WEIGHT_LAYERS:
                on_integers = node.get_input_element_type(0).is_integral()
                integer += on_integers
                floating += not on_integers
        return {"integer": integer, "float": floating, "by_type": dict(sorted(ops.items())),
                "how": "OpenVINO runtime graph after compilation: layer types, their runtime precisions and input types"}

    def predict(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 logits for the samples of `x` (any count), run `batch_size` at a time."""
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or any(w is not None and w != g
                                                      for g, w in zip(x.shape[1:], self.input_shape)):
            raise HeroError(f"input of shape {x.shape} does not fit the model input (batch, "
                            f"{', '.join(map(str, self.input_shape))}): reshape or resize the data")
        if len(x) == 0 or batch_size < 1:
            raise HeroError(f"predict needs at least one sample and batch_size >= 1, got {len(x)} and {batch_size}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        chunks = []
        for i in range(0, len(x), batch_size):
            self._request.infer({0: x[i:i + batch_size]})
            chunks.append(self._request.get_output_tensor(0).data.copy())
        return np.concatenate(chunks).astype(np.float32, copy=False)
