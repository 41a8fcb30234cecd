"""The training loop behind ``hero train``: one config in, a checkpoint and metrics out.

Per epoch it writes one JSON line to ``metrics.jsonl`` and an atomic ``checkpoint.pt``; ``resume``
continues from that checkpoint. The batch order and augmentation of epoch k come from a generator
seeded by (seed, k), and the checkpoint holds the optimizer and scheduler state, so a resumed run
ends with the same weights as an uninterrupted one.

Under torchrun the same loop runs on every rank (see ``hero_train.distributed``): the model is
wrapped in DDP, each rank trains on its rows of every global batch, and rank 0 alone evaluates,
logs and writes the checkpoint (of the unwrapped model) and the metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from exporters.device.errors import HeroError
from exporters.device.files import make_dirs
from hero_train import data as hdata
from hero_train import distributed
from hero_train import images as images_lib
from hero_train.allocator import keep_freed_memory
from hero_train.checkpoint import TrainingState, first_nonfinite, save_checkpoint, training_state
from hero_train.hessian import record_hz_norm
from hero_train.models import create_model
from hero_train.config import TrainConfig
from hero_train.optim import HERO, FirstOrder, GradL1

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer by name; every one steps SGD with the paper's momentum and weight decay."""
    base = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **base)
    if config.optimizer == "first-order":
        return FirstOrder(params, torch.optim.SGD, h=config.h, variant=config.variant, model=model, **base)
    if config.optimizer == "gradl1":
        return GradL1(params, torch.optim.SGD, lam=config.lam, hvp=config.hvp, model=model, **base)
    return HERO(params, torch.optim.SGD, h=config.h, gamma=config.gamma, variant=config.variant,
                hvp=config.hvp, model=model, **base)


def take_step(optimizer: torch.optim.Optimizer, closure, model: torch.nn.Module | None = None) -> torch.Tensor:
    """One step of any optimizer here: wrappers take the closure, plain SGD backpropagates.

    The wrappers average their own gradients over ranks, so DDP's reducer stays off for them.
    """
    if isinstance(optimizer, (HERO, GradL1)):
        with distributed.reducer_off(model):
            return optimizer.step(closure)
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    optimizer.step()
    return loss.detach()


def prepare_data(config: TrainConfig):
    """Normalised float tensors for train and test (normalised once, augmented per batch); a
    training folder too large to decode into memory stays a StreamedSplit, read batch by batch."""
    shape = dict(channels=config.channels, image_size=config.image_size)
    train = hdata.load_dataset(config.dataset, "train", root=config.data_root, stream=True, **shape)
    test = hdata.load_dataset(config.dataset, "test", root=config.data_root, limit=config.limit_test, **shape)
    images, labels = train.images, train.labels
    if config.limit_train is not None:
        images, labels = images[: config.limit_train], labels[: config.limit_train]
    if config.label_noise > 0:
        labels = hdata.add_label_noise(labels, config.label_noise, train.num_classes, config.seed)
    test_images, test_labels = test.images, test.labels
    if config.limit_test is not None:
        test_images, test_labels = test_images[: config.limit_test], test_labels[: config.limit_test]
    norm = lambda x: hdata.normalize(x, train.mean, train.std)  # noqa: E731
    if isinstance(train, hdata.StreamedSplit):  # decoded and normalised batch by batch
        return train, (train, labels), (norm(test_images), test_labels)
    return train, (norm(images), labels), (norm(test_images), test_labels)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: str = "cpu", batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of the model in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x).float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(labels), 1)
    return total_loss / n, correct / n


def _autocast(config: TrainConfig):
    if config.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model, optimizer, train_data, config: TrainConfig, epoch: int,
                    replica: distributed.Replica | None = None, custom: bool = False) -> dict:
    """One epoch; `custom` data (a folder or .npz) trains with random-resized-crop + flip, the
    built-in datasets with 4-pixel crop + flip."""
    replica = replica or distributed.Replica(device=config.device)
    images, labels = train_data
    gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    if isinstance(optimizer, HERO):
        optimizer.penalty_enabled = epoch >= config.hero_warmup_epochs
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    batches = list(hdata.iterate_batches(len(labels), config.batch_size, shuffle=True, generator=gen))
    bar = tqdm(batches, total=math.ceil(len(labels) / config.batch_size), leave=False,
               desc=f"epoch {epoch + 1}/{config.epochs}", disable=None if replica.is_main else True)
    streamed = _streamed(images, batches, replica) if isinstance(images, hdata.StreamedSplit) else None
    for step, idx in enumerate(bar, 1):
        rows = replica.rows(len(idx))  # this rank's share of the global batch
        if streamed is not None:  # only this rank's rows are decoded (by DataLoader workers)
            x = hdata.normalize(next(streamed)[0], images.mean, images.std)
            x = images_lib.random_resized_crop_flip(x, gen) if config.augment else x
        else:
            x = images[idx]
            if config.augment:  # the global batch augmented as one
                x = images_lib.random_resized_crop_flip(x, gen) if custom else hdata.augment(x, gen)
            x = x[rows]
        x, y = x.to(replica.device), labels[idx[rows]].to(replica.device)
        outputs = []

        def closure():
            with _autocast(config):
                logits = model(x)
            outputs.append(logits.detach())
            return F.cross_entropy(logits.float(), y)

        loss = take_step(optimizer, closure, model)
        _check_finite(loss, model, config, epoch, step)
        seen += len(y)
        loss_sum += float(loss) * len(y)
        correct += int((outputs[0].argmax(1) == y).sum())
        bar.set_postfix(loss=f"{float(loss):.3f}")
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], replica)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def diverged(epoch: int, step: int | None, what: str, config: TrainConfig) -> HeroError:
    where = f"epoch {epoch + 1}" + (f", step {step}" if step is not None else "")
    return HeroError(f"training diverged at {where}: {what}; lower --lr (now {config.lr:g}) or try another "
                     "optimizer (the last good checkpoint, if any, is kept)")


def _check_finite(loss: torch.Tensor, model: torch.nn.Module, config: TrainConfig, epoch: int, step: int) -> None:
    """Stop a diverged run before anything of it is saved: a non-finite loss, or non-finite weights
    after the step (one fused norm per step; the loss is synced for the progress bar anyway). Every
    rank stops at the same step: the weights are the same on all of them after the all-reduce."""
    value = float(loss)
    if not math.isfinite(value):
        raise diverged(epoch, step, f"loss is {value}", config)
    if bool(torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()]))).all()):
        return
    bad = first_nonfinite({name: p.detach() for name, p in model.named_parameters()})
    if bad is not None:  # None: finite weights so large that a norm overflows; the loss will say it
        raise diverged(epoch, step, f"weight {bad.removeprefix('module.')} is not finite", config)


def _streamed(split: hdata.StreamedSplit, batches, replica: distributed.Replica):
    """Decoded batches of this rank's rows of each global batch of `batches`, in order (the same
    sharding as the in-memory path, with a batch sampler instead of a DistributedSampler)."""
    return iter(split.loader([idx[replica.rows(len(idx))].tolist() for idx in batches]))


METHOD_OPTIONS = {"sgd": set(), "first-order": {"h", "variant"}, "gradl1": {"lam", "hvp"},
                  "hero": {"h", "gamma", "variant", "hvp", "hero_warmup_epochs"}}


def unused_options(optimizer: str) -> set[str]:
    """The method options `optimizer` never reads: they may differ when a run is resumed."""
    return set().union(*METHOD_OPTIONS.values()) - METHOD_OPTIONS[optimizer]


def _resume_state(out_dir: Path, config: TrainConfig) -> TrainingState | None:
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    state = training_state(path)
    old = state.config
    inert = {"epochs"} | unused_options(config.optimizer)
    differ = [k for k, v in config.to_dict().items() if k not in inert and old.get(k) != v]
    if differ:
        raise HeroError(f"cannot resume {path}: the config differs in {', '.join(differ)}; "
                        "use the same options or another --out directory")
    if old.get("epochs") != config.epochs:
        raise HeroError(f"cannot resume {path}: it was trained for {old.get('epochs')} epochs "
                        f"(the cosine schedule depends on it), not {config.epochs}")
    return state


def _prepare_out_dir(out_dir: Path, config: TrainConfig, resume: bool) -> TrainingState | None:
    """The output folder's side of a start: refuse to overwrite a run, read the checkpoint to resume
    (returned, or None), and keep exactly the metrics lines of the epochs that checkpoint holds."""
    make_dirs(out_dir)
    state = _resume_state(out_dir, config) if resume else None
    if not resume and (out_dir / CHECKPOINT).exists():
        raise HeroError(f"{out_dir / CHECKPOINT} exists: pass --resume to continue it or choose another --out")
    start = state.epoch if state is not None else 0
    metrics_path = out_dir / METRICS
    if metrics_path.exists():
        kept = [line for line in _metrics_lines(metrics_path) if json.loads(line)["epoch"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    return state


def _metrics_lines(path: Path) -> list[str]:
    """The lines of metrics.jsonl; a torn last line (a kill during its write) is dropped with a note
    on stderr, a broken line before it is a HeroError (the file was edited or damaged)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise HeroError(f"{path} line {i + 1} is not JSON: repair or delete the file to resume") from None
            print(f"hero: {path}: dropped a torn last line (the run was stopped while writing it)",
                  file=sys.stderr, flush=True)
            return lines[:-1]
    return lines


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False) -> Path:
    """Train a model; returns the path of the final checkpoint. Under torchrun, this rank's part."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise HeroError("--device cuda asked for, but this torch has no CUDA device")
    if config.device == "cpu":
        keep_freed_memory()  # faster CPU steps: no page faults on each step's activations (allocator.py)
    with distributed.process_group(config.device) as replica:
        return _train(config, Path(out_dir), resume, replica)


def _train(config: TrainConfig, out_dir: Path, resume: bool, replica: distributed.Replica) -> Path:
    distributed.local_batch_size(config.batch_size, replica)  # refuses a batch that does not split evenly
    state = distributed.on_main(lambda: _prepare_out_dir(out_dir, config, resume), replica)
    train_set, train_data, test_data = prepare_data(config)
    torch.manual_seed(config.seed)
    streamed = isinstance(train_set, hdata.StreamedSplit)
    sample_shape = list(train_set.images[0][0].shape if streamed else train_set.images.shape[1:])
    if streamed and config.record_hz:
        raise HeroError("--record-hz needs the training set in memory; this folder streams (see HERO_IN_MEMORY_BYTES)")
    in_channels = sample_shape[0]
    ref = config.model_ref()
    model = create_model(ref, num_classes=train_set.num_classes, in_channels=in_channels)
    if config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm
    model.to(replica.device)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    start = 0
    if state is not None:
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        start = state.epoch
    net = distributed.wrap(model, replica)  # DDP under torchrun; `model` stays the plain module
    payload = {
        "model": {**ref.to_dict(), "num_classes": train_set.num_classes, "in_channels": in_channels},
        "input_shape": sample_shape,
        "dataset": config.dataset, "classes": list(train_set.classes),
        "normalization": {"mean": list(train_set.mean), "std": list(train_set.std),
                          **({"samples": min(len(train_set), hdata.STATS_SAMPLES)} if train_set.custom else {})},
        "config": config.to_dict(),
    }
    if replica.is_main and state is None and config.epochs == 0:
        save_checkpoint(dict(payload, epoch=0, state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), metrics={}), out_dir / CHECKPOINT)
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        line = {"epoch": epoch + 1, **train_one_epoch(net, optimizer, train_data, config, epoch, replica,
                                                            custom=train_set.custom)}
        scheduler.step()
        bad = first_nonfinite(model.state_dict())
        if bad is not None:  # e.g. a BatchNorm running statistic: never saved, the last good checkpoint stays
            raise diverged(epoch, None, f"{bad} is not finite", config)
        if not replica.is_main:
            continue
        line["test_loss"], line["test_accuracy"] = evaluate(model, *test_data, device=replica.device)
        if config.record_hz:
            line["hz_norm"] = record_hz_norm(model, train_data, config, config.record_hz)
        line["seconds"] = round(time.perf_counter() - began, 3)
        with (out_dir / METRICS).open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(f"epoch {epoch + 1}/{config.epochs}: train loss {line['train_loss']:.4f} "
              f"acc {line['train_accuracy']:.4f} | test loss {line['test_loss']:.4f} "
              f"acc {line['test_accuracy']:.4f} | {line['seconds']:.1f}s", flush=True)
        save_checkpoint(dict(payload, epoch=epoch + 1, state_dict=model.state_dict(),
                             optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                             metrics=line), out_dir / CHECKPOINT)
    distributed.barrier()
    return out_dir / CHECKPOINT
