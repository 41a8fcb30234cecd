"""Step time of HERO under DistributedDataParallel with 1 and 2 processes, and its communication share.

ResNet20 in train mode, a global batch of random 3x32x32 images with random labels (each of N ranks
takes batch/N), base SGD with lr 0.1, momentum 0.9, weight decay 1e-4. The ranks are spawned the way
torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) and run the
training loop's own pieces: ``hero_train.distributed.process_group`` (Gloo on CPU with ``--threads``
intra-op threads per process, NCCL on CUDA with one GPU per rank), ``distributed.wrap`` (DDP) and
``train.take_step``. After warm-up, each round takes one step of every variant in turn, so machine
noise hits all alike; the table reports rank 0's median.

Communication share of a step, two ways (2 processes):
- ``in all-reduce``: seconds inside ``torch.distributed.all_reduce`` over the step time. HERO and
  GradL1 communicate only there (their gradient averages; DDP's reducer is off for them). It also
  counts time spent waiting for the slower rank, so it is an upper bound on the transfer itself.
- ``vs skipped``: 1 - (step time with every all-reduce skipped) / (step time), the same step with
  the averaging (HERO) or DDP's bucket reduction (SGD, through a no-op comm hook) left out.

    python benchmarks/ddp_scaling.py --rounds 5 --warmup 2 --batch-size 64 --json ddp_scaling.json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hero_train import distributed
from hero_train.allocator import keep_freed_memory
from hero_train.models import build_model
from hero_train.config import TrainConfig
from hero_train.train import make_optimizer, take_step

METHODS = {
    "hero-exact": dict(optimizer="hero", hvp="exact"),
    "hero-fd": dict(optimizer="hero", hvp="finite-difference"),
    "sgd": dict(optimizer="sgd"),
}
WORLD_SIZES = (1, 2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class AllReduceMeter:
    """Stands in for torch.distributed.all_reduce: adds up the seconds inside it, or skips it."""

    def __init__(self, device: str):
        self.original = dist.all_reduce
        self.device = device
        self.seconds = 0.0
        self.skip = False

    def __call__(self, tensor, *args, **kwargs):
        if self.skip:
            return None
        _sync(self.device)
        start = time.perf_counter()
        work = self.original(tensor, *args, **kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return work


def _no_reduce(state, bucket):  # unannotated: DDP checks real annotations, and these would be strings
    """DDP comm hook that hands the local gradients back unreduced (the "skipped" variant)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _make_step(method: str, communicate: bool, replica: distributed.Replica, batch_size: int):
    """A zero-argument callable running one training step of `method` on this rank's share."""
    config = TrainConfig(model="resnet20", dataset="cifar10", batch_size=batch_size, lr=0.1, **METHODS[method])
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).to(replica.device).train()
    optimizer = make_optimizer(config, model)
    net = distributed.wrap(model, replica)
    if not communicate and method == "sgd":
        net.register_comm_hook(None, _no_reduce)
    local = distributed.local_batch_size(batch_size, replica)
    x = torch.randn(local, 3, 32, 32, device=replica.device)
    y = torch.randint(0, 10, (local,), device=replica.device)
    return lambda: take_step(optimizer, lambda: F.cross_entropy(net(x), y), net)


def _worker(rank: int, world: int, port: int, options: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(options["threads"])
    if options["device"] == "cpu":
        keep_freed_memory()  # as `hero train` runs each CPU rank
    with distributed.process_group(options["device"]) as replica:
        meter = AllReduceMeter(replica.device)
        dist.all_reduce = meter  # the optimizers look it up on the module at every call
        variants = [(m, c) for m in options["methods"] for c in ((True, False) if world > 1 else (True,))]
        steps = {v: _make_step(*v, replica, options["batch_size"]) for v in variants}
        seconds = {v: [] for v in variants}
        inside = {v: [] for v in variants}
        for round_ in range(options["warmup"] + options["rounds"]):
            for (method, communicate), step in steps.items():
                meter.skip, meter.seconds = not communicate, 0.0
                _sync(replica.device)
                start = time.perf_counter()
                step()
                _sync(replica.device)
                if round_ >= options["warmup"]:
                    seconds[method, communicate].append(time.perf_counter() - start)
                    inside[method, communicate].append(meter.seconds)
        if replica.is_main:
            rows = [dict(method=m, communicate=c, seconds=seconds[m, c], in_all_reduce=inside[m, c])
                    for m, c in variants]
            Path(out).write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, options: dict) -> list[dict]:
    """Spawn `world` ranks, time every variant, return rank 0's raw timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.start_processes(_worker, args=(world, _free_port(), options, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def summarise(raw: dict[int, list[dict]], methods: list[str]) -> list[dict]:
    """Median ms per step per world size, speed-up over one process, and the communication shares."""
    def median_ms(world, method, communicate=True, key="seconds"):
        row = next(r for r in raw[world] if r["method"] == method and r["communicate"] == communicate)
        return statistics.median(row[key]) * 1e3

    table = []
    for method in methods:
        one = median_ms(1, method)
        for world in WORLD_SIZES:
            ms = median_ms(world, method)
            row = dict(method=method, processes=world, median_ms=ms, speedup=one / ms)
            if world > 1:
                # DDP's reducer (SGD) all-reduces in C++, out of the meter's sight.
                reduces_itself = METHODS[method]["optimizer"] != "sgd"
                row["share_in_all_reduce"] = (median_ms(world, method, key="in_all_reduce") / ms
                                              if reduces_itself else None)
                row["share_vs_skipped"] = 1.0 - median_ms(world, method, communicate=False) / ms
            table.append(row)
    return table


def _print_table(table: list[dict], header: str) -> None:
    click.echo(header)
    click.echo(f"{'method':<12}{'procs':>6}{'median ms':>11}{'speed-up':>10}{'in all-reduce':>15}{'vs skipped':>12}")
    for r in table:
        inside, skipped = r.get("share_in_all_reduce"), r.get("share_vs_skipped")
        shares = (f"{100 * inside:>14.1f}%" if inside is not None else f"{'-':>15}")
        shares += f"{100 * skipped:>11.1f}%" if skipped is not None else f"{'-':>12}"
        click.echo(f"{r['method']:<12}{r['processes']:>6}{r['median_ms']:>11.1f}{r['speedup']:>9.2f}x{shares}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rounds", type=int, default=5, show_default=True, help="timed rounds (one step of each variant)")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed rounds first")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="global batch, split over the ranks")
@click.option("--threads", type=int, default=1, show_default=True, help="torch intra-op threads per process")
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--json", "json_out", default=None, help="also write the results to this JSON file")
def main(rounds, warmup, device, batch_size, threads, methods, json_out):
    """Time HERO and SGD steps under DDP with 1 and 2 processes; report the communication share."""
    methods = methods.split(",")
    options = dict(rounds=rounds, warmup=warmup, device=device, batch_size=batch_size, threads=threads,
                   methods=methods)
    raw = {world: run_world(world, options) for world in WORLD_SIZES}
    table = summarise(raw, methods)
    header = (f"ResNet20, global batch {batch_size}, {device}"
              f"{f', {threads} thread(s) per process' if device == 'cpu' else ', one GPU per process'}, "
              f"median of {rounds} steps on rank 0 (this machine: {os.cpu_count()} CPUs)")
    _print_table(table, header)
    if json_out:
        Path(json_out).write_text(json.dumps(dict(header=header, options=options, table=table, raw=raw), indent=2))


if __name__ == "__main__":
    main()
