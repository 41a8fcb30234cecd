"""What one training run depends on: `TrainConfig`, importable without torch.

The command line builds its `hero train` options from these fields at import time, so this module
imports no torch, data or model code at its top (`hero check` and `hero --help` stay fast); the
checks that need them (a dataset that exists, a model factory that parses) import them when a
config is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporters.device.errors import HeroError, unknown_choice

if TYPE_CHECKING:
    from hero_train.models import ModelRef

OPTIMIZERS = ("sgd", "first-order", "gradl1", "hero")
VARIANTS = ("authors", "paper")  # HERO's two readings: the authors' code and the paper's text (README)
HVP_MODES = ("exact", "finite-difference")


@dataclass
class TrainConfig:
    """Everything one training run depends on (the paper's recipe as defaults)."""

    model: str = "resnet20"  # a built-in name or a factory "package.module:function"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    dataset: str = "fashion-mnist"  # a built-in name, an image folder or an .npz file
    channels: int | None = None  # custom datasets: 1 or 3 (folders default to 3, arrays keep theirs)
    image_size: int | None = None  # custom datasets: side after resize + center crop (folders: 32)
    optimizer: str = "hero"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    h: float = 0.5
    gamma: float = 0.1
    variant: str = "authors"
    hvp: str = "exact"
    hero_warmup_epochs: int = 1
    lam: float = 5e-4  # 0.01 makes lam·||grad L||_1 exceed the loss at init: training from scratch collapses
    label_noise: float = 0.0
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    data_root: str | None = None
    augment: bool = True
    sync_bn: bool = False
    record_hz: int | None = None  # batches for a per-epoch ||Hz|| (Figure 2a); None: not recorded

    def __post_init__(self):
        checks = [
            (self.channels in (None, 1, 3), f"channels must be 1 or 3 (got {self.channels})"),
            (self.image_size is None or self.image_size >= 8, f"image size must be >= 8 (got {self.image_size})"),
            (self.optimizer in OPTIMIZERS,
             unknown_choice("optimizer", self.optimizer, OPTIMIZERS)),
            (self.variant in VARIANTS, unknown_choice("variant", self.variant, VARIANTS)),
            (self.hvp in HVP_MODES, unknown_choice("hvp", self.hvp, HVP_MODES)),
            (self.epochs >= 0, f"epochs must be >= 0 (got {self.epochs})"),
            (self.batch_size >= 1, f"batch size must be >= 1 (got {self.batch_size})"),
            (self.lr >= 0 and self.momentum >= 0 and self.weight_decay >= 0,
             "lr, momentum and weight decay must be >= 0"),
            (self.h >= 0 and self.gamma >= 0 and self.lam >= 0, "h, gamma and lam must be >= 0"),
            (self.hero_warmup_epochs >= 0, "HERO warm-up epochs must be >= 0"),
            (0.0 <= self.label_noise < 1.0, f"label-noise ratio must be in [0, 1) (got {self.label_noise})"),
            (self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
             f"unknown device {self.device!r}: use cpu or cuda"),
            (not self.bf16 or self.device.startswith("cuda"), "bf16 autocast needs --device cuda"),
            (self.limit_train is None or self.limit_train >= 1, "--limit-train must be >= 1"),
            (self.limit_test is None or self.limit_test >= 1, "--limit-test must be >= 1"),
            (self.record_hz is None or self.record_hz >= 1, "--record-hz must be >= 1 batches"),
            (not self.sync_bn or self.device.startswith("cuda"),
             "--sync-bn needs --device cuda: torch's SyncBatchNorm runs on GPUs only"),
            (not (self.sync_bn and self.exact_hvp),
             "--sync-bn cannot take an exact Hessian-vector product (SyncBatchNorm's backward has no "
             "derivative): add --hvp finite-difference"),
        ]
        for ok, message in checks:
            if not ok:
                raise HeroError(message)
        from hero_train.data import check_dataset

        self.model_ref()  # a known built-in name or a well-formed factory reference
        check_dataset(self.dataset)

    def model_ref(self) -> ModelRef:
        from hero_train.models import ModelRef

        return ModelRef.parse(self.model, self.model_kwargs)

    @property
    def exact_hvp(self) -> bool:
        """Whether a step differentiates through a backward pass (double backprop)."""
        penalty = (self.optimizer == "hero" and self.gamma > 0) or (self.optimizer == "gradl1" and self.lam > 0)
        return penalty and self.hvp == "exact"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
