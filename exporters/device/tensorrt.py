"""TensorRT engines: build from ONNX, load only on the device they were built for, run, refit.

Written against the TensorRT 10 Python API. `tensorrt` and `cuda-python` are imported
lazily inside functions so this module imports on any machine; calling into TensorRT
without it raises HeroError with the install hint. numpy and the standard library only:
no torch (a Jetson may have none).

Facts from TensorRT's headers to design around: Q/DQ zero points must be 0 and scales
strictly positive; per-channel scales only for constant weights, activations per-tensor;
INT4 only as weight-only for GEMM, so convolutions below 8 bits run as INT8 codes on the
n-bit grid; refit needs the same weight count and dtype and a refittable engine may have a
single optimization profile; kREFIT_IDENTICAL with kSTRIP_PLAN gives weight-stripped
engines. Whether Q/DQ scales can be refit is not documented: a design where switching
changes only weight values (nested grids, `exporters.nested_grid`: the n-bit scale a
power-of-two multiple of the 8-bit scale) avoids depending on it. `exporters.trt_lint`
checks the Q/DQ rules before a build.

Choices:
- "int8" (explicit Q/DQ graphs) builds a STRONGLY_TYPED network with no precision flag.
  TensorRT 10 docs ("Explicit Quantization"): use explicit quantization with strong
  typing, precision-control build flags are not required and should not be specified;
  BuilderFlag.INT8 serves the deprecated calibrator path and is gone in TensorRT 11. No
  calibrator: the Q/DQ scales are the calibration. Unquantized layers run in float32.
- "fp16": weakly typed network + BuilderFlag.FP16 (TensorRT 10; removed in 11, where the
  build raises HeroError). "fp32": weakly typed with TF32 cleared, so the engine matches
  onnxruntime to float32 rounding.
- One optimization profile over the batch axis (refittable engines allow only one).
- refit=True sets REFIT: any weights of the same count and dtype. strip_weights sets
  STRIP_PLAN plus REFIT_IDENTICAL when refit is False (as fast as a plain engine, but
  NvInfer.h: refitting different weights is undefined behaviour) or plus REFIT when refit
  is True (small plan that can still switch variants).
- A JSON sidecar `<engine>.json` (schema in `exporters.device.trt_contract`) records TensorRT
  version, GPU name, compute capability, flags, profile and the ONNX hash; load_engine
  refuses an engine whose sidecar does not match this device. Refittable engines also
  record each initializer's shape, dtype and sha256, so refit can check shapes, keep
  REFIT_IDENTICAL engines on their build-time weights, and refuse a variant whose
  non-refittable initializers (e.g. Q/DQ scales) differ.
- Device memory and streams use cuda-python (`cuda.bindings.runtime`, older
  `cuda.cudart`), as NVIDIA's TensorRT samples do. refit_from_onnx needs the `onnx`
  package; refit_from_npz needs only numpy.
"""

import json
import os
import sys
from datetime import datetime, timezone

import numpy as np

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file, write_atomic
from exporters.device.trt_contract import (
    REBUILD_HINT,
    EngineConfig,
    batch_chunks,
    build_flags,
    check_refit_weights,
    check_sidecar,
    profile_shapes,
    read_sidecar,
    sidecar_path,
    unrefittable_changes,
    weight_digest,
)

__all__ = ["EngineConfig", "TensorRTRunner", "available", "build_engine", "device_identity", "load_engine",
           "onnx_initializers"]

TRT_INSTALL_HINT = "TensorRT is not installed: pip install 'hero-deploy[tensorrt]' on an NVIDIA machine"
CUDA_INSTALL_HINT = "cuda-python is not installed: pip install cuda-python (the TensorRT runner moves tensors with it)"
_LOGGER = None


def _import_trt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise HeroError(TRT_INSTALL_HINT) from exc
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise HeroError(CUDA_INSTALL_HINT) from exc
    return cudart


def available() -> tuple[bool, str]:
    """(True, TensorRT version) when the TensorRT runner can be used here, else (False, reason)."""
    try:
        trt = _import_trt()
        _import_cudart()
    except HeroError as exc:
        return False, str(exc)
    return True, trt.__version__


def _cuda(cudart, result, what: str):
    """Unpack a cuda-python (error, *values) tuple, raising on any CUDA error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise HeroError(f"CUDA {what} failed ({err}); check the NVIDIA driver and that a GPU is visible")
    return values[0] if len(values) == 1 else values


def device_identity() -> dict:
    """TensorRT version, GPU name and compute capability of the current CUDA device."""
    trt, cudart = _import_trt(), _import_cudart()
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(_cuda(cudart, cudart.cudaGetDevice(), "cudaGetDevice")),
                  "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt_version": trt.__version__, "gpu_name": name.split("\x00")[0].strip(),
            "compute_capability": f"{props.major}.{props.minor}"}


def _logger(trt):
    """One process-wide logger (outlives every builder/runtime/refitter); keeps errors for messages."""
    global _LOGGER
    if _LOGGER is None:
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = []

            def log(self, severity, msg):
                levels = trt.ILogger.Severity
                if severity in (levels.INTERNAL_ERROR, levels.ERROR):
                    self.errors.append(msg)
                if severity in (levels.INTERNAL_ERROR, levels.ERROR, levels.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        _LOGGER = _Logger()
    return _LOGGER


def _builder_flag(trt, name: str):
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise HeroError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; hero-deploy engines are written "
                        "for TensorRT 10: pip install 'tensorrt>=10,<11'")
    return flag


def onnx_initializers(onnx_path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX file as numpy (INT8 codes, scales and float weights alike)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise HeroError("reading weights from ONNX needs the onnx package: pip install onnx "
                        "(or refit from the bundle's .npz with refit_from_npz)") from exc
    model = onnx.load(os.fspath(onnx_path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _weight_manifest(onnx_path) -> dict:
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": weight_digest(a)}
            for name, a in onnx_initializers(onnx_path).items()}


def _set_timing_cache(config, path) -> bool:
    """Load the timing cache at `path` into the builder config; False when starting a fresh one."""
    data = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    if data and cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return True
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


def build_engine(onnx_path, engine_path, config: EngineConfig) -> dict:
    """Parse `onnx_path`, build an engine, write it and its sidecar atomically; return the sidecar."""
    trt = _import_trt()
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    if not os.path.isfile(onnx_path):
        raise HeroError(f"no ONNX model at {onnx_path}; export it first with `hero export`")
    flags, logger = build_flags(config), _logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    typing = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flags["strongly_typed"] else 0
    network = builder.create_network(typing)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HeroError(f"TensorRT could not parse {onnx_path}: {errors} "
                        "(check it with `python -m exporters.trt_lint`)")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise HeroError(f"{onnx_path} has {network.num_inputs} inputs and {network.num_outputs} outputs; "
                        "the TensorRT runner expects one image input and one logits output")
    net_input = network.get_input(0)
    shapes = profile_shapes(tuple(net_input.shape), config)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    for name in flags["set"]:
        builder_config.set_flag(_builder_flag(trt, name))
    for name in flags["clear"]:
        builder_config.clear_flag(_builder_flag(trt, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(net_input.name, shapes["min"], shapes["opt"], shapes["max"])
    builder_config.add_optimization_profile(profile)
    cache_reused = _set_timing_cache(builder_config, config.timing_cache) if config.timing_cache else False
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise HeroError(f"TensorRT could not build an engine from {onnx_path}: {'; '.join(logger.errors[-5:])}")
    if config.timing_cache:
        write_atomic(config.timing_cache, memoryview(builder_config.get_timing_cache().serialize()))
    write_atomic(engine_path, memoryview(serialized))
    sidecar = {
        **device_identity(),
        "precision": config.precision,
        "flags": flags,
        "profile": {"input": net_input.name, **shapes},
        "onnx_sha256": sha256_file(onnx_path),
        "timing_cache_reused": cache_reused,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": _weight_manifest(onnx_path) if config.refit or config.strip_weights else None,
    }
    write_atomic(sidecar_path(engine_path), json.dumps(sidecar, indent=2).encode())
    return sidecar


def load_engine(engine_path):
    """Deserialize an engine after checking its sidecar against this device (before deserializing)."""
    trt = _import_trt()
    if not os.path.isfile(engine_path):
        raise HeroError(f"no TensorRT engine at {engine_path}: {REBUILD_HINT}")
    check_sidecar(read_sidecar(engine_path), device_identity())
    with open(engine_path, "rb") as f:
        data = f.read()
    logger = _logger(trt)
    logger.errors.clear()
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None:
        raise HeroError(f"TensorRT could not deserialize {engine_path} ({'; '.join(logger.errors[-3:])}); "
                        f"{REBUILD_HINT}")
    return engine


class TensorRTRunner:
    """Runs an engine like exporters.device.runtime.OnnxRuntimeRunner: float32 logits for any batch size.

    `input_name` and `input_shape` (one sample's dims) match OnnxRuntimeRunner's; `sidecar`
    is the engine's build record. Device buffers are freed by close() (or `with`).
    """

    def __init__(self, engine_path):
        trt, self._cudart = _import_trt(), _import_cudart()
        self._trt, self._context, self._buffers, self._stream = trt, None, [], None
        self.engine_path = os.fspath(engine_path)
        self._engine = load_engine(self.engine_path)
        self.sidecar = read_sidecar(self.engine_path)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise HeroError(f"engine {engine_path} has tensors {names}; expected one input and one output")
        self._input, self._output = inputs[0], outputs[0]
        min_shape, _, max_shape = self._engine.get_tensor_profile_shape(self._input, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self._max_shape = tuple(int(d) for d in max_shape)
        self.input_name, self.input_shape = self._input, self._max_shape[1:]
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        self._needs_weights = "STRIP_PLAN" in self.sidecar["flags"]["set"]

    def _ensure_context(self) -> None:
        """Create the context and max-batch device buffers once (after any refit of a stripped plan)."""
        if self._context is not None:
            return
        cudart = self._cudart
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise HeroError(f"TensorRT could not create an execution context for {self.engine_path}; "
                            "free GPU memory and retry")
        self._context.set_input_shape(self._input, self._max_shape)
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        tensors = ((self._input, self._max_shape, self._in_dtype), (self._output, out_shape, self._out_dtype))
        for name, shape, dtype in tensors:
            pointer = _cuda(cudart, cudart.cudaMalloc(int(np.prod(shape)) * dtype.itemsize), "cudaMalloc")
            self._buffers.append(pointer)
            self._context.set_tensor_address(name, int(pointer))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        cudart, n = self._cudart, len(chunk)
        if n < self.min_batch:  # the profile cannot run smaller batches: pad, then drop the padding
            chunk = np.concatenate([chunk, np.zeros((self.min_batch - n, *chunk.shape[1:]), chunk.dtype)])
        host_in = np.ascontiguousarray(chunk, dtype=self._in_dtype)
        if not self._context.set_input_shape(self._input, host_in.shape):
            raise HeroError(f"input shape {host_in.shape} is outside the engine profile {self.sidecar['profile']}")
        host_out = np.empty(tuple(self._context.get_tensor_shape(self._output)), self._out_dtype)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(cudart, cudart.cudaMemcpyAsync(self._buffers[0], host_in.ctypes.data, host_in.nbytes, h2d, self._stream),
              "cudaMemcpyAsync")
        if not self._context.execute_async_v3(int(self._stream)):
            raise HeroError(f"TensorRT execution of {self.engine_path} failed; see the [TensorRT] messages above")
        _cuda(cudart, cudart.cudaMemcpyAsync(host_out.ctypes.data, self._buffers[1], host_out.nbytes, d2h, self._stream),
              "cudaMemcpyAsync")
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out[:n].astype(np.float32, copy=False)

    def predict(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """float32 logits for the samples of `x` (any count), run at most `batch_size` (default and
        cap: the profile's max batch) at a time, as OnnxRuntimeRunner.predict does."""
        if self._needs_weights:
            raise HeroError(f"{self.engine_path} is weight-stripped; call refit_from_onnx() or "
                            "refit_from_npz() first")
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            raise HeroError(f"input of shape {x.shape} does not fit the engine input "
                            f"(batch, {', '.join(map(str, self.input_shape))}): reshape or resize the data")
        if len(x) == 0 or (batch_size is not None and batch_size < 1):
            raise HeroError(f"predict needs at least one sample and batch_size >= 1, got {len(x)} and {batch_size}")
        self._ensure_context()
        step = min(batch_size or self.max_batch, self.max_batch)
        return np.concatenate([self._run(x[s]) for s in batch_chunks(len(x), step)])

    def _refitter(self):
        if not {"REFIT", "REFIT_IDENTICAL"} & set(self.sidecar["flags"]["set"]):
            raise HeroError(f"{self.engine_path} was built without refit; rebuild with EngineConfig(refit=True)")
        return self._trt.Refitter(self._engine, _logger(self._trt))

    def _apply(self, refitter, weights: dict) -> None:
        trt = self._trt
        arrays = {name: np.asarray(a) for name, a in weights.items()}
        prototypes = {}
        for name in refitter.get_all_weights():
            proto = refitter.get_weights_prototype(name)
            try:
                dtype = np.dtype(trt.nptype(proto.dtype))
            except TypeError:  # INT4/FP8/BF16 have no numpy dtype: check the count only
                dtype = None
            prototypes[name] = (dtype, int(proto.size))
        identical_only = "REFIT" not in self.sidecar["flags"]["set"]
        check_refit_weights(arrays, prototypes, self.sidecar.get("weights"), identical_only)
        flat = {name: np.ascontiguousarray(a).reshape(-1) for name, a in arrays.items()}  # alive until refit ends
        for name, array in flat.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise HeroError(f"TensorRT rejected refit weights {name!r} (count or type differs from the engine)")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise HeroError(f"refit also needs weights {sorted(missing)[:5]} ({len(missing)} missing); pass every "
                            "weight of the variant")
        if self._stream is not None:
            _cuda(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        if not refitter.refit_cuda_engine():
            raise HeroError(f"TensorRT could not refit {self.engine_path}; see the [TensorRT] messages above")
        self._needs_weights = False

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Replace named weights (same count, dtype and shape as at build time) in the running engine."""
        self._apply(self._refitter(), weights)

    def _refit_from_arrays(self, arrays: dict, source) -> None:
        refitter = self._refitter()
        refittable = set(refitter.get_all_weights())
        blocked = unrefittable_changes(arrays, refittable, self.sidecar.get("weights") or {})
        if blocked:
            raise HeroError(f"{source} changes or lacks {blocked[:5]}, which this engine cannot refit (Q/DQ scales are "
                            "not documented as refittable); export variants on the nested grid so they share scales, "
                            "or build one engine per variant")
        chosen = {name: a for name, a in arrays.items() if name in refittable}
        if not chosen:
            raise HeroError(f"{source} has none of the engine's refittable weights; is it a variant of the same model?")
        self._apply(refitter, chosen)

    def refit_from_onnx(self, onnx_path) -> None:
        """Refit with another variant's initializers (INT8 codes and float weights); needs `onnx`."""
        self._refit_from_arrays(onnx_initializers(onnx_path), onnx_path)

    def refit_from_npz(self, npz_path) -> None:
        """Refit from a bundle's .npz of named weights (numpy only, for devices without `onnx`)."""
        try:
            with np.load(os.fspath(npz_path), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise HeroError(f"cannot read weights from {npz_path}: {exc}") from exc
        self._refit_from_arrays(arrays, npz_path)

    def close(self) -> None:
        """Free device buffers and the stream now (a later predict allocates them again)."""
        cudart = self._cudart
        for pointer in self._buffers:
            cudart.cudaFree(pointer)
        self._buffers = []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_buffers", None):
            self.close()
