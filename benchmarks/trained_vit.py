"""A trained ViT through block-wise INT4 and MatMulNBits: accuracy of each artifact against its own
emulation on all 10,000 Fashion-MNIST test images, and speed at batch 1 against FP32.

Random-weight transformers amplify float rounding differences (benchmarks/README.md, "Block-wise
INT4 and MatMulNBits"), so whether the int8-compute kernels reach the emulation's accuracy is
measured here on a model that has learnt something: `matmul_nbits_speed.ViTSmall` (nn.MultiheadAttention
blocks, class token, position embedding, LayerNorm, GELU; width 384, 6 heads, `--depth` blocks) on
28x28 grey images in 7x7 patches (16 tokens and a class token), trained from scratch with AdamW
(bf16 autocast, random crops and flips) for `--epochs` on the 60,000 training images. Training
saves its state after every epoch in `--work` (STATE_FILE) and resumes from it.

Artifacts (each against the emulation of its own spec, `quantize_model`):
- fp32: the float graph;
- w4 matmul_nbits: every Linear at 4 bits per block of `--block-size` inputs
  (`QuantSpec(bits=4, block_size=...)`), written as com.microsoft MatMulNBits with float activations;
- w4a8 matmul_nbits: the same weights with `act_bits=8`: accuracy level 4, int8 dot products on
  activations quantized per block on the fly, which the emulation reproduces
  (`exporters.grid.dynamic_block_qdq`);
- w8a8 qdq: per-channel INT8 weights and static uint8 activations at every MatMul/Gemm input of the
  attention and MLP (`QuantSpec(bits=8, act_bits=8)`, onnxruntime layout), calibrated by
  `calibrate_activations` on `CALIBRATION_IMAGES` training images: the QDQ graph ONNX Runtime
  fuses into integer kernels.

Per artifact: test accuracy of the emulation and of ONNX Runtime, top-1 agreement between them,
the largest and the RMS logit difference relative to the largest emulated logit, and the tests'
tolerance policy (`tests/agreement.py`: elementwise float tolerance for float activations; for
w4a8 the distance to the emulation against the activation quantization's own effect, measured
against the same weights with float activations). Then median latency at batch 1, every artifact round-robin.

    python benchmarks/trained_vit.py --work /tmp/vit-fmnist            # train (resumable), then measure
    python benchmarks/trained_vit.py --work /tmp/vit-fmnist --epochs 0  # measure the saved state
"""

from __future__ import annotations

import dataclasses
import io
import math
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from exporters.calibrate import calibrate_activations
from exporters.device.compare import Top1, compare
from exporters.device.files import write_atomic
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, quantize_model
from hero_train.data import augment, load_dataset, normalize

try:
    from benchmarks.architecture_coverage import judge
    from benchmarks.matmul_nbits_speed import ViTSmall, time_round_robin
except ImportError:  # run as a script: its own folder is on sys.path
    from architecture_coverage import judge
    from matmul_nbits_speed import ViTSmall, time_round_robin

IMAGE, PATCH, CLASSES = 28, 7, 10
CALIBRATION_IMAGES = 512
STATE_FILE = "trained_vit_state.pt"  # this script's own training state, not a hero checkpoint
HYPER = {"batch": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 200, "padding": 2}


def build(depth: int) -> torch.nn.Module:
    return ViTSmall(depth, image=IMAGE, patch=PATCH, classes=CLASSES, channels=1)


def learning_rate(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < HYPER["warmup_steps"]:
        return HYPER["lr"] * (step + 1) / HYPER["warmup_steps"]
    return HYPER["lr"] * 0.5 * (1 + math.cos(math.pi * (step - HYPER["warmup_steps"]) / max(1, total - HYPER["warmup_steps"])))


def train(model: torch.nn.Module, train_set, epochs: int, work: Path) -> None:
    """AdamW for `epochs` epochs in all, resuming from work/STATE_FILE; saves after every epoch."""
    opt = torch.optim.AdamW(model.parameters(), HYPER["lr"], weight_decay=HYPER["weight_decay"])
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, done = work / STATE_FILE, 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        done = state["epoch"]
    steps_per_epoch, generator = len(train_set) // HYPER["batch"], torch.Generator().manual_seed(0)
    for epoch in range(done, epochs):
        generator.manual_seed(epoch)
        order, start, model = torch.randperm(len(train_set), generator=generator), time.perf_counter(), model.train()
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = learning_rate(epoch * steps_per_epoch + i, epochs * steps_per_epoch)
            take = order[i * HYPER["batch"] : (i + 1) * HYPER["batch"]]
            x = normalize(augment(train_set.images[take], generator, HYPER["padding"]), train_set.mean, train_set.std)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), train_set.labels[take])
            opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1}, buffer)
        write_atomic(ckpt_path, buffer.getbuffer())
        print(f"epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the training state (resumed from)")
@click.option("--depth", default=4, show_default=True)
@click.option("--epochs", default=3, show_default=True, help="epochs in all (0: measure the saved state as it is)")
@click.option("--block-size", default=32, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="intra-op thread counts for the timing")
@click.option("--rounds", default=30, show_default=True)
def main(work, depth, epochs, block_size, threads, rounds):
    torch.manual_seed(0)
    model = build(depth)
    train_set, test_set = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    train(model, train_set, epochs, work)
    x = normalize(test_set.images, train_set.mean, train_set.std).numpy()
    y = test_set.labels.numpy()
    w4 = QuantSpec(bits=4, block_size=block_size)
    specs = {"fp32": QuantSpec(), "w4 matmul_nbits": w4, "w4a8 matmul_nbits": dataclasses.replace(w4, act_bits=8),
             "w8a8 qdq": QuantSpec(bits=8, act_bits=8)}
    calibration_set = normalize(train_set.images[:CALIBRATION_IMAGES], train_set.mean, train_set.std)
    calibration = calibrate_activations(model, calibration_set.split(128), specs["w8a8 qdq"])
    # Each A8 artifact's reference without activation quantization: the same weights, float activations.
    float_acts = {"w4a8 matmul_nbits": "w4 matmul_nbits", "w8a8 qdq": "w8 weights only"}
    specs_emulated = {**specs, "w8 weights only": QuantSpec(bits=8)}
    with torch.no_grad():
        emulated = {name: np.concatenate([
            quantize_model(model, spec, calibration if spec.calibrated else None)(torch.from_numpy(x[i : i + 500])).numpy()
            for i in range(0, len(x), 500)]) for name, spec in specs_emulated.items()}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {name: export_onnx(model, Path(scratch) / f"{i}.onnx", spec,
                                   ExportOptions(matmul_nbits=True, int4_storage=True) if spec.block_size else ExportOptions(),
                                   calibration if spec.calibrated else None, input_shape=(1, IMAGE, IMAGE))
                 for i, (name, spec) in enumerate(specs.items())}
        print(f"\nViT, width 384, 6 heads, depth {depth}, {(IMAGE // PATCH) ** 2 + 1} tokens, W4 blocks of "
              f"{block_size}; all {len(y)} Fashion-MNIST test images\n")
        print("| artifact | MiB | emulation acc. | ORT acc. | top-1 = emulation | max / RMS logit diff (rel.) | tests' policy |")
        print("|---|---|---|---|---|---|---|")
        for name, path in paths.items():
            got, emu = OnnxRuntimeRunner(path).predict(x, batch_size=500), emulated[name]
            gap, accuracy = compare(emu, got), {"emu": Top1(), "ort": Top1()}
            accuracy["emu"].add(emu, y), accuracy["ort"].add(got, y)
            scale = gap.difference.reference_max
            policy = judge(got, emu, emulated[float_acts[name]] if specs[name].act_bits else None)
            print(f"| {name} | {path.stat().st_size / 2**20:.1f} | {accuracy['emu'].rate:.2%} | "
                  f"{accuracy['ort'].rate:.2%} | {gap.agreement.rate:.2%} | "
                  f"{gap.difference.max_abs / scale:.2g} / {gap.difference.rms / scale:.2g} | {policy} |")
        for t in (int(v) for v in threads.split(",")):
            runners = {name: OnnxRuntimeRunner(path, intra_op_threads=t) for name, path in paths.items()}
            ms = time_round_robin(runners, x[:1], rounds)
            print(f"\n{t} thread(s), median ms at batch 1 (x fp32 speed): " + ", ".join(
                f"{n} {v:.2f} ({ms['fp32'] / v:.2f}x)" for n, v in ms.items()))


if __name__ == "__main__":
    main()
