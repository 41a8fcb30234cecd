"""TensorRT engines: build from ONNX, load only on the device they were built for, run, refit.

For TensorRT 10 and 11: what differs between them (weak typing, precision flags) is decided by
`exporters.device.trt_contract.build_flags`, and every TensorRT name used here is declared with the
versions it is used on in `exporters.device.trt_api`, which tests/test_trt_api_surface.py checks
against this file and against the real Python bindings. `tensorrt` and `cuda-python` are imported
lazily inside functions so this module imports on any machine; without them, or without a usable
CUDA GPU, every entry point raises a one-line HeroError. numpy and the standard library only: no
torch (a Jetson may have none).

Facts from TensorRT's headers to design around: Q/DQ zero points must be 0 and scales strictly
positive; per-channel scales only for constant weights, activations per-tensor; refit needs the
same weight count and type and a refittable engine may have a single optimization profile;
kREFIT_IDENTICAL with kSTRIP_PLAN gives weight-stripped engines. Whether Q/DQ scales can be refit
is not documented: switching by refit changes only weight values (nested grids,
`exporters.device.nested_grid`), and a variant whose scales differ is refused. `exporters.trt_lint`
checks the Q/DQ rules before a build.

Choices:
- Precision and flags: `build_flags` (explicit Q/DQ, no calibrator: the Q/DQ scales are the
  calibration). Strongly typed networks must have the tensor types the precision names
  (`check_network_precision`); the sidecar records the flags and the parsed network's types.
- One optimization profile over the batch axis (refittable engines allow only one).
- A JSON sidecar `<engine>.json` (schema in `exporters.device.trt_contract`) records TensorRT
  version, GPU, flags, profile and the ONNX hash; load_engine refuses an engine whose sidecar does
  not match this device. Refittable engines also record each initializer's shape, dtype and sha256.
- Refit: refit_from_onnx refits through `trt.OnnxParserRefitter`, which knows the names TensorRT's
  ONNX parser gave to weights it transformed, after checking the variant against the sidecar
  (needs `onnx`); refit/refit_from_npz set named weights by hand, each checked against the
  refitter's prototype (count and type, INT4 packed two per byte) before any is handed over.
- Device memory and streams use cuda-python (`cuda.bindings.runtime`, older `cuda.cudart`), as
  NVIDIA's TensorRT samples do.
"""

import json
import os
from datetime import datetime, timezone

import numpy as np

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file, write_atomic
from exporters.device.trt_api import (
    create,
    enum_member,
    import_tensorrt,
    shared_logger,
    tensor_types,
    to_weights,
)
from exporters.device.trt_contract import (
    REBUILD_HINT,
    EngineConfig,
    batch_chunks,
    build_flags,
    changed_weights,
    check_network_precision,
    check_refit_weights,
    check_sidecar,
    identical_only_message,
    profile_shapes,
    read_sidecar,
    sidecar_path,
    tensorrt_major,
    unrefittable_changes,
    weight_digest,
)

__all__ = ["EngineConfig", "TensorRTRunner", "available", "build_engine", "device_identity", "load_engine",
           "onnx_initializers"]

CUDA_INSTALL_HINT = "cuda-python is not installed: pip install cuda-python (the TensorRT runner moves tensors with it)"


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
    """(True, TensorRT version) when engines can be built and run here, else (False, one-line reason)."""
    try:
        trt = import_tensorrt()
        tensorrt_major(trt.__version__)
        create(trt, trt.Runtime, shared_logger(trt))
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
    trt, cudart = import_tensorrt(), _import_cudart()
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(_cuda(cudart, cudart.cudaGetDevice(), "cudaGetDevice")),
                  "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt_version": trt.__version__, "gpu_name": name.split("\x00")[0].strip(),
            "compute_capability": f"{props.major}.{props.minor}"}


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
    trt = import_tensorrt()
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    if not os.path.isfile(onnx_path):
        raise HeroError(f"no ONNX model at {onnx_path}; export it first with `hero export`")
    flags, logger = build_flags(config, trt.__version__), shared_logger(trt)
    logger.errors.clear()
    builder = create(trt, trt.Builder, logger)
    identity = device_identity()
    creation = 0
    for name in flags["network"]:
        creation |= 1 << int(enum_member(trt, trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(creation)
    parser = create(trt, trt.OnnxParser, network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HeroError(f"TensorRT could not parse {onnx_path}: {errors} "
                        "(check it with `python -m exporters.trt_lint`)")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise HeroError(f"{onnx_path} has {network.num_inputs} inputs and {network.num_outputs} outputs; "
                        "the TensorRT runner expects one image input and one logits output")
    types = tensor_types(network)
    check_network_precision(config.precision, flags, types)
    net_input = network.get_input(0)
    shapes = profile_shapes(tuple(net_input.shape), config)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    for name in flags["set"]:
        builder_config.set_flag(enum_member(trt, trt.BuilderFlag, name))
    for name in flags["clear"]:
        builder_config.clear_flag(enum_member(trt, trt.BuilderFlag, name))
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
        **identity,
        "precision": config.precision,
        "flags": flags,
        "network_types": sorted(types),
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
    trt = import_tensorrt()
    if not os.path.isfile(engine_path):
        raise HeroError(f"no TensorRT engine at {engine_path}: {REBUILD_HINT}")
    logger = shared_logger(trt)
    logger.errors.clear()
    runtime = create(trt, trt.Runtime, logger)
    check_sidecar(read_sidecar(engine_path), device_identity())
    with open(engine_path, "rb") as f:
        data = f.read()
    engine = runtime.deserialize_cuda_engine(data)
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
        trt = import_tensorrt()
        self._trt, self._context, self._buffers, self._stream = trt, None, [], None
        self.engine_path = os.fspath(engine_path)
        self._engine = load_engine(self.engine_path)
        self._cudart = _import_cudart()
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
        self._identical_only = "REFIT" not in self.sidecar["flags"]["set"]

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
        return create(self._trt, self._trt.Refitter, self._engine, shared_logger(self._trt))

    def _check_variant(self, arrays: dict, refittable: set, source) -> None:
        """Refuse a variant that changes or lacks initializers this engine cannot refit."""
        blocked = unrefittable_changes(arrays, refittable, self.sidecar.get("weights") or {})
        if blocked:
            raise HeroError(f"{source} changes or lacks {blocked[:5]}, which this engine cannot refit (Q/DQ scales are "
                            "not documented as refittable); export variants on the nested grid so they share scales, "
                            "or build one engine per variant")

    def _set_weights(self, refitter, arrays: dict) -> None:
        """Check every weight against the refitter's prototype and convert them all, then set them."""
        prototypes = {}
        for name in refitter.get_all_weights():
            proto = refitter.get_weights_prototype(name)
            prototypes[name] = (int(proto.size), proto.dtype.name)
        check_refit_weights(arrays, prototypes, self.sidecar.get("weights"), self._identical_only)
        converted = {name: to_weights(self._trt, name, a, prototypes[name][1]) for name, a in arrays.items()}
        for name, (weights, _buffer) in converted.items():
            if not refitter.set_named_weights(name, weights):
                raise HeroError(f"TensorRT rejected refit weights {name!r} (count or type differs from the engine)")
        self._finish_refit(refitter)

    def _finish_refit(self, refitter) -> None:
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
        self._set_weights(self._refitter(), {name: np.asarray(a) for name, a in weights.items()})

    def refit_from_onnx(self, onnx_path) -> None:
        """Refit with another variant's ONNX file through TensorRT's ONNX parser refitter; needs `onnx`
        to check the variant against the sidecar first."""
        onnx_path, trt = os.fspath(onnx_path), self._trt
        refitter = self._refitter()
        arrays = onnx_initializers(onnx_path)
        self._check_variant(arrays, set(refitter.get_all_weights()), onnx_path)
        changed = changed_weights(arrays, self.sidecar.get("weights") or {})
        if self._identical_only and changed:
            raise HeroError(identical_only_message(f"{onnx_path} ({changed[:3]})"))
        parser = create(trt, trt.OnnxParserRefitter, refitter, shared_logger(trt))
        if not parser.refit_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise HeroError(f"TensorRT could not refit {self.engine_path} from {onnx_path}: {errors}")
        self._finish_refit(refitter)

    def refit_from_npz(self, npz_path) -> None:
        """Refit from a bundle's .npz of named weights (numpy only, for devices without `onnx`)."""
        try:
            with np.load(os.fspath(npz_path), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise HeroError(f"cannot read weights from {npz_path}: {exc}") from exc
        refitter = self._refitter()
        refittable = set(refitter.get_all_weights())
        self._check_variant(arrays, refittable, npz_path)
        chosen = {name: a for name, a in arrays.items() if name in refittable}
        if not chosen:
            raise HeroError(f"{npz_path} has none of the engine's refittable weights; is it a variant of the same model?")
        self._set_weights(refitter, chosen)

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
