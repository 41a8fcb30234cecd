"""The runtimes the benchmarks time, and one session's resident memory measured as on a device.

torch-free on purpose: `python benchmarks/runtimes.py RUNTIME MODEL THREADS C H W` measures one
session in a process that has loaded numpy, the runtime and `exporters.device` only, as a device
does (with torch loaded beside it an int8 ONNX Runtime session's reading grew by half), and prints
the two readings of `session_rss_kib` as JSON. `measure_in_fresh_process` runs it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository root, for `exporters`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters.device import memory  # noqa: E402
from exporters.device.runtime import OnnxRuntimeRunner  # noqa: E402

CPU = ["CPUExecutionProvider"]

Predict = Callable[[np.ndarray], np.ndarray]


def ort_runtime(path: Path) -> Callable[[int | None], Predict]:
    def build(threads):
        runner = OnnxRuntimeRunner(path, CPU, intra_op_threads=threads)
        return lambda x: runner.predict(x, batch_size=len(x))
    return build


def openvino_config(threads: int | None) -> dict:
    """compile_model's config: f32 inference precision and, when given, the thread count."""
    return {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}


def openvino_request(core, path: Path, shape: tuple[int, ...], threads: int | None):
    """One infer request on `path` compiled for the CPU with `shape` (batch included) as a static shape,
    OpenVINO's CPU plugin being fastest on static shapes."""
    model = core.read_model(str(path))
    model.reshape(list(shape))
    return core.compile_model(model, "CPU", openvino_config(threads)).create_infer_request()


def openvino_runtime(path: Path) -> Callable[[int | None], Predict]:
    """OpenVINO with one infer request per batch size, compiled on first use (`openvino_request`)."""
    def build(threads):
        import openvino

        core, requests = openvino.Core(), {}

        def predict(x):
            if len(x) not in requests:
                requests[len(x)] = openvino_request(core, path, x.shape, threads)
            request = requests[len(x)]
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()
        return predict
    return build


RUNTIMES = {"ort": ort_runtime, "ov": openvino_runtime}
RUNTIME_MODULES = {"ort": "onnxruntime", "ov": "openvino"}


def _tiny_conv(path: Path) -> Path:
    """A one-Conv ONNX model (input "input", 1x3x8x8): what `session_rss_kib` warms a runtime up on."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["logits"])], "warm-up",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def session_rss_kib(runtime: str, path: str, threads: int, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """VmRSS increases, in KiB, from before building `runtime`'s session on `path` to (a) the session
    built: its weights as the runtime keeps them (initializers, prepacked copies), and (b) after its
    first batch-1 run, which adds the activation buffers (ORT's arena). Meant for a fresh process
    that has first built and run a session on a one-Conv model (`_tiny_conv`), so the runtime's
    libraries, kernel registry and thread pools are in place (OpenVINO's CPU plugin too) and only
    this model's session and its first run count."""
    importlib.import_module(RUNTIME_MODULES[runtime])
    with tempfile.TemporaryDirectory() as scratch:
        warm = RUNTIMES[runtime](_tiny_conv(Path(scratch) / "tiny.onnx"))(threads)
        warm(np.zeros((1, 3, 8, 8), np.float32))
    before = memory.reading()  # exporters.device.memory: VmRSS after glibc malloc_trim
    predict = RUNTIMES[runtime](Path(path))(threads)
    built = memory.resident_delta_kib(before)
    predict(np.zeros((1, *input_shape), np.float32))
    return built, memory.resident_delta_kib(before)


def measure_in_fresh_process(runtime: str, path, threads: int, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """`session_rss_kib` in a fresh torch-free Python process (this file run as a script)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), runtime, str(path), str(threads),
                           *map(str, input_shape)], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} with {runtime} failed: {done.stderr.strip().splitlines()[-1:]}")
    built, first_run = json.loads(done.stdout.strip().splitlines()[-1])
    return built, first_run


if __name__ == "__main__":
    runtime, model, threads, *shape = sys.argv[1:]
    print(json.dumps(session_rss_kib(runtime, model, int(threads), tuple(int(d) for d in shape))))
