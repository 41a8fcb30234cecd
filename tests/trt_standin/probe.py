"""Run by tests/test_trt_api_surface.py in a subprocess that imports the real TensorRT bindings of one
version over the stand-in native libraries; prints one JSON object of what it found.

- api: for every name in exporters.device.trt_api.TRT_API, whether the bindings have it.
- keywords: for every call in TRT_KEYWORDS, the parameter names of its pybind signatures.
- arities: for every callable name, [fewest, most] positional arguments of each overload.
- nptype: the numpy dtype tensorrt.nptype gives each DataType the refit path maps (or the error).
- weights / raw_weights: what exporters.device.trt_api.to_weights and tensorrt.Weights do with
  refit arrays of each dtype (the bindings' own code, not the native libraries).
- entry_points: the errors available(), build_engine, load_engine and TensorRTRunner give when
  TensorRT cannot start (every factory returns null, as without a GPU).
"""

import inspect
import json
import os
import re
import sys
import tempfile

sys.modules["tensorrt_libs"] = None  # never the real native libraries of an installed TensorRT: the stand-ins

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorrt as trt  # noqa: E402

from exporters.device import tensorrt as trt_module  # noqa: E402
from exporters.device.errors import HeroError  # noqa: E402
from exporters.device.trt_api import TRT_API, TRT_KEYWORDS, to_weights  # noqa: E402
from exporters.device.trt_contract import REFIT_DTYPES, EngineConfig  # noqa: E402


def resolve(name: str):
    value = trt
    for part in name.split("."):
        value = getattr(value, part)
    return value


def has(name: str) -> bool:
    try:
        resolve(name)
    except AttributeError:
        return False
    return True


def parameters(name: str) -> list[str]:
    """Parameter names of every overload in a pybind11 docstring ("f(self: T, a: A, b: B = 1) -> R")."""
    method = name.rsplit(".", 1)[1]
    found = []
    for signature in re.findall(rf"{method}\((.*?)\) ->", resolve(name).__doc__ or ""):
        found += [p.split(":")[0].strip() for p in signature.split(",") if p.strip()]
    return sorted(set(found) - {"self", "*args", "**kwargs"})


def _split(params: str) -> list[str]:
    """Top-level comma split of a signature's parameter list (types may hold commas in brackets)."""
    parts, depth, current = [], 0, ""
    for char in params:
        depth += char in "[(" and 1 or (char in "])" and -1 or 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def arities(name: str) -> list[list[int]]:
    """[fewest, most] positional arguments (without self) of every overload of a callable TensorRT name."""
    value = resolve(name)
    if isinstance(value, property) or not callable(value) or type(value).__name__.endswith("Flag"):
        return []
    method, doc = name.rsplit(".", 1)[-1], value.__doc__ or ""
    if isinstance(value, type):
        method, doc = "__init__", value.__init__.__doc__ or ""
    found = []
    for signature in re.findall(rf"{method}\((.*?)\) ->", doc):
        params = [p for p in _split(signature) if p.split(":")[0].strip() not in ("self", "*args", "**kwargs")]
        found.append([sum("=" not in p for p in params), len(params)])
    if not found and not isinstance(value, type):  # a plain Python function, e.g. nptype
        params = inspect.signature(value).parameters.values()
        found.append([sum(p.default is p.empty for p in params), len(params)])
    return found


def outcome(call):
    try:
        result = call()
    except HeroError as exc:
        return {"hero_error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the point is to report what the bindings raise
        return {"raises": type(exc).__name__, "message": " ".join(str(exc).split())}
    return {"returns": result}


def weights(array, dtype_name):
    made, _buffer = to_weights(trt, "w", array, dtype_name)
    return {"dtype": made.dtype.name, "size": int(made.size)}


def nptype(member):
    try:
        return np.dtype(trt.nptype(getattr(trt.DataType, member))).name
    except TypeError as exc:
        return f"TypeError: {exc}"


def main():
    codes = np.array([1, -2, 3, -4, 5], np.int8)
    arrays = {"float32": np.ones(6, np.float32), "float16": np.ones(6, np.float16), "int8": codes,
              "int32": codes.astype(np.int32), "float64": np.ones(6), "int4": codes.astype(ml_dtypes.int4)}
    expected = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "float64": "FLOAT",
                "int4": "INT4"}
    report = {
        "version": trt.__version__,
        "api": {name: has(name) for name in TRT_API},
        "keywords": {name: parameters(name) for name in TRT_KEYWORDS if has(name)},
        "arities": {name: arities(name) for name in TRT_API if has(name)},
        "nptype": {member: nptype(member) for member in REFIT_DTYPES if member != "INT4"},
        "datatype_names": {member: getattr(trt.DataType, member).name for member in REFIT_DTYPES},
        "weights": {dtype: outcome(lambda a=a, d=expected[dtype]: weights(a, d)) for dtype, a in arrays.items()},
        "int4_as_int8": outcome(lambda: weights(arrays["int4"], "INT8")),
        "raw_weights": {dtype: outcome(lambda a=a: trt.Weights(a).dtype.name) for dtype, a in arrays.items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, engine_path = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "m.engine")
        for path in (onnx_path, engine_path):
            with open(path, "wb") as f:
                f.write(b"placeholder: TensorRT must fail before reading it")
        report["entry_points"] = {
            "available": outcome(trt_module.available),
            "build_engine": outcome(lambda: trt_module.build_engine(onnx_path, engine_path, EngineConfig("int8"))),
            "load_engine": outcome(lambda: trt_module.load_engine(engine_path)),
            "TensorRTRunner": outcome(lambda: trt_module.TensorRTRunner(engine_path)),
        }
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()
