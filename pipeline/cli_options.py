"""The options of the ``hero`` commands that several share, their types and help, and the small
objects they become (a DeployRequest, a QuantSpec). Imports no torch: ``hero --help`` stays fast.

A value click's own types refuse (a range, a JSON object) is refused as every user error is: a
HeroError naming the option, which the CLI prints as one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing

import click

from exporters.device.errors import HeroError
from exporters.device.schema import ACT_LAYOUTS, BN_MODES, GRIDS

DATA_ROOT_HELP = "folder holding the dataset files (else $HERO_DATA, system and cache paths)"


class _Refused:
    """A click type whose refusal is a HeroError naming the option (one error type for the user)."""

    def fail(self, message, param=None, ctx=None):
        raise HeroError(f"{param.opts[0]}: {message}" if param is not None and param.opts else message)


class IntRange(_Refused, click.IntRange):
    """click.IntRange, refusing with a HeroError."""


class FloatRange(_Refused, click.FloatRange):
    """click.FloatRange, refusing with a HeroError."""


class _JsonMapping(_Refused, click.ParamType):
    """A JSON object given on the command line (model factory kwargs)."""

    name = "JSON"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            self.fail(f"{value!r} is not JSON ({exc})", param, ctx)
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a JSON object such as '{{\"width\": 32}}'", param, ctx)
        return parsed


JSON_MAPPING = _JsonMapping()

# Help of `hero train` options; names, types and defaults come from hero_train.config.TrainConfig.
TRAIN_HELP = {
    "model": "resnet20|resnet32|resnet56|mobilenetv2|vgg19bn|resnet18, or your factory package.module:function",
    "model_kwargs": "JSON keyword arguments of the model factory, e.g. '{\"width\": 32}'",
    "dataset": "fashion-mnist|cifar10|cifar100, an image folder (train/<class>/, test/<class>/) or an .npz",
    "channels": "1 or 3: decode your images to this many channels",
    "image_size": "your images: shorter side resized to N, then center-cropped to NxN (folders: 32)",
    "data_root": DATA_ROOT_HELP,
    "optimizer": "sgd|first-order|gradl1|hero",
    "lr": "initial LR of the cosine schedule",
    "h": "perturbation radius (paper: 0.5 CIFAR-10, 1.0 otherwise)",
    "gamma": "Hessian-penalty weight",
    "variant": "authors|paper (see README)",
    "hvp": "exact|finite-difference",
    "hero_warmup_epochs": "epochs without the penalty",
    "lam": "Gradient-L1 weight (5e-4: the penalty is ~8% of the loss at initialisation on ResNet20)",
    "label_noise": "symmetric label-noise ratio in [0, 1)",
    "device": "cpu|cuda",
    "bf16": "bf16 autocast (CUDA only)",
    "sync_bn": "BatchNorm statistics over all torchrun ranks (CUDA only)",
    "limit_train": "train on the first N samples only",
    "limit_test": "evaluate on the first N test samples only",
    "augment": "no random crop and flip",
    "record_hz": "record ||Hz|| (Eq. 11's z) per epoch on N batches",
}


def train_options(command):
    """One click option per TrainConfig field: `--batch-size` for batch_size, with the field's type and
    default; a bool field that defaults to True becomes `--no-<name>`, one that defaults to False a flag."""
    from hero_train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in reversed(dataclasses.fields(TrainConfig)):
        name, kind, default = field.name, hints[field.name], field.default
        flag = "--" + name.replace("_", "-")
        help_text = TRAIN_HELP.get(name)
        if kind is dict:
            option = click.option(flag, name, type=JSON_MAPPING, default="{}", help=help_text)
        elif kind is bool:
            decl = f"--no-{name.replace('_', '-')}" if default else flag
            option = click.option(decl, name, is_flag=True, flag_value=not default, default=default, help=help_text)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            option = click.option(flag, name, type=base, default=default, show_default=default is not None,
                                  help=help_text)
        command = option(command)
    return command


def _options(command, declared):
    for decl, kwargs in reversed(declared):
        command = click.option(decl, **kwargs)(command)
    return command


def scheme_options(command):
    """--asymmetric, --per-tensor, --bn and --grid: the QuantSpec fields a command lets the user set."""

    return _options(command, [
        ("--asymmetric", dict(is_flag=True, help="asymmetric weight grid (zero point), else symmetric")),
        ("--per-tensor", dict(is_flag=True, help="one scale per tensor, else per output channel")),
        ("--bn", dict(type=click.Choice(BN_MODES), default=BN_MODES[0], show_default=True,
                      help="BatchNorm: fold then quantize, quantize the trained weights then fold into the "
                           "scales, or keep it a float op")),
        ("--grid", dict(type=click.Choice(GRIDS), default=GRIDS[0], show_default=True,
                        help="nested: every width as INT8 codes on the 8-bit scale (TensorRT switches by refit)")),
    ])


def quant_spec(bits, asymmetric: bool, per_tensor: bool, bn: str, grid: str, act_bits=None,
               act_layout=ACT_LAYOUTS[0]):
    """The QuantSpec of `scheme_options` (a float baseline keeps the canonical grid)."""
    from exporters.quantize import QuantSpec

    return QuantSpec(bits=bits, symmetric=not asymmetric, per_channel=not per_tensor, bn=bn,
                     grid=grid if bits is not None else GRIDS[0], act_bits=act_bits, act_layout=act_layout)


def named_model(model: str | None, model_kwargs: dict | None):
    """The ModelRef of --model and --model-kwargs (None when no model is named)."""
    from hero_train.models import ModelRef

    if model is None:
        if model_kwargs:
            raise HeroError("--model-kwargs needs --model")
        return None
    return ModelRef.parse(model, model_kwargs)


@dataclasses.dataclass(frozen=True)
class DeployRequest:
    """What the user said of the checkpoint a command loads: its network (--model, --model-kwargs:
    a factory's, or a plain state_dict's) and where its data is (--dataset, --data-root)."""

    model: str | None
    model_kwargs: dict | None
    dataset: str | None
    root: str | None

    def data(self):
        from hero_train.checkpoint import DataRef

        return DataRef(self.dataset, self.root)

    def load(self, checkpoint):
        """The checkpoint's `hero_train.checkpoint.Deployable`."""
        from hero_train.checkpoint import load_deployable

        return load_deployable(checkpoint, named_model(self.model, self.model_kwargs), self.data())


def deploy_options(command):
    """--model, --model-kwargs, --dataset and --data-root, what every command that loads a checkpoint
    takes, handed to it as one DeployRequest, `request`."""
    @functools.wraps(command)
    def with_request(*args, model, model_kwargs, dataset, data_root, **kwargs):
        return command(*args, request=DeployRequest(model, model_kwargs, dataset, data_root), **kwargs)

    return _options(with_request, [
        ("--model", dict(default=None, help="the checkpoint's network: a built-in name or your factory "
                                            "package.module:function (required for a factory: code is imported "
                                            "only from one you name)")),
        ("--model-kwargs", dict(type=JSON_MAPPING, default=None, help="JSON keyword arguments of the factory")),
        ("--dataset", dict(default=None, help="the data to evaluate on, if not the checkpoint's own: a built-in "
                                              "name, an image folder or an .npz")),
        ("--data-root", dict(default=None, help=DATA_ROOT_HELP)),
    ])
