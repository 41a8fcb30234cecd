"""The experiment plan of the HERO paper reproduction: which training runs ("cells") feed which table.

A cell is one ``TrainConfig`` (one method, one seed, one label-noise ratio, ...) trained in its own
folder and, unless it only feeds the label-noise table, evaluated after training at every weight
precision through the deploy pipeline. Cells are listed in priority order, so an interrupted suite
has the most important results first:

1. clean labels, SGD and HERO at every seed (Tables 1 and 3, Figures 1-3, with the seed spread);
2. clean labels, first-order only and Gradient-L1 at every seed;
3. the rest of HERO's h and gamma grid, selected on a validation split held out of the training
   images (never the test set);
4. the side models (the small scale's MobileNetV2): SGD and HERO at the first seed;
5. symmetric label noise (Table 2): SGD, Gradient-L1 and HERO at every ratio, first seed;
6. HERO's own choices: the paper's variant, and exact Hessian-vector products.

Every PTQ cell is evaluated under each scheme of ``PTQ_SCHEMES`` (symmetric weights, 8..2 bits),
each scheme in its own folder, so adding a scheme re-runs only its PTQ, never the training.

Every method uses the same seeds, data subset, schedule and base SGD settings. The two scales:
``small`` fits about 2.5 hours of a 2-core CPU (Fashion-MNIST, ResNet20, a training subset, a few
epochs, a reduced gamma grid); ``full`` is the paper's protocol (CIFAR-10/100, three models,
200 epochs, the full gamma grid) for a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from hero_train.config import TrainConfig

TABLES = ("table1", "table2", "table3", "fig1", "fig2", "fig3", "variants", "gamma")
PTQ_BITS = (8, 7, 6, 5, 4, 3, 2)
PAPER_GAMMA_GRID = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# Symmetric weight schemes of every PTQ table, by name: the deploy config's quantize keys. Per
# channel the BatchNorm fold order does not change the codes; per tensor it does
# (`exporters.quantize.QuantSpec`, bn).
PTQ_SCHEMES = {
    "per-channel": {"per_channel": True, "bn": "fold-first"},
    "per-tensor fold-first": {"per_channel": False, "bn": "fold-first"},
    "per-tensor quantize-first": {"per_channel": False, "bn": "quantize-first"},
}


def scheme_dir(scheme: str) -> str:
    """A PTQ scheme's folder under <cell>/ptq ("per-tensor fold-first" -> per-tensor-fold-first)."""
    return scheme.replace(" ", "-")


# The deploy config's validate section for the PTQ evaluation: latency is not a result here.
PTQ_VALIDATE = {"batch_size": 500, "latency_batch": 64, "latency_repeats": 3, "unoptimized_samples": 1000}


@dataclass(frozen=True)
class DataShape:
    """Sizes of a dataset's splits and one image, for the cost estimate and the step timing."""

    train: int
    test: int
    image: tuple[int, int, int]


DATA_SHAPES = {
    "fashion-mnist": DataShape(60_000, 10_000, (1, 28, 28)),
    "cifar10": DataShape(50_000, 10_000, (3, 32, 32)),
    "cifar100": DataShape(50_000, 10_000, (3, 32, 32)),
}


@dataclass(frozen=True)
class Scale:
    """Everything the plan depends on; ``small`` and ``full`` below are the two presets."""

    name: str
    pairs: tuple[tuple[str, str], ...]  # (dataset, model)
    epochs: int
    noise_epochs: int
    limit_train: int | None
    seeds: tuple[int, ...]
    noise_ratios: tuple[float, ...]
    gamma: float  # HERO's gamma in every cell but the grid's (authors' variant)
    gamma_grid: tuple[float, ...]
    grid_seeds: int  # the grid runs at the first `grid_seeds` seeds
    paper_variant_gamma: float
    h: dict  # dataset -> h
    lam: float
    hvp: str
    batch_size: int = 128
    lr: float = 0.1
    hero_warmup_epochs: int = 1
    record_hz: int = 4
    device: str = "cpu"
    bf16: bool = False
    data_root: str | None = None
    ptq_limit_test: int | None = None  # test samples of the PTQ evaluation (None: the whole test set)
    ptq_schemes: tuple[str, ...] = tuple(PTQ_SCHEMES)
    h_grid: tuple[float, ...] = ()  # HERO's h values tried at the main gamma (besides the dataset's h)
    # Training images after the first `limit_train` held out for selecting h and gamma; None: no
    # split (TrainConfig trains on a prefix only, so a full-data scale cannot hold any out).
    validation: int | None = None
    side_pairs: tuple[tuple[str, str], ...] = ()  # (dataset, model) run with SGD and HERO at the first seed


SMALL = Scale(
    name="small",
    pairs=(("fashion-mnist", "resnet20"),),
    epochs=8,
    noise_epochs=5,
    limit_train=10_000,
    seeds=(0, 1),
    noise_ratios=(0.2, 0.4, 0.6, 0.8),
    # The authors' published ResNet20 command (github.com/Xiaoxuan-Yang/HERO, README) uses
    # lambda_hero 5.0, our gamma of the authors' variant; it is also the top of the paper's grid.
    gamma=5.0,
    # Two points of the paper's grid; h in {0.25, 0.5, 1} at gamma 5 besides (an 8-epoch run may
    # want a smaller step than the paper's 200-epoch h = 1). Selected on the validation split.
    gamma_grid=(1.0, 5.0),
    grid_seeds=1,
    # At equal gamma the paper's penalty (a sum per tensor) is n_i = 2.3k..37k times the authors'
    # (a mean per tensor) on ResNet20, so the paper variant takes the smallest value of the grid.
    paper_variant_gamma=0.01,
    h={"fashion-mnist": 1.0, "cifar10": 0.5, "cifar100": 1.0},
    # ||grad L||_1 of ResNet20 at initialisation is ~420 (CE ~2.6): lambda 0.01 makes the penalty
    # 1.6x the loss and training from scratch collapsed (30% after 8 epochs). 5e-4 puts it at ~8%.
    lam=5e-4,
    hvp="finite-difference",
    ptq_limit_test=5000,
    h_grid=(0.25, 0.5, 1.0),
    validation=5000,
    # The paper's largest PTQ gains are on MobileNetV2; one of its steps costs about 7 ResNet20 steps here.
    side_pairs=(("fashion-mnist", "mobilenetv2"),),
)

FULL = Scale(
    name="full",
    pairs=tuple((d, m) for d in ("cifar10", "cifar100") for m in ("resnet20", "mobilenetv2", "vgg19bn")),
    epochs=200,
    noise_epochs=200,
    limit_train=None,
    seeds=(0, 1),
    noise_ratios=(0.2, 0.4, 0.6, 0.8),
    gamma=5.0,
    gamma_grid=PAPER_GAMMA_GRID,
    grid_seeds=1,
    paper_variant_gamma=0.01,
    h={"fashion-mnist": 1.0, "cifar10": 0.5, "cifar100": 1.0},
    lam=0.01,
    hvp="exact",
    device="cuda",
)

SCALES = {"small": SMALL, "full": FULL}


@dataclass
class Cell:
    """One training run: its folder name under the scale's output, its config, what it feeds."""

    name: str
    config: TrainConfig
    tables: tuple[str, ...]
    priority: int
    ptq: bool
    ptq_limit_test: int | None = None  # test samples for the PTQ evaluation (None: all)
    ptq_schemes: tuple[str, ...] = tuple(PTQ_SCHEMES)
    validation: tuple[int, int] | None = None  # [start, stop) of the held-out training images

    def to_dict(self) -> dict:
        return {"name": self.name, "tables": list(self.tables), "priority": self.priority, "ptq": self.ptq,
                "ptq_limit_test": self.ptq_limit_test, "ptq_schemes": list(self.ptq_schemes),
                "validation": None if self.validation is None else list(self.validation),
                "config": self.config.to_dict()}


def method_label(config: dict) -> str:
    """The method's name as the tables print it."""
    return {"sgd": "SGD", "gradl1": "Gradient-L1", "first-order": "First-order only",
            "hero": "HERO"}[config["optimizer"]]


def cell_name(config: TrainConfig) -> str:
    """A folder name that differs exactly where the configs of the plan differ."""
    hvp = "exact" if config.hvp == "exact" else "fd"
    parts = [config.optimizer]
    if config.optimizer in ("hero", "first-order"):
        parts += [config.variant, f"h{config.h:g}"]
    if config.optimizer == "hero":
        parts += [hvp, f"g{config.gamma:g}"]
    if config.optimizer == "gradl1":
        parts += [hvp, f"lam{config.lam:g}"]
    if config.label_noise:
        parts.append(f"noise{round(100 * config.label_noise)}")
    if config.limit_train:
        parts.append(f"n{config.limit_train}")
    parts += [f"e{config.epochs}", f"s{config.seed}"]
    return f"{config.dataset}-{config.model}/" + "-".join(parts)


def _config(scale: Scale, dataset: str, model: str, optimizer: str, seed: int, *, epochs: int | None = None,
            label_noise: float = 0.0, gamma: float | None = None, h: float | None = None,
            variant: str = "authors", hvp: str | None = None, record_hz: bool = False) -> TrainConfig:
    fields = dict(
        model=model, dataset=dataset, optimizer=optimizer, epochs=epochs or scale.epochs,
        batch_size=scale.batch_size, lr=scale.lr, h=scale.h[dataset] if h is None else h,
        gamma=scale.gamma if gamma is None else gamma, variant=variant, hvp=hvp or scale.hvp,
        hero_warmup_epochs=scale.hero_warmup_epochs, lam=scale.lam, label_noise=label_noise, seed=seed,
        device=scale.device, bf16=scale.bf16, limit_train=scale.limit_train, data_root=scale.data_root,
    )
    if record_hz:
        fields["record_hz"] = scale.record_hz
    return TrainConfig(**fields)


def validation_range(scale: Scale, dataset: str) -> tuple[int, int] | None:
    """[start, stop) of the training images held out for selecting h and gamma: the `validation`
    images right after the `limit_train` prefix the cells train on (None: no split)."""
    if scale.validation is None or scale.limit_train is None:
        return None
    stop = scale.limit_train + scale.validation
    if stop > DATA_SHAPES[dataset].train:
        raise ValueError(f"{dataset}: limit_train + validation = {stop} exceeds its training set")
    return scale.limit_train, stop


def build_plan(scale: Scale) -> list[Cell]:
    """Every cell of the suite in priority order; a config that feeds several tables is one cell."""
    specs: list[tuple[int, TrainConfig, tuple[str, ...], bool]] = []
    first = scale.seeds[0]
    clean = ("table1", "table3", "fig1")
    for dataset, model in scale.pairs:
        cfg = lambda *a, **k: _config(scale, dataset, model, *a, **k)  # noqa: E731
        figs = lambda seed: ("fig2", "fig3") if seed == first else ()  # noqa: E731
        for seed in scale.seeds:
            own = ("variants",) * (seed == first) + ("gamma",) * (seed in scale.seeds[:scale.grid_seeds])
            specs += [(1, cfg("sgd", seed, record_hz=seed == first), clean + figs(seed), True),
                      (1, cfg("hero", seed, record_hz=seed == first), clean + figs(seed) + own, True)]
        for optimizer in ("first-order", "gradl1"):
            specs += [(2, cfg(optimizer, seed, record_hz=seed == first), clean + figs(seed)[:1], True)
                      for seed in scale.seeds]
        grid = [dict(gamma=g) for g in scale.gamma_grid] + [dict(h=h) for h in scale.h_grid]
        specs += [(3, cfg("hero", seed, **point), ("gamma",), True)
                  for seed in scale.seeds[:scale.grid_seeds] for point in grid]
    for dataset, model in scale.side_pairs:
        specs += [(4, _config(scale, dataset, model, optimizer, first), clean, True) for optimizer in ("sgd", "hero")]
    for dataset, model in scale.pairs:
        cfg = lambda *a, **k: _config(scale, dataset, model, *a, **k)  # noqa: E731
        for ratio in scale.noise_ratios:
            specs += [(5, cfg(opt, first, epochs=scale.noise_epochs, label_noise=ratio), ("table2",), False)
                      for opt in ("sgd", "gradl1", "hero")]
        other_hvp = "finite-difference" if scale.hvp == "exact" else "exact"
        specs += [(6, cfg("hero", first, variant="paper", gamma=scale.paper_variant_gamma), ("variants",), True),
                  (6, cfg("hero", first, hvp=other_hvp), ("variants",), True)]
    cells: dict[str, Cell] = {}
    for priority, config, tables, ptq in specs:
        name = cell_name(config)
        if name in cells:
            old = cells[name]
            old.tables = tuple(dict.fromkeys(old.tables + tables))
            old.priority, old.ptq = min(old.priority, priority), old.ptq or ptq
        else:
            held_out = validation_range(scale, config.dataset) if not config.label_noise else None
            cells[name] = Cell(name, config, tables, priority, ptq, scale.ptq_limit_test, scale.ptq_schemes,
                               held_out)
    return sorted(cells.values(), key=lambda c: c.priority)  # stable: the order above within a priority


def plan_document(scale: Scale, cells: list[Cell]) -> dict:
    """The plan as plain data (the driver's plan.json, which aggregate.py reads)."""
    return {"scale": dataclasses.asdict(scale), "cells": [c.to_dict() for c in cells]}


def select(plan: list[Cell], only: tuple[str, ...] | None) -> list[Cell]:
    """The cells that feed any of the named tables/figures (all of them when `only` is empty)."""
    return [c for c in plan if not only or set(c.tables) & set(only)]


def match(plan: list[Cell], patterns: tuple[str, ...]) -> list[Cell]:
    """The cells whose name contains any of `patterns`, in the patterns' order, each cell once."""
    picked: dict[str, Cell] = {}
    for pattern in patterns:
        for cell in plan:
            if pattern in cell.name:
                picked.setdefault(cell.name, cell)
    return list(picked.values())


# --------------------------------------------------------------------------- cost estimate


def step_kind(config: TrainConfig) -> str:
    """Configs whose optimizer steps cost the same share one key (the step timing is per key)."""
    penalty = (config.optimizer == "hero" and config.gamma > 0) or (config.optimizer == "gradl1" and config.lam > 0)
    parts = [config.dataset, config.model, f"b{config.batch_size}", config.optimizer]
    if config.optimizer in ("hero", "first-order"):
        parts.append(config.variant)
    if penalty:
        parts.append(config.hvp)
    return "/".join(parts)


def warmup_kind(config: TrainConfig) -> str | None:
    """The step kind of HERO's warm-up epochs (no penalty: a first-order step), else None."""
    if config.optimizer != "hero" or config.hero_warmup_epochs == 0:
        return None
    return step_kind(dataclasses.replace(config, optimizer="first-order"))


@dataclass
class Costs:
    """Measured seconds: one optimizer step per step kind, and an eval forward of 1000 images per
    'dataset/model'."""

    step_seconds: dict[str, float]
    forward_1000_seconds: dict[str, float]


PTQ_FIXED_SECONDS = 1.5  # per exported variant: export, checker, session creation
CELL_FIXED_SECONDS = 5.0  # per cell: loading the dataset, checkpoints


def estimate_cell_seconds(cell: Cell, costs: Costs, epochs_done: int = 0, schemes_done: tuple[str, ...] = (),
                          validated: bool = False) -> float:
    """Seconds the rest of a cell should take: the remaining epochs (optimizer steps, the per-epoch
    test evaluation, ||Hz|| recording at about three SGD steps per batch), the validation-split
    evaluation, and the PTQ evaluation of each scheme not yet done (per variant: the PyTorch
    emulation and the runtime on the test set, the unoptimised check on 1000 samples and the
    latency batches, each at the eval forward cost)."""
    c = cell.config
    shape = DATA_SHAPES[c.dataset]
    n_train = min(c.limit_train or shape.train, shape.train)
    n_test = min(c.limit_test or shape.test, shape.test)
    steps = math.ceil(n_train / c.batch_size)
    fwd = costs.forward_1000_seconds[f"{c.dataset}/{c.model}"]
    sgd = costs.step_seconds.get(step_kind(dataclasses.replace(c, optimizer="sgd")), 0.0)
    seconds = 0.0
    warm = warmup_kind(c)
    for epoch in range(epochs_done, c.epochs):
        kind = warm if warm is not None and epoch < c.hero_warmup_epochs else step_kind(c)
        seconds += steps * costs.step_seconds[kind] + fwd * n_test / 1000
        seconds += 3 * sgd * (getattr(c, "record_hz", None) or 0)
    if c.epochs > epochs_done:
        seconds += CELL_FIXED_SECONDS
    if cell.validation is not None and not validated:
        seconds += fwd * (cell.validation[1] - cell.validation[0]) / 1000 + CELL_FIXED_SECONDS
    left = [s for s in cell.ptq_schemes if s not in schemes_done] if cell.ptq else []
    if left:
        ptq_test = min(cell.ptq_limit_test or shape.test, shape.test)
        v = PTQ_VALIDATE
        extra = v["unoptimized_samples"] + v["latency_batch"] * v["latency_repeats"]
        per_variant = fwd * (2 * ptq_test + extra) / 1000 + PTQ_FIXED_SECONDS
        seconds += len(left) * ((len(PTQ_BITS) + 1) * per_variant + CELL_FIXED_SECONDS)
    return seconds


def split_into_pieces(seconds: list[float], budget: float) -> list[list[int]]:
    """Consecutive cells (by index) grouped greedily into pieces of at most `budget` seconds, as the
    driver's budget rule runs them (a cell longer than the budget is a piece of its own)."""
    pieces: list[list[int]] = []
    used = budget
    for i, s in enumerate(seconds):
        if not pieces or used + s > budget:
            pieces.append([])
            used = 0.0
        pieces[-1].append(i)
        used += s
    return pieces


def run_command(command, prog: str) -> None:
    """Run a click command from the shell: a HeroError is one line `prog: message` on stderr, exit 2."""
    import click

    from exporters.device.errors import HeroError

    try:
        command.main(standalone_mode=False)
    except HeroError as exc:
        click.echo(f"{prog}: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
