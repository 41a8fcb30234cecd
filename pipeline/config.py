"""Deploy configs: YAML files validated against a schema (pydantic, unknown keys refused).

A config names what to train or deploy, how to quantize it and the target to ship it to::

    name: quickstart
    model: {name: resnet20}          # or {factory: my_pkg.nets:build, kwargs: {width: 32}}
    data: {dataset: fashion-mnist, root: null, limit_test: 5000}    # or {dataset: path/to/folder_or.npz, image_size: 32}
    train: {optimizer: hero, epochs: 1, h: 1.0, gamma: 0.1}  # the other TrainConfig fields
    quantize: {bits: [8, 6, 4], symmetric: true, per_channel: true, act_bits: null}
    export: {int4_storage: true}
    runtime: {name: onnxruntime, providers: [CPUExecutionProvider]}
    validate: {batch_size: 256, latency_batch: 64}
    gate: {max_drop: 2.0, min_accuracy: 0.8}
    bundle: {enabled: false, test_samples: 1000}
    target: {device: x86-64 CPU, notes: null}

Every section but ``name`` is optional, and each is a typed model handed only to the stages that
read it. A wrong key or type gets a one-line HeroError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from exporters.device.errors import HeroError
from exporters.device.schema import ACT_LAYOUTS, BN_MODES, GRIDS
from exporters.quantize import QuantSpec, check_bits
from hero_train.checkpoint import DataRef, InputSpec
from hero_train.data import check_dataset
from hero_train.models import ModelRef
from hero_train.config import TrainConfig


class _Section(BaseModel):
    """Unknown keys refused; strict types: an int field takes no 256.0 or "256" (a float field still
    takes a YAML int such as ``gamma: 1``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NormalizationSection(_Section):
    mean: list[float]
    std: list[float]


class ModelSection(_Section):
    """The network: a built-in `name`, or your `factory` "package.module:function" with `kwargs`
    (imported from the working directory and PYTHONPATH). `input_shape` [C, H, W],
    `normalization` and `classes` describe the input of a plain state_dict checkpoint when no data
    section says it."""

    name: str | None = None
    factory: str | None = None
    kwargs: dict = Field(default_factory=dict)
    input_shape: list[Annotated[int, Field(ge=1)]] | None = None
    normalization: NormalizationSection | None = None
    classes: list[str] | None = None

    @model_validator(mode="after")
    def _valid(self):
        try:
            self.ref()
        except HeroError as exc:
            raise ValueError(str(exc)) from None
        return self

    def ref(self) -> ModelRef:
        """The ModelRef this section names (resnet20 when it names none)."""
        if self.name is None and self.factory is None:
            return ModelRef(name="resnet20", kwargs=self.kwargs)
        return ModelRef(name=self.name, factory=self.factory, kwargs=self.kwargs)

    def named(self) -> ModelRef | None:
        """The model the user named, or None when the section names none (a checkpoint then says it)."""
        return None if self.name is None and self.factory is None else self.ref()

    def described_input(self) -> InputSpec | None:
        """The input this section describes (for a plain state_dict), or None when it does not say all of it."""
        if None in (self.input_shape, self.normalization, self.classes):
            return None
        return InputSpec(tuple(self.input_shape), tuple(self.normalization.mean), tuple(self.normalization.std),
                         tuple(self.classes))


class DataSection(_Section):
    """The dataset (a built-in name, an image folder or an .npz), where a built-in one's files are
    (None: $HERO_DATA, the system and cache folders), your images' `channels` and `image_size`, and
    how many training and test samples are used (None: all)."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    channels: Literal[1, 3] | None = None
    image_size: int | None = Field(None, ge=8)
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)

    @field_validator("dataset")
    @classmethod
    def _exists(cls, dataset):
        try:
            check_dataset(dataset)
        except HeroError as exc:
            raise ValueError(str(exc)) from None
        return dataset

    def ref(self) -> DataRef:
        """Where the data is; the dataset only when the config sets it (the default replaces no
        checkpoint's own)."""
        dataset = self.dataset if "dataset" in self.model_fields_set else None
        return DataRef(dataset, self.root, self.channels, self.image_size)


# TrainConfig's fields that the model and data sections say.
_MODEL_DATA_FIELDS = {"model": ("model", "name"), "model_kwargs": ("model", "kwargs"), "dataset": ("data", "dataset"),
                      "data_root": ("data", "root"), "channels": ("data", "channels"),
                      "image_size": ("data", "image_size"), "limit_train": ("data", "limit_train"),
                      "limit_test": ("data", "limit_test")}


def _train_section() -> type[_Section]:
    """The train section: every TrainConfig field but those of the model and data sections, with
    TrainConfig's own types and defaults (one place for each default)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(TrainConfig)
              if f.name not in _MODEL_DATA_FIELDS}
    return create_model("TrainSection", __base__=_Section, **fields)


TrainSection = _train_section()


class MixedBudget(_Section):
    """Exactly one of: the average weight bits, or the packed weight size in KiB."""
    average_bits: float | None = Field(None, gt=0, allow_inf_nan=False)
    weight_kib: float | None = Field(None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self):
        if (self.average_bits is None) == (self.weight_kib is None):
            raise ValueError("give exactly one of average_bits and weight_kib")
        return self

    def as_dict(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class MixedSection(_Section):
    """A mixed-precision variant: each layer's width from `candidates`, minimising the summed cost
    (HAWQ-V3's Ω from the Hessian, or the measured loss increase) under `budget` (pipeline.mixed)."""
    candidates: list[int] = Field(default_factory=lambda: [8, 6, 4, 3])
    budget: MixedBudget
    objective: Literal["hessian", "measured"] = "hessian"
    keep_8bit: list[str] = Field(default_factory=list)
    batches: int = Field(4, ge=1, description="training batches of 128 the costs are measured on")
    hessian_samples: int = Field(16, ge=1, description="Hutchinson probes (one over all layers each)")

    @field_validator("candidates")
    @classmethod
    def _known(cls, bits):
        try:
            checked = sorted({check_bits(b) for b in bits}, reverse=True)
        except HeroError as exc:
            raise ValueError(str(exc)) from None
        if not checked or checked[0] > 8:
            raise ValueError("candidates must be a non-empty list of widths <= 8")
        return checked


class QuantizeSection(_Section):
    bits: list[int] = Field(default_factory=lambda: [8, 6, 5, 4, 3])
    symmetric: bool = True
    per_channel: bool = True
    bn: Literal[BN_MODES] = BN_MODES[0]
    grid: Literal[GRIDS] = GRIDS[0]
    act_bits: Literal[8] | None = None
    act_method: Literal["max", "percentile", "mse"] = "max"
    act_percentile: float = 99.99
    act_layout: Literal[ACT_LAYOUTS] | None = Field(
        None, description="where 8-bit activations are quantized; default: the runtime section's name")
    calibration_batches: int = Field(8, ge=1)
    block_size: int | None = Field(None, description="Linear weights per block of this many inputs (INT4 GEMM, "
                                                     "MatMulNBits); a power of two >= 16")
    mixed: MixedSection | None = None

    @model_validator(mode="after")
    def _scheme(self):
        try:
            for bits in self.bits:
                self.spec(bits)
        except HeroError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, bits):
        if not bits:
            raise ValueError("bits must be a non-empty list of weight bit widths")
        try:
            checked = [check_bits(b) for b in bits]
        except HeroError as exc:
            raise ValueError(str(exc)) from None
        return sorted(set(checked), reverse=True)

    def spec(self, bits: int | None, layer_bits: dict[str, int] | None = None) -> QuantSpec:
        """The QuantSpec of one precision of this section (bits None: the float baseline; layer_bits:
        the mixed variant's widths)."""
        quantized = bits is not None or layer_bits is not None
        return QuantSpec(bits=bits, symmetric=self.symmetric, per_channel=self.per_channel, bn=self.bn,
                         grid=self.grid if quantized else GRIDS[0], layer_bits=layer_bits,
                         act_bits=self.act_bits if quantized else None, act_method=self.act_method,
                         act_percentile=self.act_percentile, act_layout=self.act_layout or "onnxruntime",
                         block_size=self.block_size if quantized else None)


class ExportSection(_Section):
    int4_storage: bool = True
    fp16_baseline: bool = False
    opset: int | None = None
    matmul_nbits: bool = Field(False, description="block-wise weights at <= 4 bits as ONNX Runtime's MatMulNBits "
                                                  "(needs quantize.block_size; ONNX Runtime only)")


class RuntimeSection(_Section):
    name: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    providers: list[str] | None = None
    threads: int | None = Field(None, ge=1)


class ValidateSection(_Section):
    batch_size: int = Field(256, ge=1)
    latency_batch: int = Field(64, ge=1)
    latency_repeats: int = Field(10, ge=1)
    unoptimized_samples: int | None = Field(1000, ge=1, description="test samples also run with ORT optimisations off")
    logit_atol: float = Field(1e-3, gt=0)
    min_agreement: float = Field(0.999, ge=0, le=1)


class GateSection(_Section):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # refused at load, not after the work
    max_drop: float | None = Field(None, ge=0, description="largest accuracy drop from the baseline, points")
    min_accuracy: float | None = Field(None, ge=0, le=1)
    bits: list[int] | None = None


class BundleSection(_Section):
    enabled: bool = False
    test_samples: int | None = Field(1000, ge=1)


class TargetSection(_Section):
    device: str = "x86-64 CPU"
    notes: str | None = None


class DeployConfig(_Section):
    name: str
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection | None = None
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    export: ExportSection = Field(default_factory=ExportSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    validate_: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    gate: GateSection = Field(default_factory=GateSection)
    bundle: BundleSection = Field(default_factory=BundleSection)
    target: TargetSection = Field(default_factory=TargetSection)

    @model_validator(mode="after")
    def _layout_follows_the_runtime(self):
        """The target decides where activations are quantized: quantize.act_layout defaults to runtime.name."""
        if self.quantize.act_layout is None:
            self.quantize.act_layout = self.runtime.name
        if self.quantize.block_size is not None and self.quantize.act_bits and not self.export.matmul_nbits:
            raise ValueError("quantize.block_size with act_bits 8 (int8 activations per block) runs only as "
                             "MatMulNBits: set export.matmul_nbits: true, or act_bits: null")
        if self.export.matmul_nbits and self.runtime.name != "onnxruntime":
            raise ValueError(f"export.matmul_nbits writes ONNX Runtime's contrib operator, which {self.runtime.name} "
                             "does not run: drop it (the DequantizeLinear form serves every runtime)")
        return self

    def train_config(self) -> TrainConfig | None:
        """The TrainConfig of the train, model and data sections (None without a train section)."""
        if self.train is None:
            return None
        ref, d = self.model.ref(), self.data
        return TrainConfig(**self.train.model_dump(), model=ref.label, model_kwargs=dict(ref.kwargs),
                           dataset=d.dataset, data_root=d.root, channels=d.channels, image_size=d.image_size,
                           limit_train=d.limit_train, limit_test=d.limit_test)


def _location(error: dict) -> str:
    parts = [str(p) for p in error["loc"] if p != "validate_"]
    return ".".join(parts).replace("validate_", "validate") or "(top level)"


def _hint(error: dict) -> str:
    """The message of a pydantic error, saying where a TrainConfig field moved if that is the mistake."""
    if error["type"].endswith("_type"):  # a wrong type: say what was given
        return f"{error['msg']} (got {error['input']!r})"
    if error["type"] != "extra_forbidden":
        return error["msg"].removeprefix("Value error, ")
    loc = error["loc"]
    if len(loc) == 2 and loc[0] == "train" and loc[1] in _MODEL_DATA_FIELDS:
        section, key = _MODEL_DATA_FIELDS[loc[1]]
        return f"unknown key: the {section} section says it ({section}: {{{key}: ...}})"
    return "unknown key"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-4`` as a float (YAML 1.2; YAML 1.1 wants ``1.0e-4``,
    and the strict schema would refuse the string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

MAX_YAML_NODES = 100_000  # a deploy config has hundreds; an alias bomb ("billion laughs") billions


def _read_yaml(path: Path):
    """The document of a YAML file, read safely: composed first (aliases stay shared, so memory is
    bounded by the file's size), checked for python tags and for how many nodes its aliases expand
    to, and only then constructed."""
    loader = _Loader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HeroError(f"{path}: not valid YAML{where}") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, path: Path) -> None:
    """Walk the composed graph as construction would expand it, stopping past MAX_YAML_NODES
    (a cyclic alias stops there too)."""
    stack, seen = [root], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise HeroError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES} values "
                            "(an alias bomb?): write the values out")
        if node.tag.startswith("tag:yaml.org,2002:python/"):
            raise HeroError(f"{path}: python tags are not allowed ({node.tag.split(':', 2)[-1]} at line "
                            f"{node.start_mark.line + 1}): a deploy config holds plain values")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in node.value for child in pair)


def load_config(path: str | Path) -> DeployConfig:
    """Read and validate a deploy config; every problem is a one-line HeroError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise HeroError(f"deploy config {path} does not exist (see deploy_configs/ for examples)")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise HeroError(f"{path}: a deploy config is a YAML mapping with at least a 'name' key")
    try:
        config = DeployConfig.model_validate(raw)
        config.train_config()  # TrainConfig's own checks (names, ranges)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise HeroError(f"{path}: {_location(first)}: {_hint(first)}") from None
    except HeroError as exc:
        raise HeroError(f"{path}: train: {exc}") from None
    return config
