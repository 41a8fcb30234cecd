"""Inference throughput of one model in PyTorch eager, ONNX Runtime FP32, our QDQ artifacts and
ONNX Runtime's own INT8 quantization, on the CPU at hand.

Artifacts, all exported here from one checkpoint: fp32, w8 and w4 (weight-only, INT4 storage),
w8a8 (our int8 activations, scales from `calibrate_activations` on the calibration images) and
the peer: `onnxruntime.quantization.quantize_static` on the fp32 graph (QDQ, per-channel, int8
weights and activations, MinMax calibration on the same images, after `quant_pre_process`).
Each of our artifacts runs in `OnnxRuntimeRunner`'s weight_dequant modes "folded" (its default
for them) and "runtime" (ORT's own QDQ handling).

Methods run round-robin (warm-up, then R rounds in which each method in turn runs for about
25 ms) so machine noise hits them alike; the table gives the median images/s at batch 1 and 64,
with ORT's (and torch's) default thread count and with one intra-op thread, and the ratio to ORT
FP32 in the same setting. On a small machine shared with other work the one-thread columns are
the steadier ones: a multi-threaded pool waits for its slowest thread. Accuracy on
the test images and the largest logit difference from the artifact's literal graph (ORT with all
optimizations off) come first, so a fast wrong path shows. Without --checkpoint an untrained
ResNet20 (1x28x28, random images and labels) is timed: speed is valid, accuracy is meaningless.

    python benchmarks/runtime_speed.py --checkpoint /tmp/qs1/train/checkpoint.pt
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, calibrate_activations, fold_bn
from exporters.device.runtime import OnnxRuntimeRunner
from hero_train.models import build_model

CPU = ["CPUExecutionProvider"]
BATCH_SIZES = (1, 64)
EVAL_BATCH = 256
CALIBRATION_BATCH = 64
# Each method runs about this long per round (at least one call): batch-1 calls take about a
# millisecond, and one slow method (PyTorch's thread pool on a busy machine) must not stretch the run.
ROUND_SECONDS = 0.025
METHOD_BUDGET_SECONDS = 8.0  # per batch size and thread setting, once MIN_ROUNDS are in
MIN_ROUNDS = 5


@dataclass
class Subject:
    """The model under test, its test images and calibration images (float32, normalised)."""

    label: str
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    test_x: np.ndarray
    test_y: np.ndarray
    calibration_x: np.ndarray


def load_subject(checkpoint: str | None, limit_test: int | None, calibration_images: int,
                 data_root: str | None = None) -> Subject:
    """The checkpoint's model and data, or an untrained ResNet20 on random 1x28x28 images."""
    if checkpoint is None:
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, in_channels=1).eval()
        generator = np.random.default_rng(0)
        n = limit_test or 2000
        return Subject("UNTRAINED resnet20, random images (accuracy meaningless, speed valid)", model, (1, 28, 28),
                       generator.standard_normal((n, 1, 28, 28), dtype=np.float32), generator.integers(0, 10, n),
                       generator.standard_normal((calibration_images, 1, 28, 28), dtype=np.float32))
    from pipeline.stages import eval_data, load_stage

    loaded = load_stage(Path(checkpoint))
    test_x, test_y = eval_data(loaded, "test", limit_test, data_root)
    shape = tuple(loaded.ckpt["input_shape"])
    calibration_x = (eval_data(loaded, "train", calibration_images, data_root)[0] if calibration_images
                     else np.zeros((0, *shape), np.float32))
    spec = loaded.ckpt["model"]
    return Subject(f"{spec['name']} on {loaded.ckpt['dataset']} ({checkpoint})", loaded.model, shape,
                   test_x, test_y, calibration_x)


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def export_artifacts(subject: Subject, out_dir: Path) -> dict[str, Path]:
    """fp32, w8, w4 (INT4 storage), w8a8 and the quantize_static peer, written to out_dir."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, shape = subject.model, subject.input_shape
    paths = {"fp32": export_onnx(model, out_dir / "fp32.onnx", QuantSpec(), input_shape=shape),
             "w8": export_onnx(model, out_dir / "w8.onnx", QuantSpec(bits=8), input_shape=shape),
             "w4": export_onnx(model, out_dir / "w4.onnx", QuantSpec(bits=4), ExportOptions(int4_storage=True),
                               input_shape=shape)}
    calibration = _batches(subject.calibration_x, CALIBRATION_BATCH)
    w8a8 = QuantSpec(bits=8, act_bits=8)
    scales = calibrate_activations(fold_bn(model), [torch.from_numpy(b) for b in calibration], w8a8)
    paths["w8a8"] = export_onnx(model, out_dir / "w8a8.onnx", w8a8, calibration=scales, input_shape=shape)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": b} for b in calibration])

        def get_next(self):
            return next(self.feeds, None)

    prepared = out_dir / "fp32_preprocessed.onnx"
    quant_pre_process(str(paths["fp32"]), str(prepared))
    paths["peer_int8"] = out_dir / "peer_int8.onnx"
    quantize_static(str(prepared), str(paths["peer_int8"]), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return paths


@dataclass
class Method:
    """One way to run the model: `build(threads)` returns a predict function (images -> logits)."""

    name: str
    artifact: str | None  # None: PyTorch eager on the float model
    build: Callable[[int | None], Callable[[np.ndarray], np.ndarray]]


def _torch_eager(model: torch.nn.Module, default_threads: int):
    def build(threads):
        torch.set_num_threads(threads or default_threads)

        def predict(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return predict
    return build


def _ort(path: Path, **options):
    def build(threads):
        runner = OnnxRuntimeRunner(path, CPU, intra_op_threads=threads, **options)
        return lambda x: runner.predict(x, batch_size=len(x))
    return build


def methods(subject: Subject, paths: dict[str, Path]) -> list[Method]:
    out = [Method("pytorch eager fp32", None, _torch_eager(subject.model.eval(), torch.get_num_threads())),
           Method("ort fp32", "fp32", _ort(paths["fp32"])),
           Method("ort int8 peer (quantize_static)", "peer_int8", _ort(paths["peer_int8"]))]
    for name in ("w8a8", "w8", "w4"):
        out += [Method(f"ort {name} folded (default)", name, _ort(paths[name], weight_dequant="folded")),
                Method(f"ort {name} runtime DQ", name, _ort(paths[name], weight_dequant="runtime"))]
    return out


def check_outputs(subject: Subject, paths: dict[str, Path], methods_: list[Method]) -> dict[str, dict]:
    """Test accuracy of each method and its largest |logit difference| from the literal graph of
    its artifact (PyTorch eager against the literal fp32 graph)."""
    x, y = subject.test_x, subject.test_y
    literal = {name: OnnxRuntimeRunner(path, CPU, optimization="disabled").predict(x, EVAL_BATCH)
               for name, path in paths.items()}
    rows = {}
    for method in methods_:
        predict = method.build(None)
        logits = np.concatenate([predict(b) for b in _batches(x, EVAL_BATCH)])
        reference = literal[method.artifact or "fp32"]
        rows[method.name] = {"accuracy": float((logits.argmax(1) == y).mean()),
                             "max_diff_vs_literal": float(np.abs(logits - reference).max()),
                             "agreement_vs_literal": float((logits.argmax(1) == reference.argmax(1)).mean())}
    return rows


def time_round_robin(methods_: list[Method], x: np.ndarray, threads: int | None, rounds: int,
                     warmup: int) -> dict[tuple[str, int], float]:
    """{(method, batch): median images/s} over `rounds` rounds of every method in turn, in a
    shuffled order per round; a method that has used its time budget sits out later rounds."""
    shuffler = random.Random(0)
    predicts = {m.name: m.build(threads) for m in methods_}
    throughput = {}
    for batch in BATCH_SIZES:
        sample, calls = x[:batch], {}
        for name, predict in predicts.items():
            for _ in range(warmup):
                predict(sample)
            start = time.perf_counter()
            predict(sample)
            calls[name] = max(1, round(ROUND_SECONDS / (time.perf_counter() - start)))
        seconds = {name: [] for name in predicts}
        order = list(predicts)
        for _ in range(rounds):
            shuffler.shuffle(order)  # no method always runs right after the same other one
            for name in order:
                if len(seconds[name]) >= MIN_ROUNDS and sum(seconds[name]) * calls[name] > METHOD_BUDGET_SECONDS:
                    continue
                predict = predicts[name]
                start = time.perf_counter()
                for _ in range(calls[name]):
                    predict(sample)
                seconds[name].append((time.perf_counter() - start) / calls[name])
        for name, times in seconds.items():
            throughput[name, batch] = batch / statistics.median(times)
    return throughput


def _thread_label(threads: int | None) -> str:
    return "default threads" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"


def format_table(methods_: list[Method], checks: dict, timings: dict) -> str:
    settings = list(timings)
    header = ["method", "acc", "max|Δ| vs literal"]
    for threads in settings:
        header += [f"b{b} img/s ({_thread_label(threads)})" for b in BATCH_SIZES] + ["× fp32 b1", "× fp32 b64"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods_:
        check = checks[m.name]
        cells = [m.name, f"{check['accuracy']:.2%}", f"{check['max_diff_vs_literal']:.2g}"]
        for threads in settings:
            t = timings[threads]
            cells += [f"{t[m.name, b]:.0f}" for b in BATCH_SIZES]
            cells += [f"{t[m.name, b] / t['ort fp32', b]:.2f}" for b in BATCH_SIZES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="hero-deploy checkpoint; without it an untrained ResNet20 is timed (accuracy meaningless).")
@click.option("--data-root", default=None, help="Folder holding the dataset files (default: the usual places).")
@click.option("--limit-test", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Test images for the accuracy check.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--threads", "thread_settings", multiple=True, default=["default", "1"], show_default=True,
              help="intra-op thread settings to time: 'default' (ORT's choice) or a count; repeatable.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the exported artifacts here (default: a temporary folder).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(checkpoint, data_root, limit_test, calibration_images, rounds, warmup, thread_settings, out_dir, json_path):
    subject = load_subject(checkpoint, limit_test, calibration_images, data_root)
    settings = [None if s == "default" else int(s) for s in thread_settings]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        paths = export_artifacts(subject, folder)
        print(f"model: {subject.label}; exported {len(paths)} artifacts in {time.perf_counter() - start:.1f} s")
        methods_ = methods(subject, paths)
        checks = check_outputs(subject, paths, methods_)
        load_before = os.getloadavg()[0]
        timings = {threads: time_round_robin(methods_, subject.test_x, threads, rounds, warmup)
                   for threads in settings}
    print(f"{len(subject.test_x)} test images; median of {rounds} round-robin rounds; ratios to ort fp32 in the "
          f"same column group; load average {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after\n")
    print(format_table(methods_, checks, timings))
    if json_path:
        Path(json_path).write_text(json.dumps({
            "model": subject.label, "checks": checks,
            "throughput": {_thread_label(t): {f"{name} b{b}": v for (name, b), v in timing.items()}
                           for t, timing in timings.items()}}, indent=2))


if __name__ == "__main__":
    main()
