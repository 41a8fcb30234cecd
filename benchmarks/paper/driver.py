"""Run the HERO paper's experiments as resumable cells (see ``plan.py`` for which cells and why).

Every cell trains with ``hero_train.train.train(config, <cell>/train, resume=True)`` (a finished
cell, whose checkpoint holds all its epochs, is skipped), is evaluated on its validation split
(training images it never trained on; ``<cell>/validation.json``) and then, unless it only feeds
the label-noise table, runs the real deploy pipeline on the final checkpoint once per PTQ scheme
(``pipeline.run.run_pipeline`` into ``<cell>/ptq/<scheme>``: fp32 and 8..2-bit ONNX artifacts, each
validated in ONNX Runtime; cached per stage). A scheme whose report belongs to the checkpoint is
not run again, so adding a scheme re-runs only its PTQ. An invocation starts no cell that its
measured cost estimate says would end past ``--budget-minutes``, so each invocation is a resumable
piece; it prints what remains. A finished cell's result files are copied into the committed
``archive/`` (see ``archive.py``), so a fresh machine counts it as done and does not train it again.

    python benchmarks/paper/driver.py --dry-run                  # the plan and its time estimate
    python benchmarks/paper/driver.py --budget-minutes 55        # one piece; repeat until done
    python benchmarks/paper/aggregate.py                         # tables, figures, RESULTS.md
    python benchmarks/paper/driver.py --scale full --device cuda --budget-minutes 600

The estimate comes from the step cost measured at the start of each invocation (three interleaved
rounds of one optimizer step of every method in the plan on random data of the plan's shape, and
an eval forward pass), rescaled during the run by how long the finished cells really took.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes benchmarks.paper importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import click
import torch
import torch.nn.functional as F

from benchmarks.paper import archive as K
from benchmarks.paper import plan as P
from exporters.device.errors import HeroError
from exporters.device.files import sha256_file, write_atomic
from hero_train.allocator import keep_freed_memory
from hero_train.checkpoint import training_state
from hero_train.data import DATASETS
from hero_train.models import build_model
from hero_train.config import TrainConfig
from hero_train.train import CHECKPOINT, make_optimizer, take_step, train

DEFAULT_OUT = Path(__file__).resolve().parent / "runs"
PLAN_FILE = "plan.json"
INVOCATIONS_FILE = "invocations.jsonl"
COSTS_FILE = "step_costs.json"
TIMING_FILE = "timing.json"


# --------------------------------------------------------------------------- cost measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model_and_batch(config: TrainConfig, n: int):
    shape = P.DATA_SHAPES[config.dataset]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(config.model, num_classes=DATASETS[config.dataset].num_classes, in_channels=shape.image[0])
    x = torch.randn((n, *shape.image), generator=gen).to(config.device)
    y = torch.randint(0, DATASETS[config.dataset].num_classes, (n,), generator=gen).to(config.device)
    return model.to(config.device), x, y


def make_stepper(config: TrainConfig):
    """A zero-argument callable: one optimizer step of `config` on random data of its shape."""
    model, x, y = _model_and_batch(config, config.batch_size)
    model.train()
    optimizer = make_optimizer(config, model)

    def closure():
        return F.cross_entropy(model(x), y)

    return lambda: take_step(optimizer, closure, model)


def make_forward(config: TrainConfig):
    """A zero-argument callable: an eval-mode forward pass over 500 images."""
    model, x, _ = _model_and_batch(config, 500)
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    return forward


def time_round_robin(calls: dict[str, callable], rounds: int, device: str) -> dict[str, float]:
    """Fastest seconds of each call over `rounds` rounds of one call each, after one warm-up round.
    Interleaving spreads a burst of load from other processes over all calls, and the fastest
    round is the cost on an otherwise idle machine."""
    for call in calls.values():
        call()
    best = {key: float("inf") for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            _sync(device)
            began = time.perf_counter()
            call()
            _sync(device)
            best[key] = min(best[key], time.perf_counter() - began)
    return best


def measure_costs(cells: list[P.Cell], rounds: int = 3) -> P.Costs:
    """Time every step kind the cells use (their own, HERO's warm-up, SGD's for the ||Hz|| estimate)
    and the eval forward pass of every dataset/model."""
    kinds: dict[str, TrainConfig] = {}
    forwards: dict[str, TrainConfig] = {}
    for cell in cells:
        c = cell.config
        needed = [c, dataclasses.replace(c, optimizer="sgd")]
        if P.warmup_kind(c) is not None:
            needed.append(dataclasses.replace(c, optimizer="first-order"))
        for config in needed:
            kinds.setdefault(P.step_kind(config), config)
        forwards.setdefault(f"{c.dataset}/{c.model}", c)
    device = cells[0].config.device if cells else "cpu"
    calls = {kind: make_stepper(config) for kind, config in kinds.items()}
    calls.update({f"forward:{key}": make_forward(config) for key, config in forwards.items()})
    best = time_round_robin(calls, rounds, device)
    return P.Costs({k: best[k] for k in kinds}, {k: 2 * best[f"forward:{k}"] for k in forwards})


# --------------------------------------------------------------------------- cells


VALIDATION_FILE = "validation.json"


@dataclass(frozen=True)
class CellStatus:
    epochs_done: int
    schemes_done: tuple[str, ...] = ()  # PTQ schemes whose report belongs to the final checkpoint
    validated: bool = False

    def done(self, cell: P.Cell) -> bool:
        return (self.epochs_done >= cell.config.epochs
                and (not cell.ptq or set(cell.ptq_schemes) <= set(self.schemes_done))
                and (cell.validation is None or self.validated))


def checkpoint_path(cell: P.Cell, out_root: Path) -> Path:
    return out_root / cell.name / "train" / CHECKPOINT


def _belongs(path: Path, sha: str) -> bool:
    """Whether a JSON file with meta.checkpoint_sha256 (or checkpoint_sha256) was made from `sha`."""
    if not path.is_file():
        return False
    doc = json.loads(path.read_text())
    return doc.get("meta", doc).get("checkpoint_sha256") == sha


def kept_status(cell: P.Cell, kept_root: Path) -> CellStatus:
    """A cell's status from its kept copy (archive.py): done when the copy covers everything the cell
    plans; otherwise nothing (its checkpoint is not kept, so it trains again)."""
    folder = kept_root / cell.name
    rec = K.record(folder)
    if rec is None:
        return CellStatus(0)
    schemes = tuple(s for s in cell.ptq_schemes
                    if _belongs(folder / "ptq" / P.scheme_dir(s) / "report.json", rec["sha256"]))
    status = CellStatus(int(rec["epoch"]), schemes, _belongs(folder / VALIDATION_FILE, rec["sha256"]))
    return status if status.done(cell) else CellStatus(0)


def cell_status(cell: P.Cell, out_root: Path, kept_root: Path | None = None) -> CellStatus:
    """How far a cell got: the epochs its checkpoint holds, and which PTQ schemes and whether the
    validation evaluation belong to that checkpoint. Without a checkpoint in `out_root`, a kept copy
    under `kept_root` that covers the whole cell counts as done."""
    ckpt = checkpoint_path(cell, out_root)
    if not ckpt.is_file():
        return kept_status(cell, kept_root) if kept_root is not None else CellStatus(0)
    epochs = training_state(ckpt).epoch
    if epochs < cell.config.epochs:
        return CellStatus(epochs)
    sha = sha256_file(ckpt)
    folder = out_root / cell.name
    schemes = tuple(s for s in cell.ptq_schemes if _belongs(folder / "ptq" / P.scheme_dir(s) / "report.json", sha))
    return CellStatus(epochs, schemes, _belongs(folder / VALIDATION_FILE, sha))


def deploy_config(cell: P.Cell, scheme: str):
    """The deploy config of a cell's PTQ evaluation under one scheme: every bit width of Figure 1."""
    from pipeline.config import DeployConfig

    return DeployConfig.model_validate({
        "name": f"{cell.name.replace('/', '_')}_{P.scheme_dir(scheme)}",
        "data": {"root": cell.config.data_root, "limit_test": cell.ptq_limit_test},
        "quantize": {"bits": list(P.PTQ_BITS), "symmetric": True, **P.PTQ_SCHEMES[scheme]},
        "runtime": {"name": "onnxruntime"},
        "validate": dict(P.PTQ_VALIDATE),
    })


def validate_cell(cell: P.Cell, out_root: Path) -> dict:
    """Loss and accuracy of the final checkpoint (eval mode, no augmentation) on the cell's held-out
    training images [start, stop), written to <cell>/validation.json: what h and gamma are chosen on."""
    from hero_train import data as hdata
    from hero_train.checkpoint import load_deployable
    from hero_train.train import evaluate

    trained = load_deployable(checkpoint_path(cell, out_root))
    start, stop = cell.validation
    train_split = hdata.load_dataset(cell.config.dataset, "train", root=cell.config.data_root)
    if stop > len(train_split.labels):
        raise HeroError(f"{cell.name}: validation images {start}..{stop} exceed the {len(train_split.labels)} "
                        f"training images; lower the scale's validation or limit_train")
    images = hdata.normalize(train_split.images[start:stop], trained.input.mean, trained.input.std)
    loss, accuracy = evaluate(trained.model, images, train_split.labels[start:stop], device=cell.config.device)
    result = {"checkpoint_sha256": trained.sha256, "images": [start, stop], "loss": loss, "accuracy": accuracy}
    write_atomic(out_root / cell.name / VALIDATION_FILE, json.dumps(result, indent=1))
    return result


def machine() -> dict:
    return {"host": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_cell(cell: P.Cell, out_root: Path, log=print) -> CellStatus:
    """Train (or finish training) one cell, evaluate it on its validation split, then at every
    precision under each PTQ scheme not yet done; records wall times."""
    from pipeline.run import run_pipeline

    cell_dir = out_root / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(cell_dir / "cell.json", json.dumps(cell.to_dict(), indent=1))
    timing_path = cell_dir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    status = cell_status(cell, out_root)
    if status.epochs_done < cell.config.epochs:
        began = time.perf_counter()
        train(cell.config, cell_dir / "train", resume=True)
        timing["train_wall_seconds"] = timing.get("train_wall_seconds", 0.0) + time.perf_counter() - began
        status = cell_status(cell, out_root)
    if cell.validation is not None and not status.validated:
        validate_cell(cell, out_root)
    left = [s for s in cell.ptq_schemes if s not in status.schemes_done] if cell.ptq else []
    ptq_seconds = timing.get("ptq_wall_seconds", {})
    for scheme in left:
        began = time.perf_counter()
        run_pipeline(deploy_config(cell, scheme), cell_dir / "ptq" / P.scheme_dir(scheme),
                     checkpoint_path(cell, out_root), log=log)
        ptq_seconds[scheme] = ptq_seconds.get(scheme, 0.0) + time.perf_counter() - began
    timing["ptq_wall_seconds"] = ptq_seconds
    write_atomic(timing_path, json.dumps({**timing, "machine": machine()}, indent=1))
    return cell_status(cell, out_root)


def keep(cell: P.Cell, out_root: Path, kept_root: Path | None) -> None:
    """Copy a cell that finished on this machine, and the run's plan and logs, into `kept_root`."""
    status = cell_status(cell, out_root) if kept_root is not None else None
    if status is None or not status.done(cell):
        return
    K.keep_cell(out_root / cell.name, kept_root / cell.name, checkpoint_path(cell, out_root), status.epochs_done)
    K.keep_run(out_root, kept_root)


def run_plan(cells: list[P.Cell], out_root: Path, budget_seconds: float, costs: P.Costs,
             started: float | None = None, log=print, kept_root: Path | None = None) -> list[P.Cell]:
    """Run unfinished cells in order until the next one would end past the budget (the first
    unfinished cell always runs); returns the cells still unfinished. A cell finished here is copied
    into `kept_root` (archive.py); one kept there already counts as done.

    Estimates are rescaled by how long the cells run so far actually took against their estimates,
    so a machine busier (or idler) than during the step timing still keeps the piece in budget.
    """
    started = time.monotonic() if started is None else started
    ran, estimated, actual = 0, 0.0, 0.0
    for i, cell in enumerate(cells):
        status = cell_status(cell, out_root, kept_root)
        if status.done(cell):
            continue
        raw = P.estimate_cell_seconds(cell, costs, status.epochs_done, status.schemes_done, status.validated)
        estimate = raw * (actual / estimated if estimated > 0 else 1.0)
        elapsed = time.monotonic() - started
        if ran and elapsed + estimate > budget_seconds:
            log(f"budget: {elapsed / 60:.1f} min used; {cell.name} (~{estimate / 60:.1f} min) would end past "
                f"{budget_seconds / 60:.0f} min, so this piece stops here")
            break
        log(f"=== [{i + 1}/{len(cells)}] {cell.name} (priority {cell.priority}; ~{estimate / 60:.1f} min; "
            f"feeds {', '.join(cell.tables)})")
        began = time.monotonic()
        run_cell(cell, out_root, log)
        keep(cell, out_root, kept_root)
        estimated, actual, ran = estimated + raw, actual + time.monotonic() - began, ran + 1
    return [c for c in cells if not cell_status(c, out_root, kept_root).done(c)]


# --------------------------------------------------------------------------- printing


def plan_lines(cells: list[P.Cell], out_root: Path, costs: P.Costs, budget_seconds: float,
               kept_root: Path | None = None) -> list[str]:
    """The plan as a table (status and estimated minutes per cell), its total and its pieces."""
    lines = [f"{'#':>3} {'prio':>4} {'status':<10} {'est min':>7}  {'cell':<66} feeds"]
    todo, estimates = [], []
    for i, cell in enumerate(cells):
        status = cell_status(cell, out_root, kept_root)
        est = 0.0 if status.done(cell) else P.estimate_cell_seconds(cell, costs, status.epochs_done,
                                                                    status.schemes_done, status.validated)
        label = ("done" if status.done(cell) else
                 f"PTQ {len(status.schemes_done)}/{len(cell.ptq_schemes)}" if status.epochs_done >= cell.config.epochs
                 else f"{status.epochs_done}/{cell.config.epochs} ep" if status.epochs_done else "pending")
        lines.append(f"{i + 1:>3} {cell.priority:>4} {label:<10} {est / 60:>7.1f}  {cell.name:<66} "
                     f"{','.join(cell.tables)}")
        if est > 0:
            todo.append(i + 1)
            estimates.append(est)
    total = sum(estimates)
    lines.append(f"remaining: {len(todo)} of {len(cells)} cells, about {total / 60:.0f} min "
                 f"({total / 3600:.2f} h) at the measured step cost")
    for n, piece in enumerate(P.split_into_pieces(estimates, budget_seconds), 1):
        minutes = sum(estimates[j] for j in piece) / 60
        lines.append(f"  piece {n}: cells {todo[piece[0]]}-{todo[piece[-1]]} (~{minutes:.0f} min)")
    return lines


def cost_lines(costs: P.Costs) -> list[str]:
    lines = ["measured cost (fastest of 3 interleaved rounds after a warm-up round; random data of the plan's "
             "shape; on a shared machine the real runs are slower by the load):"]
    for kind, seconds in costs.step_seconds.items():
        sgd = costs.step_seconds.get("/".join(kind.split("/")[:3] + ["sgd"]))
        ratio = f"  ({seconds / sgd:.2f}x SGD)" if sgd else ""
        lines.append(f"  {kind:<58} {seconds:7.3f} s/step{ratio}")
    for key, seconds in costs.forward_1000_seconds.items():
        lines.append(f"  {key + ' eval forward':<58} {seconds:7.3f} s/1000 images")
    return lines


def merged_costs(*documents: dict) -> dict:
    """step_costs.json documents merged, each later one's measurements over the earlier ones': an
    invocation run with --match measures only its own cells' variants, and must not drop the others'."""
    merged: dict = {"step_seconds": {}, "forward_1000_seconds": {}}
    for doc in documents:
        merged["measured"] = doc["measured"]
        for key in ("step_seconds", "forward_1000_seconds"):
            merged[key].update(doc.get(key, {}))
    return merged


def write_plan(scale: P.Scale, cells: list[P.Cell], out_root: Path, costs: P.Costs,
               kept_root: Path | None = None) -> None:
    """plan.json (the scale and every cell) and step_costs.json (the step costs measured now over
    the earlier ones kept and here: the comparable training cost of the variants table), for aggregate.py."""
    write_atomic(out_root / PLAN_FILE, json.dumps(P.plan_document(scale, cells), indent=1))
    measured = dict(measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **dataclasses.asdict(costs))
    roots = ([kept_root] if kept_root is not None else []) + [out_root]
    earlier = [json.loads((r / COSTS_FILE).read_text()) for r in roots if (r / COSTS_FILE).is_file()]
    write_atomic(out_root / COSTS_FILE, json.dumps(merged_costs(*earlier, measured), indent=1))


def log_invocation(out_root: Path, record: dict) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    with (out_root / INVOCATIONS_FILE).open("a") as fh:
        fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- CLI


def make_scale(name: str, device: str | None, gamma: float | None, epochs: int | None, noise_epochs: int | None,
               limit_train: int | None, data_root: str | None) -> P.Scale:
    """A preset with the command line's overrides applied."""
    overrides = dict(device=device, gamma=gamma, epochs=epochs, noise_epochs=noise_epochs,
                     limit_train=limit_train, data_root=data_root)
    scale = dataclasses.replace(P.SCALES[name], **{k: v for k, v in overrides.items() if v is not None})
    if gamma is not None and gamma not in scale.gamma_grid:
        scale = dataclasses.replace(scale, gamma_grid=tuple(sorted(scale.gamma_grid + (gamma,))))
    return scale


def parse_only(text: str | None) -> tuple[str, ...]:
    names = tuple(t.strip() for t in (text or "").split(",") if t.strip())
    unknown = [n for n in names if n not in P.TABLES]
    if unknown:
        raise HeroError(f"--only {','.join(unknown)}: not a table or figure; choose from {','.join(P.TABLES)}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scale", "scale_name", type=click.Choice(sorted(P.SCALES)), default="small", show_default=True)
@click.option("--only", default=None, help=f"comma-separated subset of {','.join(P.TABLES)}")
@click.option("--match", "matches", multiple=True,
              help="only the cells whose name contains this text (repeatable; in this order): "
                   "split the plan between processes, or run the most wanted cells first")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="runs go to OUT/SCALE/<cell>")
@click.option("--archive", type=click.Path(path_type=Path), default=K.ARCHIVE, show_default=True,
              help="finished cells are kept in ARCHIVE/SCALE (committed) and count as done on any machine")
@click.option("--budget-minutes", type=float, default=55.0, show_default=True,
              help="start no cell estimated to end past this many minutes")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="default: the scale's")
@click.option("--gamma", type=float, default=None, help="HERO's gamma outside the grid (default: the scale's)")
@click.option("--epochs", type=int, default=None, help="override the scale's epochs (clean labels)")
@click.option("--noise-epochs", type=int, default=None, help="override the scale's epochs under label noise")
@click.option("--limit-train", type=int, default=None, help="override the scale's training subset")
@click.option("--data-root", default=None, help="folder holding the datasets (default: hero_train's search)")
@click.option("--dry-run", is_flag=True, help="print the plan and the time estimate; train nothing")
def main(scale_name, only, matches, out, archive, budget_minutes, device, gamma, epochs, noise_epochs, limit_train, data_root,
         dry_run):
    """Train and evaluate the cells of the HERO paper's tables and figures, in priority order."""
    started = time.monotonic()
    if (device or P.SCALES[scale_name].device).startswith("cuda") and not torch.cuda.is_available():
        raise HeroError("this scale runs on --device cuda, but this torch has no CUDA device: "
                        "pass --device cpu to run it here")
    scale = make_scale(scale_name, device, gamma, epochs, noise_epochs, limit_train, data_root)
    cells = P.select(P.build_plan(scale), parse_only(only))
    if matches:
        cells = P.match(cells, matches)
        if not cells:
            raise HeroError(f"--match {' '.join(matches)}: no cell of the plan has that in its name")
    out_root, kept_root = out / scale.name, archive / scale.name
    click.echo(f"scale {scale.name}: {len(cells)} cells; measuring the step cost ...")
    if scale.device == "cpu":
        keep_freed_memory()  # as hero_train.train.train calls it: measure what the cells will run
    costs = measure_costs(cells)
    click.echo("\n".join(cost_lines(costs)))
    click.echo("\n".join(plan_lines(cells, out_root, costs, budget_minutes * 60, kept_root)))
    if dry_run:
        return
    write_plan(scale, P.build_plan(scale), out_root, costs, kept_root)
    for cell in P.build_plan(scale):  # cells finished here by an earlier invocation, not yet kept
        if not (kept_root / cell.name / K.RECORD).is_file():
            keep(cell, out_root, kept_root)
    began = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    remaining = run_plan(cells, out_root, budget_minutes * 60, costs, started, kept_root=kept_root)
    log_invocation(out_root, {"argv": sys.argv[1:], "started": began, "minutes": (time.monotonic() - started) / 60,
                              "remaining": len(remaining), "machine": machine()})
    K.keep_run(out_root, kept_root)
    if remaining:
        click.echo(f"{len(remaining)} cells remain; run the same command again to continue:")
        click.echo("\n".join(plan_lines(remaining, out_root, costs, budget_minutes * 60, kept_root)))
    else:
        click.echo(f"every cell is done: python benchmarks/paper/aggregate.py --scale {scale.name} --out {out}")


if __name__ == "__main__":
    P.run_command(main, "driver")
