"""The TensorRT engine contract, checkable without TensorRT: config, sidecar, refit rules.

`exporters.device.tensorrt` does the TensorRT calls; everything here is numpy + stdlib so it is
tested on any machine. The sidecar `<engine>.json` is the engine's contract:

    tensorrt_version, gpu_name, compute_capability   where it may be loaded
    precision, flags {strongly_typed, network,      how it was built (build_flags); network_types:
      precision_from, set, clear}, network_types     the DataType names of the parsed network's tensors
    profile {input, min, opt, max}                   the one optimization profile
    onnx_sha256, timing_cache_reused, created        provenance
    weights {name: {shape, dtype, sha256}} | null    build-time initializers of refittable engines
"""

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from exporters.device.errors import HeroError, unknown_choice

REBUILD_COMMAND = "python -m exporters.device.validate_bundle BUNDLE --runtime tensorrt"
REBUILD_HINT = f"build the engine on this device: `{REBUILD_COMMAND}` builds every engine a bundle needs"
PRECISIONS = ("int8", "fp16", "fp32")
SUPPORTED_MAJORS = (10, 11)
TRT_PIN_HINT = "pip install 'tensorrt>=10,<12'"


@dataclass(frozen=True)
class EngineConfig:
    """What engine to build; exporters.device.tensorrt.build_engine decides how (see its module docstring)."""

    precision: str
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_mb: int = 1024
    refit: bool = False
    strip_weights: bool = False
    timing_cache: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise HeroError(unknown_choice("TensorRT precision", self.precision, PRECISIONS))
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise HeroError(f"batch sizes must satisfy 1 <= min <= opt <= max, got "
                            f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mb <= 0:
            raise HeroError(f"workspace_mb must be positive, got {self.workspace_mb}")


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string, refusing versions hero-deploy does not support."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major not in SUPPORTED_MAJORS:
        raise HeroError(f"TensorRT {version} is not supported; hero-deploy builds engines with TensorRT 10 or 11: "
                        f"{TRT_PIN_HINT}")
    return major


def refit_known_issue(version: str) -> str | None:
    """Why BuilderFlag.REFIT must not be used on this TensorRT version, or None.

    TensorRT 11.3.0 ("Refitting an Engine" and the 11.3.0 release notes, Known Issues): enabling
    kREFIT may give different output than a non-refit engine even when no refit happens, because a
    GEMM bias can be dropped (treated as zero) and is not exposed to the refit API; kREFIT_IDENTICAL
    is unaffected. The 10.16.1 and 11.4.0 editions of that guide carry no such warning (11.0-11.2
    editions not found), so only 11.3.x is refused.
    """
    if str(version).split(".")[:2] == ["11", "3"]:
        return (f"TensorRT {version} has a known issue with BuilderFlag.REFIT (a GEMM bias may be dropped even "
                "without a refit; 11.3.0 release notes, Known Issues), so hero-deploy does not build switchable "
                "engines with it: use TensorRT 11.4+ or 10.x, or build one engine per variant (refit=False)")
    return None


def build_flags(config: EngineConfig, version: str = "10") -> dict:
    """How to build `config` with TensorRT `version`: network typing and flag names (the sidecar's "flags").

    TensorRT 10: "int8" (explicit Q/DQ) is a STRONGLY_TYPED network without precision flags
    ("Explicit Quantization": precision flags are not required and should not be given); "fp16" is
    weakly typed with BuilderFlag.FP16; "fp32" weakly typed. TensorRT 11 removed weak typing
    (BuilderFlag.FP16/INT8/BF16/FP8/INT4/FP4) and ignores the deprecated STRONGLY_TYPED flag: every
    network is strongly typed and its precision is the ONNX types (fp16 = the float16 ONNX written by
    ExportOptions(fp16=True)). "fp32" clears TF32 so the engine matches onnxruntime to float32
    rounding. REFIT only when switching by refit is asked for (refit=True); strip_weights adds
    STRIP_PLAN, plus REFIT_IDENTICAL without refit (NvInfer.h: refitting other weights into it is
    undefined behaviour).
    """
    major = tensorrt_major(version)
    strongly_typed = major >= 11 or config.precision == "int8"
    flags = ["FP16"] if config.precision == "fp16" and major == 10 else []
    if config.refit:
        issue = refit_known_issue(version)
        if issue:
            raise HeroError(issue)
        flags.append("REFIT")
    if config.strip_weights:
        flags += ["STRIP_PLAN"] + ([] if config.refit else ["REFIT_IDENTICAL"])
    return {"strongly_typed": strongly_typed,
            "network": ["STRONGLY_TYPED"] if strongly_typed and major == 10 else [],
            "precision_from": "onnx types" if strongly_typed else "builder flags",
            "set": flags, "clear": ["TF32"] if config.precision == "fp32" else []}


def check_network_precision(precision: str, flags: dict, tensor_types: set[str]) -> None:
    """Refuse a strongly typed network whose tensor types (TensorRT DataType names of its layer
    outputs) are not the precision the sidecar would record: there the types are the precision."""
    if not flags["strongly_typed"]:
        return
    if precision == "int8" and not tensor_types & {"INT8", "INT4", "FP8"}:
        raise HeroError("the ONNX model has no Q/DQ layers, so an int8 engine would run in float: export it "
                        "quantized, or build with precision='fp32'")
    if precision == "fp16" and "HALF" not in tensor_types:
        raise HeroError("TensorRT 11 takes precision from the ONNX types and this model computes in float32: "
                        "export it with ExportOptions(fp16=True) for an fp16 engine, or build with precision='fp32'")
    if precision == "fp32" and "HALF" in tensor_types:
        raise HeroError("the ONNX model computes in float16, so an fp32 engine would run in float16: build it "
                        "with precision='fp16', or export without fp16")


def profile_shapes(input_shape: tuple, config: EngineConfig) -> dict:
    """min/opt/max input shapes of the single optimization profile (only the batch may vary)."""
    batch, rest = int(input_shape[0]), [int(d) for d in input_shape[1:]]
    if any(d <= 0 for d in rest):
        raise HeroError(f"ONNX input shape {list(input_shape)} is dynamic beyond the batch axis; "
                        "export with fixed sample dimensions")
    if batch > 0 and not config.min_batch == config.opt_batch == config.max_batch == batch:
        raise HeroError(f"ONNX input has a fixed batch of {batch}; export it with a dynamic batch axis")
    return {k: [b] + rest for k, b in (("min", config.min_batch), ("opt", config.opt_batch), ("max", config.max_batch))}


def batch_chunks(n: int, max_batch: int) -> list[slice]:
    """Consecutive slices of at most `max_batch` rows covering range(n)."""
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def sidecar_path(engine_path) -> str:
    return os.fspath(engine_path) + ".json"


def read_sidecar(engine_path) -> dict:
    path = sidecar_path(engine_path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HeroError(f"no sidecar {path} next to the engine, so it cannot be checked against this device; "
                        f"{REBUILD_HINT}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise HeroError(f"cannot read engine sidecar {path}: {exc}; {REBUILD_HINT}") from exc


def check_sidecar(sidecar: dict, current: dict) -> None:
    """Raise unless the engine was built by this TensorRT version on this GPU model.

    TensorRT plans are specific to the TensorRT version and GPU they were built with
    (TensorRT support matrix, "Engine Portability").
    """
    keys = (("tensorrt_version", "TensorRT"), ("gpu_name", "GPU"), ("compute_capability", "compute capability"))
    for key, label in keys:
        if sidecar.get(key) != current[key]:
            raise HeroError(f"engine was built with {label} {sidecar.get(key)} but this device has {label} "
                            f"{current[key]}; {REBUILD_HINT}")


def weight_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# TensorRT DataType name of a refit prototype -> the numpy dtype its weights come in. BF16, FP8, FP4
# and E8M0 have no numpy dtype (tensorrt.nptype raises TypeError for them), so they are not refit.
REFIT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                "UINT8": "uint8", "BOOL": "bool", "INT4": "int4"}
INT4_RANGE = (-8, 7)


def _int4_codes(name: str, array: np.ndarray) -> np.ndarray:
    """INT4 weights as int8 codes: an ml_dtypes.int4 array, or int8 codes within [-8, 7]."""
    if array.dtype.name == "int4":
        return array.astype(np.int8)
    if array.dtype != np.int8:
        raise HeroError(f"weight {name!r} is {array.dtype} but the engine stores it as INT4: pass int8 codes "
                        "in [-8, 7] or an ml_dtypes.int4 array")
    if array.size and (array.min() < INT4_RANGE[0] or array.max() > INT4_RANGE[1]):
        raise HeroError(f"weight {name!r} has codes in [{array.min()}, {array.max()}] but the engine stores it as "
                        "INT4, which holds [-8, 7]: requantize it to 4 bits")
    return array


def pack_int4(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    """int8 codes in [-8, 7] packed two per byte, the first element in the low nibble (uint8).

    This is ONNX's INT4 layout, which TensorRT's ONNX parser hands to TensorRT unchanged as
    DataType.kINT4 weights (onnx-tensorrt WeightsContext: INT4 raw data is passed as is); an odd
    count leaves the last high nibble 0.
    """
    nibbles = _int4_codes(name, np.asarray(codes)).reshape(-1).astype(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def check_refit_weights(weights: dict, prototypes: dict, manifest: dict | None, identical_only: bool) -> None:
    """Validate refit weights against the engine before any is handed to TensorRT.

    prototypes: name -> (element count, TensorRT DataType name), as the engine's refitter reports
    them (IRefitter::getWeightsPrototype: new weights need the same count and type). manifest: the
    sidecar's build-time initializers (shape, sha256).
    """
    unknown = sorted(set(weights) - set(prototypes))
    if unknown:
        raise HeroError(f"the engine has no refittable weights named {unknown[:5]}; refit only with a variant "
                        "of the model the engine was built from")
    for name, array in weights.items():
        count, dtype_name = prototypes[name]
        entry = (manifest or {}).get(name)
        if dtype_name not in REFIT_DTYPES:
            raise HeroError(f"the engine stores weight {name!r} as {dtype_name}, which has no numpy type, so it "
                            "cannot be refit from numpy; refit from the ONNX file (refit_from_onnx)")
        if array.size != count:
            raise HeroError(f"weight {name!r} has {array.size} elements but the engine expects {count}")
        if dtype_name == "INT4":
            _int4_codes(name, array)
        elif array.dtype != np.dtype(REFIT_DTYPES[dtype_name]):
            raise HeroError(f"weight {name!r} is {array.dtype} but the engine expects {REFIT_DTYPES[dtype_name]}")
        if entry and list(array.shape) != entry["shape"]:
            raise HeroError(f"weight {name!r} has shape {list(array.shape)} but was {entry['shape']} at build time")
        if identical_only and entry and weight_digest(array) != entry["sha256"]:
            raise HeroError(identical_only_message(f"weight {name!r}"))


def identical_only_message(what: str) -> str:
    return (f"{what} differs from the build-time weights, and this engine was built with REFIT_IDENTICAL "
            "(weight-stripped) so it can only take those; rebuild with EngineConfig(refit=True) to switch variants")


def changed_weights(arrays: dict, manifest: dict) -> list[str]:
    """Build-time initializers (the sidecar manifest) whose values `arrays` change."""
    return sorted(n for n, a in arrays.items() if n in manifest and weight_digest(a) != manifest[n]["sha256"])


def unrefittable_changes(arrays: dict, refittable: set, manifest: dict) -> list[str]:
    """Build-time initializers a variant changes or lacks that the engine cannot refit."""
    changed = [n for n in changed_weights(arrays, manifest) if n not in refittable]
    absent = [n for n in refittable if n in manifest and n not in arrays]
    return sorted(changed + absent)
