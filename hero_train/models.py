"""CIFAR-style classifiers built by name from one registry (timm's `create_model` pattern).

Every model is plain Conv2d / BatchNorm2d / ReLU / MaxPool2d / AdaptiveAvgPool2d / Linear
with out-of-place residual additions, so it traces and exports to ONNX as-is and the
quantizer sees one module per activation. An adaptive average pool before the classifier
lets every model take any input of at least 28x28 (Fashion-MNIST 1x28x28, CIFAR 3x32x32).

    model = build_model("resnet20", num_classes=10, in_channels=3)
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from exporters.device.errors import HeroError, unknown_choice


def _conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_planes, out_planes, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_planes),
    ]


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity when shapes match, else the 1x1 conv + BN projection (He et al. 2016, option B)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(in_planes, out_planes, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(in_planes, planes, 3, stride), nn.ReLU(), *_conv_bn(planes, planes, 3)
        )
        self.shortcut = _projection(in_planes, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class _PooledClassifier(nn.Module):
    """`features`, then global average pooling and one linear classifier: the head every network
    here shares (its attribute names are the checkpoints' state_dict keys)."""

    def _set_head(self, features: list[nn.Module], channels: int, num_classes: int) -> None:
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


class ResNet(_PooledClassifier):
    """CIFAR ResNet: 3x3 stem, stages of BasicBlocks, global average pool, linear classifier.

    `widths` (16, 32, 64) with n blocks per stage gives the 6n+2-layer networks of
    He et al. 2016, Sec. 4.2; (64, 128, 256, 512) with [2, 2, 2, 2] gives the usual CIFAR
    ResNet-18 (kuangliu/pytorch-cifar).
    """

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, widths[0], 3), nn.ReLU()]
        in_planes = widths[0]
        for stage, (planes, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self._set_head(layers, in_planes, num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (Sandler et al. 2018, Table 1).

    As in kuangliu/pytorch-cifar, stride-1 blocks always add a shortcut, projected by a
    1x1 conv when the channel count changes; stride-2 blocks have none.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = expansion * in_planes
        self.residual = nn.Sequential(
            *_conv_bn(in_planes, hidden, 1), nn.ReLU(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(),
            *_conv_bn(hidden, out_planes, 1),
        )
        self.shortcut = _projection(in_planes, out_planes, 1) if stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out if self.shortcut is None else out + self.shortcut(x)


# (expansion, out_planes, blocks, first stride); the second stage keeps stride 1 for
# 32x32 inputs, the CIFAR change of kuangliu/pytorch-cifar.
_MOBILENETV2_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
)


class MobileNetV2(_PooledClassifier):
    """MobileNetV2 for CIFAR (stride-1 stem and second stage), about 2.30M parameters at 10 classes."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, 32, 3), nn.ReLU()]
        in_planes = 32
        for expansion, out_planes, count, first_stride in _MOBILENETV2_STAGES:
            for i in range(count):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, first_stride if i == 0 else 1))
                in_planes = out_planes
        layers += [*_conv_bn(in_planes, 1280, 1), nn.ReLU()]
        self._set_head(layers, 1280, num_classes)


_VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(_PooledClassifier):
    """VGG-19 with batch norm for CIFAR (Simonyan & Zisserman 2015, config E; one 512->classes linear layer).

    Pools use ceil_mode so a 28x28 input still reaches the fifth pool at 2x2 (28-14-7-4-2-1);
    on 32x32 inputs every pool divides evenly and ceil_mode changes nothing.
    """

    def __init__(self, config: tuple, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_planes = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [*_conv_bn(in_planes, item, 3), nn.ReLU()]
                in_planes = item
        self._set_head(layers, in_planes, num_classes)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet20": lambda num_classes, in_channels: ResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels),
    "resnet32": lambda num_classes, in_channels: ResNet((16, 32, 64), (5, 5, 5), num_classes, in_channels),
    "resnet56": lambda num_classes, in_channels: ResNet((16, 32, 64), (9, 9, 9), num_classes, in_channels),
    "resnet18": lambda num_classes, in_channels: ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels),
    "mobilenetv2": lambda num_classes, in_channels: MobileNetV2(num_classes, in_channels),
    "vgg19bn": lambda num_classes, in_channels: VGG(_VGG19_CONFIG, num_classes, in_channels),
}


def _init_weights(model: nn.Module) -> None:
    """He-normal conv weights (He et al. 2015, 'Delving deep into rectifiers', Eq. 10; fan-out
    as torchvision's ResNet), BN to identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HeroError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model from `MODELS` by name."""
    if name not in MODELS:
        raise HeroError(unknown_choice("model", name, sorted(MODELS)))
    model = MODELS[name](_positive_int(num_classes, "num_classes"), _positive_int(in_channels, "in_channels"))
    _init_weights(model)
    return model


# --------------------------------------------------------------------------- your own model


@dataclass(frozen=True)
class ModelRef:
    """What network: a built-in `name` from MODELS, or a `factory` reference "package.module:function"
    (a callable returning an nn.Module) with keyword arguments. Plain data: a checkpoint records it."""

    name: str | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.name is None) == (self.factory is None):
            raise HeroError("a model is either a built-in name or a factory 'package.module:function', not both")
        if self.name is not None and self.name not in MODELS:
            raise HeroError(unknown_choice("model", self.name, sorted(MODELS)) +
                            " (or a factory 'package.module:function')")
        if self.factory is not None and not _FACTORY.fullmatch(self.factory):
            raise HeroError(f"model factory {self.factory!r} is not of the form 'package.module:function'")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise HeroError(f"model kwargs must be a mapping of names to values, got {self.kwargs!r}")
        if self.name is not None and self.kwargs:
            raise HeroError(f"built-in model {self.name} takes no kwargs (class count and channels come from the data)")

    @classmethod
    def parse(cls, text: str, kwargs: dict | None = None) -> ModelRef:
        """`--model` as typed: a factory when it contains ':', else a built-in name."""
        return cls(factory=text, kwargs=dict(kwargs or {})) if ":" in text else cls(name=text, kwargs=dict(kwargs or {}))

    @property
    def label(self) -> str:
        """How reports and manifests name the model."""
        return self.name or self.factory

    def to_dict(self) -> dict:
        return {"name": self.name, "factory": self.factory, "kwargs": dict(self.kwargs)}


_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_factory(reference: str) -> Callable[..., nn.Module]:
    """The callable named by "package.module:function", imported from the working directory and
    PYTHONPATH. Only a factory the user named (command line or config) is ever imported."""
    module_name, _, attribute = reference.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # console scripts do not put it there
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise HeroError(f"model factory {reference}: cannot import {module_name} ({exc}); run from the folder "
                        "that holds it or add that folder to PYTHONPATH") from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HeroError(f"model factory {reference}: {module_name} has no {attribute}")
    if not callable(target):
        raise HeroError(f"model factory {reference} is not callable")
    return target


def create_model(ref: ModelRef, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly built model: `build_model` for a built-in name; for a factory, factory(**kwargs),
    given num_classes / in_channels too when it takes parameters of those names and kwargs do not
    set them."""
    if ref.name is not None:
        return build_model(ref.name, num_classes=num_classes, in_channels=in_channels)
    factory = import_factory(ref.factory)
    kwargs = dict(ref.kwargs)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in parameters and key not in kwargs:
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise HeroError(f"model factory {ref.factory} does not take these kwargs {sorted(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise HeroError(f"model factory {ref.factory} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
