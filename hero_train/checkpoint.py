"""Training checkpoints: written atomically, read with ``weights_only=True``.

Schema (a plain dict, so ``torch.load(..., weights_only=True)`` can read it and never runs code):

- ``format``: ``"hero-deploy-checkpoint"``, ``format_version``: 1
- ``model``: ``{"name", "num_classes", "in_channels"}``; ``input_shape``: ``[C, H, W]``
- ``dataset``: name; ``normalization``: ``{"mean": [...], "std": [...]}``
- ``config``: the training config as plain values; ``epoch``: epochs completed
- ``state_dict``: model weights and buffers; ``optimizer``, ``scheduler``: their state dicts
- ``metrics``: the last epoch's metrics line
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from hero_train.models import build_model

FORMAT = "hero-deploy-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Serialise, then write atomically (readable by other users): an interrupted write never
    leaves half a checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(dict(payload, format=FORMAT, format_version=FORMAT_VERSION), buffer)
    return write_atomic(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``hero train``; anything else is a clear HeroError."""
    path = Path(path)
    if not path.is_file():
        raise HeroError(f"checkpoint {path} does not exist: train one with `hero train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeroError(f"{path} is not a readable hero-deploy checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HeroError(f"{path} is not a hero-deploy checkpoint (no '{FORMAT}' marker): "
                        "pass a checkpoint.pt written by `hero train`")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise HeroError(f"{path} has checkpoint format version {ckpt.get('format_version')}, "
                        f"this hero-deploy reads version {FORMAT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the trained network (eval mode) from a loaded checkpoint."""
    spec = ckpt["model"]
    model = build_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise HeroError(f"checkpoint weights do not fit model {spec['name']}: "
                        f"{str(exc).splitlines()[0][:160]}") from None
    return model.eval()
