"""Can the image-folder input keep up with training? And what does streaming save in memory?

Throughput: an ImageFolder of JPEGs (generated: by default 2,000 train images of 40×40 RGB in 10
classes, smooth random colour fields plus noise, quality 90) is read through a DataLoader of
`hero_train.images.FolderImages` (Pillow decode, shorter side to 32, center crop) with 0, 1 and 2
worker processes, shuffled, batch 128; the main process then normalises each batch and applies
`random_resized_crop_flip`, as training would. Images/s is steady state: from the first batch
received (worker start-up excluded) to the end of the epoch. The same run times one training step
of ResNet20 at 32×32, batch 128, with SGD (lr 0.1, momentum 0.9) and with HERO (h 0.5, gamma 0.1)
on random data (median of --steps after --warmup; glibc malloc set as `hero train` sets it,
hero_train/allocator.py) and prints the loader's rate as a multiple of the rate each step
consumes: >= 1 means the loader is not the bottleneck. The two are measured apart; in real
training the workers and the step share the same cores.

Memory (--rss): peak resident set size, each in a fresh interpreter, of reading --rss-images
32×32 JPEGs once in batches of 256 (a) streamed through a FolderImages DataLoader (no workers)
and (b) by first decoding all of them into one uint8 tensor (`load_folder`) and then slicing it.
Peak RSS is /proc/self/status VmHWM (ru_maxrss where there is no /proc): ru_maxrss survives
execve, so a child started from this already-large process would report at least our size
(getrusage(2), NOTES). "over base" subtracts the probe's peak after imports and the folder scan.

    python benchmarks/data_throughput.py --threads 2 --rss
    python benchmarks/data_throughput.py --images 512 --steps 3 --rss --rss-images 4000   # quick
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hero_train.allocator import keep_freed_memory
from hero_train.data import normalize
from hero_train.images import FolderImages, channel_stats, load_folder, random_resized_crop_flip, scan_folder
from hero_train.models import build_model
from hero_train.optim import HERO
from step_cost import peak_rss_bytes  # a sibling script: run as python benchmarks/data_throughput.py

SIZE = 32  # the training input, as CIFAR
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # fixed: normalisation cost, not its values, matters


def make_jpeg_folder(root: Path, images: int, classes: int, side: int, seed: int = 0) -> Path:
    """ROOT/train/class_k/i.jpg: `images` JPEGs side×side, spread evenly over `classes` folders."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels = np.clip(field + rng.integers(-20, 21, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _ensure_folder(folder: str | None, images: int, classes: int, side: int, scratch: Path) -> Path:
    root = Path(folder) if folder else scratch
    if not (root / "train").is_dir():
        click.echo(f"writing {images} {side}x{side} JPEGs to {root} ...", err=True)
        make_jpeg_folder(root, images, classes, side)
    return root


def loader_rate(root: Path, workers: int, batch_size: int, epochs: int) -> float:
    """Steady-state images/s of decode + preprocess (workers) + normalise + crop/flip (main)."""
    data = FolderImages(scan_folder(root, "train"), 3, SIZE)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    augment_rng = torch.Generator().manual_seed(0)
    seen, start = 0, None
    for _ in range(epochs):
        for images, _labels in loader:
            x = random_resized_crop_flip(normalize(images, MEAN, STD), augment_rng)
            if start is None:  # the first batch carries worker start-up: the clock starts after it
                start = time.perf_counter()
                continue
            seen += len(x)
    if seen == 0:
        raise click.UsageError("one batch is all there is: give more --images or --epochs")
    return seen / (time.perf_counter() - start)


def step_rates(batch_size: int, warmup: int, steps: int) -> dict[str, float]:
    """Images/s one optimizer step consumes (median step time), ResNet20 at 32×32 on random data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(10, (batch_size,), generator=gen)
    rates = {}
    for method in ("SGD", "HERO"):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, in_channels=3).train()
        if method == "SGD":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        else:
            opt = HERO(model.parameters(), torch.optim.SGD, h=0.5, gamma=0.1, model=model, lr=0.1, momentum=0.9)

            def step():
                opt.step(lambda: F.cross_entropy(model(x), y))
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        rates[method] = batch_size / statistics.median(times)
    return rates


# --------------------------------------------------------------------------- memory


def memory_probe(mode: str, root: Path, batch_size: int) -> tuple[int, int]:
    """(peak after imports and the scan, peak after one pass over the data), bytes, this process."""
    index = scan_folder(root, "train")
    base = peak_rss_bytes()
    if mode == "streamed":
        loader = torch.utils.data.DataLoader(FolderImages(index, 3, SIZE), batch_size=batch_size)
        batches = (images for images, _labels in loader)
    else:
        everything, _labels = load_folder(index, 3, SIZE, batch_size=batch_size)
        batches = everything.split(batch_size)
    channel_stats(batches)  # one pass that reads every pixel
    return base, peak_rss_bytes()


def _rss_in_subprocess(mode: str, root: Path, batch_size: int) -> tuple[int, int]:
    cmd = [sys.executable, __file__, "--rss-probe", mode, "--rss-folder", str(root), "--rss-batch", str(batch_size)]
    # Large blocks through mmap go back to the OS when freed, so peak RSS follows live tensors
    # rather than glibc's cache of freed blocks (mallopt(3), M_MMAP_THRESHOLD), as in step_cost.py.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    base, peak = out.split()[-2:]
    return int(base), int(peak)


# --------------------------------------------------------------------------- CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--folder", default=None, help="ImageFolder to read (generated there if it has no train/)")
@click.option("--images", type=int, default=2000, show_default=True, help="train JPEGs to generate")
@click.option("--classes", type=int, default=10, show_default=True)
@click.option("--side", type=int, default=40, show_default=True, help="generated image side, pixels")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--workers", default="0,1,2", show_default=True, help="DataLoader worker counts to try")
@click.option("--epochs", type=int, default=1, show_default=True, help="loader passes per worker count")
@click.option("--steps", type=int, default=5, show_default=True, help="timed optimizer steps per method")
@click.option("--warmup", type=int, default=1, show_default=True, help="untimed optimizer steps first")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
@click.option("--rss", is_flag=True, help="also compare peak RSS of streamed vs in-memory reading")
@click.option("--rss-images", type=int, default=20000, show_default=True)
@click.option("--rss-batch", type=int, default=256, show_default=True)
@click.option("--rss-folder", default=None, help="ImageFolder of 32x32 JPEGs for --rss (generated if absent)")
@click.option("--rss-probe", type=click.Choice(["streamed", "in-memory"]), default=None, hidden=True,
              help="internal: print one mode's base and peak bytes")
def main(folder, images, classes, side, batch_size, workers, epochs, steps, warmup, threads, rss,
         rss_images, rss_batch, rss_folder, rss_probe):
    if threads:
        torch.set_num_threads(threads)
    if rss_probe:
        click.echo(" ".join(map(str, memory_probe(rss_probe, Path(rss_folder), rss_batch))))
        return
    keep_freed_memory()  # as `hero train` runs on CPU (hero_train/allocator.py)
    with tempfile.TemporaryDirectory(prefix="hero-data-") as scratch:
        root = _ensure_folder(folder, images, classes, side, Path(scratch) / "throughput")
        n = len(scan_folder(root, "train").files)
        steps_ips = step_rates(batch_size, warmup, steps)
        click.echo(f"{n} train JPEGs from {root}, -> {SIZE}x{SIZE}, batch {batch_size}, "
                   f"torch threads {torch.get_num_threads()}")
        click.echo(f"{'input / step':<26}{'images/s':>10}{'x SGD':>8}{'x HERO':>8}")
        for method, ips in steps_ips.items():
            click.echo(f"{'ResNet20 ' + method + ' step':<26}{ips:>10.0f}")
        for w in (int(v) for v in workers.split(",")):
            ips = loader_rate(root, w, batch_size, epochs)
            click.echo(f"{f'loader, {w} workers':<26}{ips:>10.0f}{ips / steps_ips['SGD']:>8.2f}"
                       f"{ips / steps_ips['HERO']:>8.2f}")
        if rss:
            rss_root = _ensure_folder(rss_folder, rss_images, classes, SIZE, Path(scratch) / "rss")
            n = len(scan_folder(rss_root, "train").files)
            data_mib = n * 3 * SIZE * SIZE / 2**20
            click.echo(f"\npeak RSS, one pass over {n} {SIZE}x{SIZE} JPEGs, batch {rss_batch} "
                       f"(the uint8 tensor alone: {data_mib:.0f} MiB)")
            click.echo(f"{'reading':<12}{'peak MiB':>10}{'over base':>11}")
            for mode in ("streamed", "in-memory"):
                base, peak = _rss_in_subprocess(mode, rss_root, rss_batch)
                click.echo(f"{mode:<12}{peak / 2**20:>10.0f}{(peak - base) / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
