"""The TensorRT Python API hero-deploy uses: every name, the major versions it is used on, and the
thin adapters that turn the bindings' raw failures into one-line HeroErrors.

TRT_API is the one list of TensorRT classes, methods, properties and enum members that
`exporters.device` touches, each with the TensorRT major versions the code uses it on;
TRT_KEYWORDS names the keyword arguments passed to them. tests/test_trt_api_surface.py parses
`exporters/device/tensorrt.py` and this file so that a name used there but missing here fails, and
checks the table against the real bindings of TensorRT 10.0, the newest 10.x and 11.x. `tensorrt`
is imported lazily, so this module imports on any machine (numpy and the standard library only).
"""

import sys

import numpy as np

from exporters.device.errors import HeroError
from exporters.device.trt_contract import TRT_PIN_HINT, pack_int4

TRT_INSTALL_HINT = "TensorRT is not installed: pip install 'hero-deploy[tensorrt]' on an NVIDIA machine"
NO_GPU = "no usable CUDA GPU: TensorRT needs an NVIDIA GPU and driver (check nvidia-smi and CUDA_VISIBLE_DEVICES)"

BOTH, TEN = (10, 11), (10,)
TRT_API: dict[str, tuple[int, ...]] = {
    "__version__": BOTH,
    "nptype": BOTH,
    "ILogger": BOTH,
    "ILogger.log": BOTH,
    "ILogger.Severity.INTERNAL_ERROR": BOTH,
    "ILogger.Severity.ERROR": BOTH,
    "ILogger.Severity.WARNING": BOTH,
    "Builder": BOTH,
    "Builder.create_network": BOTH,
    "Builder.create_builder_config": BOTH,
    "Builder.create_optimization_profile": BOTH,
    "Builder.build_serialized_network": BOTH,
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": TEN,  # deprecated and ignored in 11 (always strongly typed)
    "INetworkDefinition.num_inputs": BOTH,
    "INetworkDefinition.num_outputs": BOTH,
    "INetworkDefinition.num_layers": BOTH,
    "INetworkDefinition.get_input": BOTH,
    "INetworkDefinition.get_layer": BOTH,
    "ILayer.num_outputs": BOTH,
    "ILayer.get_output": BOTH,
    "ITensor.name": BOTH,
    "ITensor.shape": BOTH,
    "ITensor.dtype": BOTH,
    "DataType.name": BOTH,
    "OnnxParser": BOTH,
    "OnnxParser.parse_from_file": BOTH,
    "OnnxParser.num_errors": BOTH,
    "OnnxParser.get_error": BOTH,
    "IBuilderConfig.set_memory_pool_limit": BOTH,
    "IBuilderConfig.set_flag": BOTH,
    "IBuilderConfig.clear_flag": BOTH,
    "IBuilderConfig.add_optimization_profile": BOTH,
    "IBuilderConfig.create_timing_cache": BOTH,
    "IBuilderConfig.set_timing_cache": BOTH,
    "IBuilderConfig.get_timing_cache": BOTH,
    "ITimingCache.serialize": BOTH,
    "MemoryPoolType.WORKSPACE": BOTH,
    "BuilderFlag.FP16": TEN,  # removed in 11 with the other weak-typing precision flags
    "BuilderFlag.TF32": BOTH,
    "BuilderFlag.REFIT": BOTH,
    "BuilderFlag.REFIT_IDENTICAL": BOTH,
    "BuilderFlag.STRIP_PLAN": BOTH,
    "IOptimizationProfile.set_shape": BOTH,
    "Runtime": BOTH,
    "Runtime.deserialize_cuda_engine": BOTH,
    "ICudaEngine.num_io_tensors": BOTH,
    "ICudaEngine.get_tensor_name": BOTH,
    "ICudaEngine.get_tensor_mode": BOTH,
    "ICudaEngine.get_tensor_profile_shape": BOTH,
    "ICudaEngine.get_tensor_dtype": BOTH,
    "ICudaEngine.create_execution_context": BOTH,
    "TensorIOMode.INPUT": BOTH,
    "IExecutionContext.set_input_shape": BOTH,
    "IExecutionContext.get_tensor_shape": BOTH,
    "IExecutionContext.set_tensor_address": BOTH,
    "IExecutionContext.execute_async_v3": BOTH,
    "Refitter": BOTH,
    "Refitter.get_all_weights": BOTH,
    "Refitter.get_weights_prototype": BOTH,
    "Refitter.set_named_weights": BOTH,
    "Refitter.get_missing_weights": BOTH,
    "Refitter.refit_cuda_engine": BOTH,
    "OnnxParserRefitter": BOTH,
    "OnnxParserRefitter.refit_from_file": BOTH,
    "OnnxParserRefitter.num_errors": BOTH,
    "OnnxParserRefitter.get_error": BOTH,
    "Weights": BOTH,
    "Weights.size": BOTH,
    "Weights.dtype": BOTH,
    "DataType.FLOAT": BOTH,
    "DataType.HALF": BOTH,
    "DataType.INT8": BOTH,
    "DataType.INT32": BOTH,
    "DataType.INT64": BOTH,
    "DataType.UINT8": BOTH,
    "DataType.BOOL": BOTH,
    "DataType.INT4": BOTH,
}
TRT_KEYWORDS: dict[str, tuple[str, ...]] = {"IBuilderConfig.set_timing_cache": ("ignore_mismatch",)}

_LOGGER = None


def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise HeroError(TRT_INSTALL_HINT) from exc
    return trt


def shared_logger(trt):
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


def create(trt, factory, *args):
    """A TensorRT object from its factory (Builder, Runtime, OnnxParser, Refitter, OnnxParserRefitter).

    Without a usable GPU the C++ factory returns null, which pybind11 raises as TypeError
    ("factory function returned nullptr"); that becomes a one-line HeroError.
    """
    logger = shared_logger(trt)
    try:
        return factory(*args)
    except TypeError as exc:
        if "nullptr" not in str(exc):
            raise
        said = " ".join("; ".join(logger.errors[-2:]).split())
        raise HeroError(f"TensorRT could not create a {factory.__name__}: {NO_GPU}"
                        + (f" (TensorRT said: {said})" if said else "")) from exc


def enum_member(trt, enum, name: str):
    """`enum.name` (a BuilderFlag or NetworkDefinitionCreationFlag that build_flags chose)."""
    member = getattr(enum, name, None)
    if member is None:
        raise HeroError(f"TensorRT {trt.__version__} has no {enum.__name__}.{name}; hero-deploy supports "
                        f"TensorRT 10 and 11: {TRT_PIN_HINT}")
    return member


def tensor_types(network) -> set[str]:
    """DataType names of every layer output of a parsed network (its precision when strongly typed)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return {layer.get_output(j).dtype.name for layer in layers for j in range(layer.num_outputs)}


def to_weights(trt, name: str, array: np.ndarray, dtype_name: str):
    """(tensorrt.Weights, the buffer it points into, which must stay alive until the refit ends).

    tensorrt.Weights(ndarray) takes float32/float16/int8/int32/int64/uint8/bool and raises
    ValueError for other dtypes (float64, ml_dtypes); INT4 weights go in packed by pack_int4.
    """
    if dtype_name == "INT4":
        packed = pack_int4(array, name)
        return trt.Weights(trt.DataType.INT4, packed.ctypes.data, int(array.size)), packed
    buffer = np.ascontiguousarray(array)
    try:
        return trt.Weights(buffer), buffer
    except ValueError as exc:
        raise HeroError(f"weight {name!r} is {array.dtype}, which tensorrt.Weights refuses "
                        f"({' '.join(str(exc).split())}); pass it as the engine stores it ({dtype_name})") from exc
