"""Run an exported ONNX model with OpenVINO, with the interface of `exporters.device.runtime.OnnxRuntimeRunner`.

OpenVINO is optional (`pip install -e '.[openvino]'`): it is imported when a runner is built, and
its absence is a one-line HeroError. The model is read from the ONNX file as exported (dynamic
batch) and compiled once for `device` ("CPU", "GPU", "NPU": OpenVINO's device names), with
INFERENCE_PRECISION_HINT f32 on the CPU: on AMX CPUs OpenVINO would otherwise run float layers in
bf16 and the device's accuracy would part from the host's for a reason that is not the artifact.
Q/DQ graphs run on OpenVINO's integer kernels where it fuses them (benchmarks/README.md measures
how far they part from the literal graph). numpy and openvino only: this runs on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.device.errors import HeroError
from exporters.device.runtime import DEFAULT_BATCH_SIZE

DEFAULT_DEVICE = "CPU"
INSTALL_HINT = "openvino is not installed on this machine: pip install openvino (or the hero-deploy extra .[openvino])"


def import_openvino():
    """openvino, imported on first use; its absence is a HeroError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise HeroError(INSTALL_HINT) from None
    return openvino


def compile_config(device: str, intra_op_threads: int | None) -> dict:
    """compile_model's properties: f32 inference precision on the CPU and, when given, the thread count."""
    config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
    if intra_op_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(intra_op_threads)
    return config


class OpenVinoRunner:
    """An OpenVINO compiled model and one infer request on one exported model with a single input and
    output. `input_shape` is one sample's shape (a dynamic dim is None), `providers` is [device]."""

    def __init__(self, path, device: str = DEFAULT_DEVICE, *, intra_op_threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise HeroError(f"ONNX model {self.path} does not exist: export it first or fix the path")
        ov = import_openvino()
        core = ov.Core()
        if device not in core.available_devices:
            raise HeroError(f"OpenVINO device {device!r} is not available here: choose one of "
                            f"{', '.join(core.available_devices)}")
        try:
            model = core.read_model(str(self.path))
            self._compiled = core.compile_model(model, device, compile_config(device, intra_op_threads))
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
