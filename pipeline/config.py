"""Deploy configs: YAML files validated against a schema (pydantic, unknown keys refused).

A config names a target and what to ship to it::

    name: quickstart
    train: {model: resnet20, dataset: fashion-mnist, optimizer: hero, epochs: 1}   # TrainConfig fields
    quantize: {bits: [8, 6, 4], symmetric: true, per_channel: true, act_bits: null}
    export: {int4_storage: true}
    runtime: {name: onnxruntime, providers: [CPUExecutionProvider]}
    validate: {limit_test: null, batch_size: 256, latency_batch: 64}
    gate: {max_drop: 2.0, min_accuracy: 0.8}
    bundle: {enabled: false, test_samples: 1000}
    target: {device: x86-64 CPU, batch_sizes: [1, 64]}

Every section but ``name`` is optional. A wrong key or type gets a one-line HeroError naming the key
and the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exporters.device.errors import HeroError
from exporters.quantize import SUPPORTED_BITS
from hero_train.train import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class QuantizeSection(_Section):
    bits: list[int] = Field(default_factory=lambda: [8, 6, 5, 4, 3])
    symmetric: bool = True
    per_channel: bool = True
    fold_bn: bool = True
    act_bits: Literal[8] | None = None
    act_method: Literal["max", "percentile"] = "max"
    act_percentile: float = 99.99
    calibration_batches: int = Field(8, ge=1)

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, bits):
        bad = [b for b in bits if b not in SUPPORTED_BITS]
        if bad or not bits:
            raise ValueError(f"bits must be a non-empty list drawn from {list(SUPPORTED_BITS)} (got {bits})")
        return sorted(set(bits), reverse=True)


class ExportSection(_Section):
    int4_storage: bool = True
    fp16_baseline: bool = False
    opset: int | None = None


class RuntimeSection(_Section):
    name: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    providers: list[str] | None = None
    threads: int | None = Field(None, ge=1)


class ValidateSection(_Section):
    limit_test: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    latency_batch: int = Field(64, ge=1)
    latency_repeats: int = Field(10, ge=1)
    unoptimized_samples: int | None = Field(1000, ge=1, description="test samples also run with ORT optimisations off")
    logit_atol: float = Field(1e-3, gt=0)
    min_agreement: float = Field(0.999, ge=0, le=1)


class GateSection(_Section):
    max_drop: float | None = Field(None, ge=0, description="largest accuracy drop from the baseline, points")
    min_accuracy: float | None = Field(None, ge=0, le=1)
    bits: list[int] | None = None


class BundleSection(_Section):
    enabled: bool = False
    test_samples: int | None = Field(1000, ge=1)


class TargetSection(_Section):
    device: str = "x86-64 CPU"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    notes: str | None = None


class DeployConfig(_Section):
    name: str
    train: dict | None = None
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    export: ExportSection = Field(default_factory=ExportSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    validate_: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    gate: GateSection = Field(default_factory=GateSection)
    bundle: BundleSection = Field(default_factory=BundleSection)
    target: TargetSection = Field(default_factory=TargetSection)

    @field_validator("train")
    @classmethod
    def _train_fields(cls, train):
        if train is None:
            return None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
        return train

    def train_config(self) -> TrainConfig | None:
        return None if self.train is None else TrainConfig(**self.train)


def _location(error: dict) -> str:
    parts = [str(p) for p in error["loc"] if p != "validate_"]
    return ".".join(parts).replace("validate_", "validate") or "(top level)"


def load_config(path: str | Path) -> DeployConfig:
    """Read and validate a deploy config; every problem is a one-line HeroError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise HeroError(f"deploy config {path} does not exist (see deploy_configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HeroError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise HeroError(f"{path}: a deploy config is a YAML mapping with at least a 'name' key")
    try:
        config = DeployConfig.model_validate(raw)
        config.train_config()  # TrainConfig's own checks (names, ranges)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        message = message.removeprefix("Value error, ")
        raise HeroError(f"{path}: {_location(first)}: {message}") from None
    except (HeroError, TypeError) as exc:
        raise HeroError(f"{path}: train: {exc}") from None
    return config
