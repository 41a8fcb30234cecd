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
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
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
    """The ModelRef a checkpoint records (checkpoints from before factories name a built-in only)."""
    spec = ckpt["model"]
    return ModelRef(name=spec.get("name"), factory=spec.get("factory"), kwargs=dict(spec.get("kwargs") or {}))


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


@dataclass
class Loaded:
    """A checkpoint read once: the dict, its model and its sha256 (what the deploy stages share)."""

    path: Path
    ckpt: dict
    model: torch.nn.Module
    sha256: str


def load_for_deploy(path: str | os.PathLike, named: ModelRef | None, describe=None) -> dict:
    """A checkpoint to deploy: a full one (checked against the model the user named), or a plain
    ``state_dict`` file (``torch.save(model.state_dict(), path)``), which needs the user to name the
    model and `describe()` to return {"input_shape", "normalization", "classes"}; returned as the
    checkpoint dict `model_from_checkpoint` takes."""
    path = Path(path)
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
    info = describe() if describe is not None else None
    if info is None:
        raise HeroError(f"{path} is a plain state_dict: say what its input is with a data section (the dataset) "
                        "or model.input_shape, model.normalization and model.classes")
    shape = [int(d) for d in info["input_shape"]]
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {**named.to_dict(), "num_classes": len(info["classes"]), "in_channels": shape[0]},
            "input_shape": shape, "dataset": info.get("dataset"), "classes": list(info["classes"]),
            "normalization": {"mean": list(info["normalization"]["mean"]), "std": list(info["normalization"]["std"])},
            "config": {}, "epoch": None, "state_dict": obj}


def class_names(ckpt: dict) -> list[str]:
    """The checkpoint's class names ("0", "1", ... when it predates them)."""
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
