"""Data-parallel training under torchrun: process group, per-rank device, batch shards, rank 0.

torchrun starts one process per GPU and hands each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (torch.distributed.run docs, "Environment variables"); ``process_group`` reads them,
initialises NCCL on CUDA or Gloo on CPU, and yields a ``Replica`` saying who this process is.
Without those variables it yields the single process, so ``hero train`` runs unchanged both ways.

``--batch-size`` is the *global* batch: every rank draws the same shuffled order (one seed),
augments the same global batch and keeps its rows ``rank::world_size`` (DistributedSampler's
split), so N ranks see exactly the samples one process would and the LR recipe is unchanged.

DDP and HERO. DDP reduces gradients in hooks that fire when ``backward()`` accumulates into
``.grad``; it "doesn't work with torch.autograd.grad" (DistributedDataParallel docs), which is how
HERO, FirstOrder and GradL1 take every gradient, averaging each across ranks themselves
(``hero_train.optim._all_average``). Their steps therefore run inside ``reducer_off``, DDP's
``no_sync()``: the reducer neither prepares for a reduction nor broadcasts buffers on each of the
step's forward passes. (In torch 2.13 a sync-mode forward followed by ``autograd.grad`` only also
works, as no hook fires, but with ``find_unused_parameters=True`` and an unused parameter it fails
the next forward with "Expected to have finished reduction in the prior iteration".) Plain SGD
calls ``backward()`` and takes DDP's usual path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from exporters.device.errors import HeroError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Replica:
    """One training process: its global rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes the checkpoint and metrics."""
        return self.rank == 0

    def rows(self, n: int) -> torch.Tensor:
        """This rank's rows of a global batch of n: ``rank::world_size`` of 0..n-1 after padding.

        As torch's DistributedSampler (drop_last=False) does, a batch whose size is not a multiple
        of world_size is padded by repeating its first rows, so every rank holds the same number
        of samples and the average of the ranks' mean losses is the global batch's mean loss.
        """
        padded = -(-n // self.world_size) * self.world_size
        return (torch.arange(padded) % n)[self.rank :: self.world_size]


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of one rank: ``cuda`` means cuda:LOCAL_RANK, one GPU per process."""
    if device.startswith("cuda:") and world_size > 1:
        raise HeroError(f"--device {device} names one GPU, but {world_size} processes run: "
                        "pass --device cuda and each rank takes cuda:LOCAL_RANK")
    if device == "cuda":
        if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
            raise HeroError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                            "give torchrun --nproc-per-node no more than the GPUs per node")
        return f"cuda:{local_rank}"
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Replica]:
    """The process group for one training run, as torchrun describes it in the environment.

    Yields the single process when torchrun did not start this one. A group that is already up
    (a caller initialised it) is used as it is and left up; one made here is torn down on exit.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        yield Replica(dist.get_rank(), world, rank_device(device, local_rank, world))
        return
    if not launched_by_torchrun():
        yield Replica(device=device)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rank_dev = rank_device(device, local_rank, world)
    on_cuda = rank_dev.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(rank_dev)
    dist.init_process_group("nccl" if on_cuda else "gloo",
                            device_id=torch.device(rank_dev) if on_cuda else None)
    try:
        yield Replica(rank, world, rank_dev)
    finally:
        dist.destroy_process_group()


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_batch_size(batch_size: int, replica: Replica) -> int:
    """Each rank's share of the global ``--batch-size``; it must split evenly."""
    if batch_size % replica.world_size:
        raise HeroError(f"--batch-size {batch_size} is the global batch and must split evenly over "
                        f"{replica.world_size} processes: use a multiple of {replica.world_size}")
    return batch_size // replica.world_size


def wrap(model: torch.nn.Module, replica: Replica) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when a process group is up, else ``model``.

    Constructing DDP broadcasts rank 0's parameters and buffers, so every rank starts equal.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    on_cuda = replica.device.startswith("cuda")
    return DistributedDataParallel(model, device_ids=[torch.device(replica.device)] if on_cuda else None)


def reducer_off(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` for a DDP module (see the module docstring for why), else nothing."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def all_sum(values: list[float], replica: Replica) -> list[float]:
    """Element-wise sum over ranks (the epoch's loss and accuracy counts); local without a group."""
    if not _group_up():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=replica.device)
    dist.all_reduce(total)
    return total.tolist()


def on_main(fn: Callable[[], T], replica: Replica) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its HeroError, to every rank.

    For what needs the output folder (which on several nodes may live on rank 0's node alone):
    reading the checkpoint to resume, refusing to overwrite one. Every rank raising the same
    error keeps the others from waiting forever in their next collective.
    """
    result: list = [None, None]
    if replica.is_main:
        try:
            result = [fn(), None]
        except HeroError as exc:
            result = [None, str(exc)]
    if _group_up():
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise HeroError(result[1])
    return result[0]


def barrier() -> None:
    """Wait for every rank (so no rank returns before rank 0 has written the checkpoint)."""
    if _group_up():
        dist.barrier()
