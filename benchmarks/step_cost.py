"""Cost of one optimizer step of HERO and its baselines, relative to plain SGD.

ResNet20 in train mode, batch 128 of random 3x32x32 images with random labels, cross-entropy,
base SGD with lr 0.1, momentum 0.9, weight decay 1e-4 (the paper's CIFAR-10 setting). The methods
run round-robin in one process (warm-up steps, then R rounds of one step of each method in turn),
so machine noise hits all of them alike; the table reports the median. One plain forward+backward
pass is timed in the same rounds, and each method gets a "floor": its k passes (sequential
forward+backward passes; for the exact methods, passes of convolution work) as a multiple of
SGD's step, the ratio it would have with no overhead. Peak memory is measured in
a fresh subprocess per method: on CPU the peak-RSS increase over the process after building the
model and data, on CUDA the peak of torch.cuda.max_memory_allocated over the same baseline.

    python benchmarks/step_cost.py --rounds 10 --warmup 2 --threads 2 --json step_cost.json
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import click
import torch
import torch.nn.functional as F

from hero_train.allocator import keep_freed_memory
from hero_train.models import build_model
from hero_train.optim import HERO, FirstOrder, GradL1

SGD_KWARGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
HERO_KWARGS = dict(h=0.5, gamma=0.1, variant="authors")
GRADL1_LAM = 0.01
MEMORY_PROBE_STEPS = 3
# (method, compared quantity, limit as a multiple of SGD's).
TARGETS = [
    ("hero-exact", "time", 4.0),
    ("hero-fd", "time", 2.6),
    ("hero-fd", "memory", 1.3),
]


def _optimizer(method: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if method == "sgd":
        return torch.optim.SGD(params, **SGD_KWARGS)
    if method == "first-order":
        return FirstOrder(params, torch.optim.SGD, h=HERO_KWARGS["h"], model=model, **SGD_KWARGS)
    if method.startswith("gradl1-"):
        hvp = "exact" if method == "gradl1-exact" else "finite-difference"
        return GradL1(params, torch.optim.SGD, lam=GRADL1_LAM, hvp=hvp, model=model, **SGD_KWARGS)
    hvp = "exact" if method == "hero-exact" else "finite-difference"
    return HERO(params, torch.optim.SGD, hvp=hvp, model=model, **HERO_KWARGS, **SGD_KWARGS)


METHODS = ("sgd", "first-order", "gradl1-exact", "gradl1-fd", "hero-exact", "hero-fd")
CLOCKS = ("wall", "cpu")
# One forward + backward (torch.autograd.grad over all parameters), no optimizer step: the unit
# the wrappers are made of. Timed beside the methods, so each method's floor (its number of
# sequential passes) can be read in the same run.
PASS = "fwd+bwd"
# Passes of convolution work: a double backward runs two forward and two backward convolutions per
# layer (hero_train/second_order.py), two passes' worth, on top of the pass that built its graph.
PASSES = {"sgd": 1, "first-order": 2, "gradl1-fd": 2, "hero-fd": 3, "gradl1-exact": 3, "hero-exact": 4}


def _make_step(method: str, device: str, batch_size: int):
    """A zero-argument callable running one training step of `method` on its own ResNet20."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).to(device).train()
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    opt = _optimizer(method, model)

    def closure():
        return F.cross_entropy(model(x), y)

    if method == PASS:
        params = list(model.parameters())

        def step():
            torch.autograd.grad(closure(), params)
    elif method == "sgd":
        def step():
            opt.zero_grad(set_to_none=True)
            closure().backward()
            opt.step()
    else:
        def step():
            opt.step(closure)
    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(device: str, batch_size: int, warmup: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per step of every method, one step each per round.

    CPU time is reported beside wall time because on a shared machine other processes stretch
    wall time but barely touch the CPU time this process spends.
    """
    steps = {m: _make_step(m, device, batch_size) for m in (*METHODS, PASS)}
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times = {clock: {m: [] for m in steps} for clock in CLOCKS}
    for _ in range(rounds):
        for m, step in steps.items():
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times["wall"][m].append(time.perf_counter() - wall)
            times["cpu"][m].append(time.process_time() - cpu)
    return times


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux's VmHWM belongs to this process image; ru_maxrss would carry the peak of the parent
    that forked us across exec, hiding every peak below it (getrusage(2), NOTES). ru_maxrss is the
    fallback elsewhere (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_probe(method: str, device: str, batch_size: int) -> int:
    """Peak bytes `method`'s steps add over the process with model, data and optimizer built."""
    step = _make_step(method, device, batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss_bytes()
    for _ in range(MEMORY_PROBE_STEPS):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_rss_bytes() - base


def _memory_in_subprocess(method: str, device: str, batch_size: int, threads: int | None) -> int:
    """Run memory_probe in a fresh interpreter, so no other method's allocations are counted."""
    cmd = [sys.executable, __file__, "--probe-memory", method, "--device", device,
           "--batch-size", str(batch_size)]
    if threads:
        cmd += ["--threads", str(threads)]
    # Large blocks through mmap go back to the OS when freed, so peak RSS tracks the peak of live
    # tensors rather than glibc's cache of freed blocks (mallopt(3), M_MMAP_THRESHOLD).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def summarise(times: dict[str, dict[str, list[float]]], memory: dict[str, int]) -> dict[str, dict]:
    """Median ms per step on each clock, ratios to SGD's medians and peak memory, per method.

    `wall_floor_ratio` is k × (median pass) / (median SGD step) for a method of k passes (PASSES):
    the ratio that method would have with no overhead at all.
    """
    pass_ratio = statistics.median(times["wall"][PASS]) / statistics.median(times["wall"]["sgd"])
    out = {}
    for m in times["wall"]:
        row = {}
        for clock in CLOCKS:
            ms = statistics.median(times[clock][m]) * 1e3
            row[f"{clock}_ms"] = ms
            row[f"{clock}_ratio"] = ms / (statistics.median(times[clock]["sgd"]) * 1e3)
        if m in PASSES:
            row["wall_floor_ratio"] = PASSES[m] * pass_ratio
        row.update(peak_bytes=memory.get(m), memory_ratio=memory[m] / memory["sgd"] if m in memory else None,
                   wall_samples_ms=[t * 1e3 for t in times["wall"][m]])
        out[m] = row
    return out


def check_targets(summary: dict[str, dict], clock: str) -> list[dict]:
    checks = []
    for method, quantity, limit in TARGETS:
        value = summary[method][f"{clock}_ratio" if quantity == "time" else "memory_ratio"]
        checks.append(dict(method=method, quantity=quantity if quantity == "memory" else f"{clock} time",
                           limit=limit, value=value, ok=value <= limit))
    return checks


def _print_table(summary: dict[str, dict], checks: list[dict], header: str) -> None:
    click.echo(header)
    click.echo(f"{'method':<14}{'wall ms':>9}{'x SGD':>7}{'floor':>7}{'cpu ms':>9}{'x SGD':>7}"
               f"{'peak MiB':>10}{'x SGD':>7}")
    for m, row in summary.items():
        floor = f"{row['wall_floor_ratio']:>7.2f}" if "wall_floor_ratio" in row else f"{'':>7}"
        mem = (f"{row['peak_bytes'] / 2**20:>10.1f}{row['memory_ratio']:>7.2f}"
               if row["peak_bytes"] is not None else "")
        click.echo(f"{m:<14}{row['wall_ms']:>9.0f}{row['wall_ratio']:>7.2f}{floor}{row['cpu_ms']:>9.0f}"
                   f"{row['cpu_ratio']:>7.2f}{mem}")
    click.echo(f"floor: the method's k {PASS} passes (exact HVP: passes of convolution work), no overhead, "
               "as a multiple of SGD's step in this run")
    click.echo("targets:")
    for c in checks:
        click.echo(f"  {c['method']} {c['quantity']} <= {c['limit']}x SGD: {c['value']:.2f}x "
                   f"{'PASS' if c['ok'] else 'FAIL'}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rounds", type=int, default=10, show_default=True, help="timed rounds (one step of each method per round)")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed rounds first")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
@click.option("--clock", type=click.Choice(CLOCKS), default="wall", show_default=True,
              help="which median the time targets are checked on (cpu: this process's CPU time)")
@click.option("--default-malloc", is_flag=True,
              help="time with glibc's default malloc settings instead of those `hero train` sets on CPU")
@click.option("--json", "json_out", default=None, help="also write the results to this JSON file")
@click.option("--probe-memory", default=None, hidden=True, help="internal: print one method's peak bytes")
def main(rounds, warmup, device, batch_size, threads, clock, default_malloc, json_out, probe_memory):
    """Time SGD, FirstOrder, GradL1 and HERO steps on ResNet20 and check HERO's cost targets."""
    if threads:
        torch.set_num_threads(threads)
    if probe_memory:
        click.echo(memory_probe(probe_memory, device, batch_size))
        return
    # As `hero train` and a training loop of your own do on CPU; True iff it is in force.
    kept = device == "cpu" and not default_malloc and keep_freed_memory()
    times = time_round_robin(device, batch_size, warmup, rounds)
    memory = {m: _memory_in_subprocess(m, device, batch_size, threads) for m in METHODS}
    summary = summarise(times, memory)
    checks = check_targets(summary, clock)
    header = (f"ResNet20, batch {batch_size}, {device}, {torch.get_num_threads()} threads, "
              f"{rounds} rounds after {warmup} warm-up, torch {torch.__version__}, "
              f"malloc {'keeps freed blocks (keep_freed_memory, as in hero train)' if kept else 'default'}")
    _print_table(summary, checks, header)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(header=header, methods=summary, targets=checks), f, indent=1)


if __name__ == "__main__":
    main()
