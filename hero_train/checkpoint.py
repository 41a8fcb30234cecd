"""Training checkpoints: written atomically, read with ``weights_only=True``.

Schema (a plain dict, so ``torch.load(..., weights_only=True)`` can read it and never runs code):

- ``format``: ``"hero-deploy-checkpoint"``, ``format_version``: 1
- ``model``: ``{"name", "factory", "kwargs", "num_classes", "in_channels"}`` (a `ModelRef`: a built-in
  name, or a factory "package.module:function" and its kwargs); ``input_shape``: ``[C, H, W]``
- ``dataset``: what it was trained on (a built-in name, a folder or an .npz; None when written by
  `save_for_deploy`); ``classes``: class names; ``normalization``: ``{"mean": [...], "std": [...]}``
- ``config``: the training config as plain values; ``epoch``: epochs completed
- ``state_dict``: model weights and buffers; ``optimizer``, ``scheduler``: their state dicts
- ``metrics``: the last epoch's metrics line

The deploy stages never see this dict: `load_deployable` reads a checkpoint (or a plain
state_dict) into a `Deployable`, the one context they all take.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file, write_atomic
from hero_train import data as hdata
from hero_train.models import ModelRef, create_model

FORMAT = "hero-deploy-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Serialise, then write atomically (readable by other users): an interrupted write never
    leaves half a checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(dict(payload, format=FORMAT, format_version=FORMAT_VERSION), buffer)
    return write_atomic(path, buffer.getbuffer())


def _read(path: Path, what: str):
    if path.is_dir():
        raise HeroError(f"{what} {path} is a folder: pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    if not path.is_file():
        raise HeroError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeroError(f"{path} is not a readable checkpoint or state_dict ({first})") from None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _metadata_problem(ckpt: dict) -> str | None:
    """What is wrong with a checkpoint's own description of its model and input, if anything."""
    model, shape, norm = ckpt.get("model"), ckpt.get("input_shape"), ckpt.get("normalization")
    if not isinstance(model, dict) or not _positive_int(model.get("num_classes")) \
            or not _positive_int(model.get("in_channels")):
        return "model must record num_classes and in_channels (integers >= 1)"
    if not isinstance(ckpt.get("state_dict"), dict):
        return "it holds no state_dict"
    if not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 4 or not all(map(_positive_int, shape)):
        return f"input_shape must be [C, H, W] of positive integers, got {shape!r}"
    if shape[0] != model["in_channels"]:
        return f"input_shape {list(shape)} has {shape[0]} channels but the model takes {model['in_channels']}"
    if not isinstance(norm, dict) or any(not isinstance(norm.get(k), (list, tuple)) or len(norm[k]) != shape[0]
                                         for k in ("mean", "std")) or not all(s > 0 for s in norm["std"]):
        return f"normalization must give {shape[0]} means and {shape[0]} positive stds, got {norm!r}"
    classes = ckpt.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != model["num_classes"]):
        return f"classes must list {model['num_classes']} names, got {classes!r}"
    return None


def _checked_format(ckpt: dict, path: Path) -> dict:
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise HeroError(f"{path} has checkpoint format version {ckpt.get('format_version')}, "
                        f"this hero-deploy reads version {FORMAT_VERSION}")
    problem = _metadata_problem(ckpt)
    if problem is not None:
        raise HeroError(f"{path}: the checkpoint's metadata is damaged ({problem}): use the checkpoint as "
                        "`hero train` or save_for_deploy wrote it")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``hero train`` or `save_for_deploy`; anything else is a clear HeroError."""
    path = Path(path)
    ckpt = _read(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HeroError(f"{path} is not a hero-deploy checkpoint (no '{FORMAT}' marker): "
                        "pass a checkpoint.pt written by `hero train` or save_for_deploy")
    return _checked_format(ckpt, path)


def recorded_model(ckpt: dict) -> ModelRef:
    """The ModelRef a checkpoint records (a built-in `name`, or a `factory` and its `kwargs`)."""
    spec = ckpt["model"]
    return ModelRef(name=spec.get("name"), factory=spec.get("factory"), kwargs=dict(spec.get("kwargs") or {}))


def recorded_config(ckpt: dict) -> dict:
    """The training config a checkpoint records, as plain values ({} when not trained by ``hero train``)."""
    return dict(ckpt.get("config") or {})


@dataclass(frozen=True)
class TrainingState:
    """What continuing a ``hero train`` run takes from its checkpoint: the epochs done, the config it
    was trained with, and the model's, optimizer's and LR scheduler's state_dicts."""

    epoch: int
    config: dict
    state_dict: dict
    optimizer: dict
    scheduler: dict


def training_state(path: str | os.PathLike) -> TrainingState:
    """The TrainingState of the ``hero train`` checkpoint at `path`."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("epoch", "optimizer", "scheduler") if k not in ckpt]
    if missing:
        raise HeroError(f"{path} holds no {' or '.join(missing)}: only a checkpoint hero train wrote can be resumed")
    return TrainingState(int(ckpt["epoch"]), recorded_config(ckpt), ckpt["state_dict"], ckpt["optimizer"],
                         ckpt["scheduler"])


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a nan or inf, or None."""
    return next((name for name, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_named_model(recorded: ModelRef, named: ModelRef | None, path) -> ModelRef:
    """The model to build from a checkpoint, refusing a mismatch with what the user named. Code
    runs only from a factory the user names: a checkpoint that records a factory needs --model
    with that very factory. Kwargs the user gives must equal the recorded ones."""
    if recorded.factory is not None and named is None:
        raise HeroError(f"{path} was built by model factory {recorded.factory}: pass --model {recorded.factory} "
                        "(config: model: {factory: ...}) to let hero-deploy import it")
    if named is None:
        return recorded
    if (named.name, named.factory) != (recorded.name, recorded.factory):
        raise HeroError(f"{path} holds model {recorded.label}, not {named.label}: pass --model {recorded.label}")
    if named.kwargs and named.kwargs != recorded.kwargs:
        raise HeroError(f"{path} was built with model kwargs {recorded.kwargs}, not {named.kwargs}: "
                        "drop --model-kwargs or pass the recorded ones")
    return recorded


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


@dataclass(frozen=True)
class InputSpec:
    """What a model takes and answers: one sample's `shape` [C, H, W], the per-channel
    normalisation (x / 255 - `mean`) / `std` it was trained with, its `classes` in label order,
    and, for your own dataset, how many training images `mean` and `std` were measured on."""

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    normalization_samples: int | None = None

    def normalization(self) -> dict:
        """The checkpoint's and the bundle manifest's ``normalization`` entry."""
        samples = {} if self.normalization_samples is None else {"samples": self.normalization_samples}
        return {"mean": list(self.mean), "std": list(self.std), **samples}


@dataclass(frozen=True)
class DataRef:
    """Where a model's data is: `dataset` (a built-in name, an image folder or an .npz; None: the
    one the checkpoint records), `root` (the folder of a built-in dataset's files; None:
    $HERO_DATA, the system and cache folders), and the `channels` and `image_size` your own images
    are decoded to (None for a built-in dataset; see hero_train.data.load_dataset)."""

    dataset: str | None = None
    root: str | None = None
    channels: int | None = None
    image_size: int | None = None


@dataclass
class Deployable:
    """A trained model as every deploy stage takes it, built from a checkpoint by `load_deployable`: the network
    (eval mode) and the ModelRef that builds it, its input, its data (dataset resolved: the one
    given, else the one recorded), the checkpoint file it came from and that file's sha256, and
    the optimizer it was trained with (None when not trained by ``hero train``)."""

    model: torch.nn.Module
    model_ref: ModelRef
    input: InputSpec
    data: DataRef
    path: Path
    sha256: str
    optimizer: str | None = None


def _described_by(data: DataRef) -> InputSpec | None:
    """A plain state_dict's input read off `data`'s training split: its shape, class names and
    normalisation (measured, for your own images); None without a dataset."""
    if data.dataset is None:
        return None
    train = hdata.load_dataset(data.dataset, "train", root=data.root, channels=data.channels,
                               image_size=data.image_size)
    return InputSpec(tuple(train.images.shape[1:]), tuple(train.mean), tuple(train.std), tuple(train.classes))


def _deploy_checkpoint(path: Path, named: ModelRef | None, data: DataRef, described: InputSpec | None) -> dict:
    """A full checkpoint (checked against the model the user named), or a plain state_dict file
    rewritten as one: it needs the user to name the model and say its input (`described`, else
    `data`'s dataset)."""
    obj = _read(path, "checkpoint")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = _checked_format(obj, path)
        ckpt["model"] = {**ckpt["model"], **check_named_model(recorded_model(ckpt), named, path).to_dict()}
        return ckpt
    if not _is_state_dict(obj):
        raise HeroError(f"{path} is neither a hero-deploy checkpoint nor a state_dict (a dict of tensors)")
    if named is None:
        raise HeroError(f"{path} is a plain state_dict: name its network with --model (config: model: {{name: ...}} "
                        "or model: {factory: package.module:function, kwargs: {...}})")
    info = described or _described_by(data)
    if info is None:
        raise HeroError(f"{path} is a plain state_dict: say what its input is with a data section (the dataset) "
                        "or model.input_shape, model.normalization and model.classes")
    shape = [int(d) for d in info.shape]
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {**named.to_dict(), "num_classes": len(info.classes), "in_channels": shape[0]},
            "input_shape": shape, "dataset": data.dataset, "classes": list(info.classes),
            "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "config": {}, "epoch": None, "state_dict": obj}


def load_deployable(path: str | os.PathLike, named: ModelRef | None = None, data: DataRef = DataRef(),
                    described: InputSpec | None = None) -> Deployable:
    """The deploy context of a checkpoint written by ``hero train`` or `save_for_deploy`, or of a
    plain ``state_dict`` file (``torch.save(model.state_dict(), path)``), which needs the model
    `named` and its input `described` or read off ``data.dataset``. ``data.dataset`` replaces the
    one the checkpoint records (a folder that moved, a checkpoint from save_for_deploy), but not by
    another built-in one. A model with a non-finite weight or buffer is refused, naming the first."""
    path = Path(path)
    ckpt = _deploy_checkpoint(path, named, data, described)
    trained_on = ckpt.get("dataset")
    if data.dataset in hdata.DATASETS and trained_on in hdata.DATASETS and data.dataset != trained_on:
        raise HeroError(f"the dataset asked for is {data.dataset!r} but {path} was trained on {trained_on!r}: "
                        "pass the dataset it was trained on (a moved folder or .npz may be given anew)")
    model = model_from_checkpoint(ckpt, path)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:  # nothing sensible can be quantized, exported or measured from it
        raise HeroError(f"{path}: tensor {bad} holds nan or inf values (the training diverged): "
                        "deploy an earlier checkpoint or retrain with a lower --lr")
    shape = tuple(ckpt["input_shape"])
    norm = ckpt["normalization"]
    dataset = data.dataset if data.dataset is not None else trained_on
    custom = dataset is not None and hdata.is_custom(dataset)
    return Deployable(
        model=model, model_ref=recorded_model(ckpt),
        input=InputSpec(shape, tuple(float(m) for m in norm["mean"]), tuple(float(s) for s in norm["std"]),
                        tuple(class_names(ckpt)), norm.get("samples")),
        data=DataRef(dataset, data.root, shape[0] if custom else None, shape[-1] if custom else None),
        path=path, sha256=sha256_file(path), optimizer=recorded_config(ckpt).get("optimizer"))


def class_names(ckpt: dict) -> list[str]:
    """The checkpoint's class names ("0", "1", ... when it records none)."""
    return list(ckpt.get("classes") or [str(i) for i in range(ckpt["model"]["num_classes"])])


def weights_misfit(model: torch.nn.Module, state_dict: dict) -> str | None:
    """How `state_dict` fails to fit `model`, if it does: the first tensor whose shape differs
    (name, expected vs found), then the missing and unexpected keys (the first few of each)."""
    expected = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(state_dict[k].shape)) for k, v in expected.items()
             if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    parts = []
    if wrong:
        name, want, found = wrong[0]
        parts.append(f"tensor {name} has shape {list(found)} but the model expects {list(want)}"
                     + (f" (+{len(wrong) - 1} more tensors of another shape)" if len(wrong) > 1 else ""))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} key(s): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    return "; ".join(parts) or None


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike | None = None) -> torch.nn.Module:
    """Rebuild the trained network (eval mode) from a loaded checkpoint (read from `path`, named in
    errors). Weights that do not fit the model it records are a HeroError naming the first tensor of
    another shape and the missing and unexpected keys: the metadata names the wrong network."""
    spec = ckpt["model"]
    ref = recorded_model(ckpt)
    model = create_model(ref, num_classes=spec["num_classes"], in_channels=spec["in_channels"])
    misfit = weights_misfit(model, ckpt["state_dict"])
    if misfit is not None:
        kwargs = f" with kwargs {ref.kwargs}" if ref.kwargs else ""
        raise HeroError(f"{path or 'the checkpoint'} records model {ref.label}{kwargs} (num_classes "
                        f"{spec['num_classes']}, in_channels {spec['in_channels']}) but its weights do not fit it "
                        f"({misfit}): deploy it with the model that produced these weights: save its state_dict on "
                        "its own and pass --model NAME, or rewrite the checkpoint with save_for_deploy")
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def save_for_deploy(model: torch.nn.Module, path: str | os.PathLike, *, factory: str, kwargs: dict | None = None,
                    input_shape, normalization: dict, classes) -> Path:
    """Write a checkpoint of a model trained in your own loop that ``hero run --checkpoint`` takes with no
    model section (but --model FACTORY, since code is imported only from a factory you name):
    `factory` "package.module:function" rebuilds it with `kwargs`; `input_shape` is one sample's
    [C, H, W], `normalization` {"mean": [...], "std": [...]} (per channel, 0..1 scale), `classes`
    the class names in label order."""
    ref = ModelRef(factory=factory, kwargs=dict(kwargs or {}))
    shape = [int(d) for d in input_shape]
    if len(normalization.get("mean", [])) != shape[0] or len(normalization.get("std", [])) != shape[0]:
        raise HeroError(f"normalization needs one mean and one std per input channel ({shape[0]}), got {normalization}")
    payload = {"model": {**ref.to_dict(), "num_classes": len(classes), "in_channels": shape[0]},
               "input_shape": shape, "dataset": None, "classes": [str(c) for c in classes],
               "normalization": {"mean": [float(m) for m in normalization["mean"]],
                                 "std": [float(s) for s in normalization["std"]]},
               "config": {}, "epoch": None, "state_dict": model.state_dict()}
    return save_checkpoint(payload, path)
