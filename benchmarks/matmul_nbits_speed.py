"""Block-wise INT4 Linear weights on ONNX Runtime at batch 1: MatMulNBits against FP32 and against the
DequantizeLinear form, on a ViT-like model.

Model: a ViT-S/16-like classifier of our own (torchvision need not import): `--image` input (224:
196 tokens and a class token), 16x16 patches, width `--dim` 384, `--heads` 6, MLP 4x, `--depth` encoder blocks
(nn.MultiheadAttention, which hero decomposes into in_proj/out_proj Linear layers), 1000 classes,
random weights. Every Linear at 4 bits per block of `--block-size` inputs (`QuantSpec(bits=4,
block_size=...)`); the patch embedding conv per channel.

Artifacts and how ONNX Runtime (CPU, ORT_ENABLE_ALL, through `OnnxRuntimeRunner`) runs them:
- fp32: the float graph;
- dq int8 (folded): block-wise codes stored as INT8 read through DequantizeLinear-21; the runner
  folds them into float weights when the session is built, so it runs the FP32 kernels;
- dq int8 (runtime): the same file with the DequantizeLinear kept (weight_dequant "runtime"): the
  literal form, dequantizing every weight on every run;
- dq int4: codes stored as INT4; ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits;
- matmul_nbits: the graph written with com.microsoft MatMulNBits (`ExportOptions(matmul_nbits=True)`),
  accuracy_level 0: float32 activations, the emulation's arithmetic;
- matmul_nbits int8 compute (w4a8): `QuantSpec(bits=4, block_size=..., act_bits=8)`, written with
  accuracy_level 4: ONNX Runtime quantizes each activation block to int8 on the fly and runs int8
  dot products; the emulation quantizes the same blocks the same way (`exporters.grid.dynamic_block_qdq`).

Timing: every artifact round-robin at batch 1 (shuffled order per round, median latency over the
rounds) for each thread count; ratios to fp32 from the same run. Accuracy: each artifact's logits on
`--images` random images against its own spec's emulation (`quantize_model`): max |difference|
relative to the largest logit, and top-1 agreement. Session memory as `benchmarks/runtime_speed.py` measures it.

    python benchmarks/matmul_nbits_speed.py                     # depth 4, block 32, 1 and 2 threads
    python benchmarks/matmul_nbits_speed.py --depth 12 --dim 768 --heads 12 --threads 1   # ViT-B/16
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from exporters.device.compare import compare
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, quantize_model

try:
    from benchmarks.runtime_speed import session_memory_mib, Method
except ImportError:  # run as a script: its own folder is on sys.path
    from runtime_speed import session_memory_mib, Method


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTSmall(nn.Module):
    """ViT-S/16 in its layout (Dosovitskiy et al. 2021), `depth` blocks."""

    def __init__(self, depth: int, dim: int = 384, heads: int = 6, image: int = 224, patch: int = 16, classes: int = 1000,
                 channels: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


W4 = QuantSpec(bits=4, block_size=32)
W4A8 = QuantSpec(bits=4, block_size=32, act_bits=8)
ARTIFACTS = {  # name: (spec, export options, weight_dequant); the spec's block size is --block-size
    "fp32": (QuantSpec(), ExportOptions(), "auto"),
    "dq int8 (folded)": (W4, ExportOptions(), "auto"),
    "dq int8 (runtime)": (W4, ExportOptions(), "runtime"),
    "dq int4": (W4, ExportOptions(int4_storage=True), "auto"),
    "matmul_nbits": (W4, ExportOptions(matmul_nbits=True, int4_storage=True), "auto"),
    "matmul_nbits int8 compute (w4a8)": (W4A8, ExportOptions(matmul_nbits=True, int4_storage=True), "auto"),
}


def export_all(model: nn.Module, block_size: int, folder: Path, image: int) -> dict[str, tuple[Path, QuantSpec]]:
    """{artifact: (path, spec)}; artifacts that differ only in how they run share one file."""
    out, written = {}, {}
    for name, (spec, options, _) in ARTIFACTS.items():
        spec = dataclasses.replace(spec, block_size=block_size) if spec.block_size else spec
        key = (repr(spec), repr(options))
        if key not in written:
            written[key] = export_onnx(model, folder / f"artifact_{len(written)}.onnx", spec, options,
                                       input_shape=(3, image, image))
        out[name] = (written[key], spec)
    return out


def time_round_robin(runners: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per batch-1 call of each runner, over `rounds` shuffled rounds (a few calls each)."""
    times = {name: [] for name in runners}
    order = list(runners)
    for runner in runners.values():
        runner.predict(x)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(3):
                runners[name].predict(x)
            times[name].append((time.perf_counter() - start) / 3 * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@click.command()
@click.option("--depth", default=4, show_default=True, help="encoder blocks (ViT-S has 12)")
@click.option("--dim", default=384, show_default=True, help="width (ViT-S 384, ViT-B 768)")
@click.option("--heads", default=6, show_default=True)
@click.option("--image", default=224, show_default=True, help="input size (16x16 patches)")
@click.option("--block-size", default=32, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="intra-op thread counts, comma-separated")
@click.option("--rounds", default=15, show_default=True)
@click.option("--images", default=8, show_default=True, help="random images for the accuracy check")
def main(depth, dim, heads, image, block_size, threads, rounds, images):
    torch.manual_seed(0)
    model = ViTSmall(depth, dim, heads, image).eval()
    x = torch.randn(images, 3, image, image)
    with tempfile.TemporaryDirectory() as scratch:
        built = export_all(model, block_size, Path(scratch), image)
        paths = {name: path for name, (path, _) in built.items()}
        print(f"ViT/16-like, width {dim}, {heads} heads, depth {depth}, {image}x{image} ({(image // 16) ** 2 + 1} "
              f"tokens), W4 blocks of {block_size}; batch 1\n")
        print("| artifact | file MiB | rel. max diff to its emulation | top-1 = its emulation |")
        print("|---|---|---|---|")
        for name, (path, spec) in built.items():
            with torch.no_grad():
                emulation = quantize_model(model, spec)(x).numpy()
            got = OnnxRuntimeRunner(path, weight_dequant=ARTIFACTS[name][2]).predict(x.numpy(), batch_size=1)
            gap = compare(emulation, got)
            print(f"| {name} | {path.stat().st_size / 2**20:.1f} | "
                  f"{gap.difference.max_abs / gap.difference.reference_max:.2g} | {gap.agreement.rate:.0%} |")
        auto = [n for n in paths if ARTIFACTS[n][2] == "auto"]
        memory = session_memory_mib(paths, [Method("ort", n) for n in auto], 1, (3, image, image))
        print("\nsession memory, MiB (built / after the first run): " + ", ".join(
            f"{n} {memory['ort ' + n]['weights']:.0f}/{memory['ort ' + n]['first_run']:.0f}" for n in auto))
        for t in (int(v) for v in threads.split(",")):
            runners = {name: OnnxRuntimeRunner(path, intra_op_threads=t, weight_dequant=ARTIFACTS[name][2])
                       for name, path in paths.items()}
            ms = time_round_robin(runners, x[:1].numpy(), rounds)
            print(f"\n{t} thread(s), median ms at batch 1 (x fp32 speed): " + ", ".join(
                f"{n} {v:.1f} ({ms['fp32'] / v:.2f}x)" for n, v in ms.items()))


if __name__ == "__main__":
    main()
