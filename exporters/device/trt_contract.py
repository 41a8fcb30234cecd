"""The TensorRT engine contract, checkable without TensorRT: config, sidecar, refit rules.

`exporters.device.tensorrt` does the TensorRT calls; everything here is numpy + stdlib so it is
tested on any machine. The sidecar `<engine>.json` is the engine's contract:

    tensorrt_version, gpu_name, compute_capability   where it may be loaded
    precision, flags {strongly_typed, set, clear}    how it was built (build_flags)
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


def build_flags(config: EngineConfig) -> dict:
    """Network typing and BuilderFlag names to set and clear for `config`."""
    flags = {"fp16": ["FP16"], "fp32": [], "int8": []}[config.precision]
    if config.refit:
        flags.append("REFIT")
    if config.strip_weights:
        flags += ["STRIP_PLAN"] + ([] if config.refit else ["REFIT_IDENTICAL"])
    clear = ["TF32"] if config.precision == "fp32" else []
    return {"strongly_typed": config.precision == "int8", "set": flags, "clear": clear}


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


def check_refit_weights(weights: dict, prototypes: dict, manifest: dict | None, identical_only: bool) -> None:
    """Validate refit weights against the engine before touching it.

    prototypes: name -> (numpy dtype or None if numpy has none, element count), as the
    engine reports them (IRefitter::getWeightsPrototype: refit needs the same count and
    type). manifest: the sidecar's build-time initializers (shape, sha256).
    """
    unknown = sorted(set(weights) - set(prototypes))
    if unknown:
        raise HeroError(f"the engine has no refittable weights named {unknown[:5]}; refit only with a variant "
                        "of the model the engine was built from")
    for name, array in weights.items():
        dtype, count = prototypes[name]
        entry = (manifest or {}).get(name)
        if array.size != count:
            raise HeroError(f"weight {name!r} has {array.size} elements but the engine expects {count}")
        if dtype is not None and array.dtype != dtype:
            raise HeroError(f"weight {name!r} is {array.dtype} but the engine expects {dtype}")
        if entry and list(array.shape) != entry["shape"]:
            raise HeroError(f"weight {name!r} has shape {list(array.shape)} but was {entry['shape']} at build time")
        if identical_only and entry and weight_digest(array) != entry["sha256"]:
            raise HeroError(f"weight {name!r} differs from the build-time weights, and this engine was built with "
                            "REFIT_IDENTICAL (weight-stripped) so it can only take those; rebuild with "
                            "EngineConfig(refit=True) to switch variants")


def unrefittable_changes(arrays: dict, refittable: set, manifest: dict) -> list[str]:
    """Build-time initializers a variant changes or lacks that the engine cannot refit."""
    changed = [n for n, a in arrays.items()
               if n not in refittable and n in manifest and weight_digest(a) != manifest[n]["sha256"]]
    absent = [n for n in refittable if n in manifest and n not in arrays]
    return sorted(changed + absent)
