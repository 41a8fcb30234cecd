"""Inference throughput and memory of our quantized ONNX artifacts against ONNX Runtime FP32, ONNX
Runtime's own static quantization and OpenVINO, on the CPU at hand.

Models: ResNet18 and MobileNetV2 in their ImageNet layout (3x224x224, 1000 classes, random weights
with settled BatchNorm statistics, random images: `benchmarks/imagenet_models.py`), one after the
other; or, with --checkpoint, a trained hero checkpoint on its own test images, which adds accuracy.

Artifacts, all exported here from one model: fp32 (BatchNorm folded); ours w8a8 and w4a8 (int8
storage) in the "onnxruntime" activation layout (uint8 activations, QLinearConv/QLinearAdd/QGemm
after ORT's optimisation), w8a8 in the "tensorrt" layout (int8 Q/DQ on Conv/Linear inputs only),
weight-only w8 and w4 (INT4 storage); and the peer, `onnxruntime.quantization.quantize_static` on
our fp32 graph after `quant_pre_process` (QDQ, per-channel, uint8 activations and int8 weights, the
peer's recommended x86 setting; MinMax calibration on the same images as ours). ONNX Runtime runs
every artifact through `OnnxRuntimeRunner` (weight_dequant "auto"); OpenVINO, when installed, runs
fp32, both our w8a8 layouts and the peer's graph: `Core().compile_model` on the CPU with a static
batch, INFERENCE_NUM_THREADS the thread count, INFERENCE_PRECISION_HINT f32 (it would run float
layers in bf16 on AMX CPUs otherwise) and a single infer request.

Timing: per thread count (--threads), every method runs round-robin at batch 1 and 8 (warm-up,
then rounds in a shuffled order in which each method runs for about ROUND_SECONDS; a method past
its time budget sits out later rounds); the table gives the median images/s and the ratio to ORT
FP32 at the same batch and threads. Memory: the VmRSS increase of a fresh process from before
building one method's session to the session built (its weights as the runtime holds them) and to
after its first batch-1 run (plus activation buffers). Checks, before any timing: each
method's top-1 agreement with ORT FP32 and with its own artifact's literal graph (ORT, all
optimisations off), so a fast wrong path shows; with --checkpoint also test accuracy. The kernel
column says how ORT ran each artifact: integer weight ops / float weight ops (`exporters.kernels`).

    python benchmarks/runtime_speed.py --json runtime_speed.json        # both ImageNet models
    python benchmarks/runtime_speed.py --checkpoint /tmp/qs1/train/checkpoint.pt
    python benchmarks/runtime_speed.py --quick                          # smoke test: 64x64, 2 rounds
"""

from __future__ import annotations

import importlib
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

from exporters.device.compare import compare, relative_error
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.kernels import kernel_summary
from exporters.onnx import ExportOptions, export_onnx
from exporters.calibrate import calibrate_activations
from exporters.quantize import QuantSpec

try:
    from benchmarks import imagenet_models, runtimes
except ImportError:  # run as a script (python benchmarks/runtime_speed.py): its own folder is on sys.path
    import imagenet_models
    import runtimes
RUNTIMES, ort_runtime, openvino_runtime = runtimes.RUNTIMES, runtimes.ort_runtime, runtimes.openvino_runtime

CPU = ["CPUExecutionProvider"]
BATCH_SIZES = (1, 8)
CHECK_BATCH = 8  # one of BATCH_SIZES, so OpenVINO compiles no extra static shape for the checks
CALIBRATION_BATCH = 16
# Each method runs about this long per round (at least one call), and at most METHOD_BUDGET_SECONDS
# per batch size and thread count once MIN_ROUNDS are in: one slow method must not stretch the run.
ROUND_SECONDS = 0.1
METHOD_BUDGET_SECONDS = 8.0
MIN_ROUNDS = 5
MEMORY_REPEATS = 3  # fresh processes per session's memory reading (`session_memory_mib`)
QUICK = {"image_size": 64, "rounds": 2, "batch_sizes": (1,), "images": 16, "calibration_images": 8}

# Our artifacts: name -> how it is quantized and stored. All come from the same model.
OURS = {
    "fp32": (QuantSpec(), ExportOptions()),
    "w8a8": (QuantSpec(bits=8, act_bits=8), ExportOptions()),
    "w4a8": (QuantSpec(bits=4, act_bits=8), ExportOptions()),
    "w8a8 tensorrt": (QuantSpec(bits=8, act_bits=8, act_layout="tensorrt"), ExportOptions()),
    "w8": (QuantSpec(bits=8), ExportOptions()),
    "w4": (QuantSpec(bits=4), ExportOptions(int4_storage=True)),
}
PEER = "peer u8s8"
INTEGER_ARTIFACTS = ("w8a8", "w4a8", PEER)  # laid out for integer kernels: a float weight op there did not fuse
OPENVINO_ARTIFACTS = ("fp32", "w8a8", "w8a8 tensorrt", PEER)
REFERENCE = "ort fp32"


@dataclass
class Subject:
    """The model under test and its images (float32, normalised); `labels` None for random images."""

    label: str
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    images: np.ndarray
    labels: np.ndarray | None
    calibration: np.ndarray


def imagenet_subject(name: str, image_size: int, images: int, calibration_images: int) -> Subject:
    """An ImageNet-layout model of `imagenet_models` with random weights and standard-normal images."""
    model = imagenet_models.settle_batchnorm(imagenet_models.build(name), image_size)
    shape = (3, image_size, image_size)
    generator = np.random.default_rng(0)
    return Subject(f"{name}, ImageNet layout {'x'.join(map(str, shape))}, {imagenet_models.NUM_CLASSES} classes, "
                   "random weights and images (agreement matters, not accuracy)", model, shape,
                   generator.standard_normal((images, *shape), dtype=np.float32), None,
                   generator.standard_normal((calibration_images, *shape), dtype=np.float32))


def checkpoint_subject(checkpoint: str, images: int, calibration_images: int, data_root: str | None) -> Subject:
    """A hero checkpoint's model, its first `images` test images and first training images."""
    from hero_train.checkpoint import DataRef, load_deployable
    from pipeline.stages import load_split

    loaded = load_deployable(checkpoint, data=DataRef(root=data_root))
    test_x, test_y = load_split(loaded, "test", images)
    calibration_x = load_split(loaded, "train", calibration_images)[0]
    return Subject(f"{loaded.model_ref.label} on {loaded.data.dataset} ({checkpoint})", loaded.model,
                   loaded.input.shape, test_x, test_y, calibration_x)


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


# ---- artifacts ------------------------------------------------------------------------------------

def export_ours(subject: Subject, out_dir: Path) -> dict[str, Path]:
    """Every artifact of OURS, written to out_dir; activation scales from `calibrate_activations` on
    the subject's calibration images, per spec."""
    batches = [torch.from_numpy(b) for b in _batches(subject.calibration, CALIBRATION_BATCH)]
    paths = {}
    for name, (spec, options) in OURS.items():
        calibration = calibrate_activations(subject.model, batches, spec) if spec.act_bits else None
        paths[name] = export_onnx(subject.model, out_dir / f"{name.replace(' ', '_')}.onnx", spec, options,
                                  calibration, input_shape=subject.input_shape)
    return paths


def export_peer(fp32: Path, calibration: np.ndarray, out_dir: Path) -> Path:
    """`quantize_static` (onnxruntime.quantization) on the fp32 graph after `quant_pre_process`: QDQ,
    per-channel, QUInt8 activations and QInt8 weights, MinMax calibration on `calibration`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": b} for b in _batches(calibration, CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.feeds, None)

    prepared, out = out_dir / "fp32_preprocessed.onnx", out_dir / f"{PEER.replace(' ', '_')}.onnx"
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


# ---- runtimes: path -> build(threads) -> predict(images) -> logits --------------------------------

OPENVINO_WEIGHT_LAYERS = {"Convolution", "FullyConnected", "MatMul", "Deconvolution"}


def openvino_kernels(path: Path, input_shape: tuple[int, ...]) -> dict:
    """{"integer_ops": n, "float_weight_ops": n, "unfused": []} of OpenVINO's compiled model at
    batch 1: its weight layers (OPENVINO_WEIGHT_LAYERS) by the runtimePrecision in their rt_info
    (u8/i8: an integer kernel), the shape of `exporters.kernels.kernel_summary`."""
    import openvino

    request = runtimes.openvino_request(openvino.Core(), path, (1, *input_shape), None)
    precisions = [op.get_rt_info()["runtimePrecision"].astype(str)
                  for op in request.get_compiled_model().get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) in OPENVINO_WEIGHT_LAYERS]
    integer = sum(p in ("u8", "i8") for p in precisions)
    return {"integer_ops": integer, "float_weight_ops": len(precisions) - integer, "unfused": []}




def openvino_missing() -> str | None:
    """Why OpenVINO rows are skipped (its import error), or None when it is installed."""
    try:
        importlib.import_module("openvino")
    except ImportError as exc:
        return f"openvino is not installed ({exc}): pip install openvino"
    return None


@dataclass
class Method:
    """One runtime on one artifact."""

    runtime: str  # a key of RUNTIMES
    artifact: str

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.artifact}"


def methods(with_openvino: bool) -> list[Method]:
    """ORT on every artifact, then OpenVINO on OPENVINO_ARTIFACTS when it is installed."""
    return ([Method("ort", a) for a in (*OURS, PEER)]
            + [Method("ov", a) for a in OPENVINO_ARTIFACTS if with_openvino])


# ---- checks and memory ----------------------------------------------------------------------------

def check_outputs(subject: Subject, paths: dict[str, Path], methods_: list[Method]) -> dict[str, dict]:
    """Per method: top-1 agreement with ORT FP32 and with its artifact's literal graph, the relative
    logit error from each (`exporters.device.compare.relative_error`), and accuracy where the subject has labels. On random
    weights agreement is only as good as the logits' margins: compare it with the relative errors."""
    x = subject.images
    literal = {name: OnnxRuntimeRunner(path, CPU, optimization="disabled").predict(x, CHECK_BATCH)
               for name, path in paths.items()}
    logits = {}
    for method in methods_:
        predict = RUNTIMES[method.runtime](paths[method.artifact])(None)
        logits[method.name] = np.concatenate([predict(b) for b in _batches(x, CHECK_BATCH)])
    rows = {}
    for method in methods_:
        out, reference = logits[method.name], literal[method.artifact]
        rows[method.name] = {"agreement_vs_fp32": compare(logits[REFERENCE], out).agreement.rate,
                             "agreement_vs_literal": compare(reference, out).agreement.rate,
                             "rel_error_vs_fp32": relative_error(out, logits[REFERENCE]),
                             "rel_error_vs_literal": relative_error(out, reference)}
        if subject.labels is not None:
            rows[method.name]["accuracy"] = float((out.argmax(1) == subject.labels).mean())
    return rows


def session_memory_mib(paths: dict[str, Path], methods_: list[Method], threads: int,
                       input_shape: tuple[int, ...], repeats: int = MEMORY_REPEATS) -> dict[str, dict[str, float]]:
    """{method: {"weights": ..., "first_run": ...}}: the medians of `repeats` `runtimes.session_rss_kib`
    readings, in MiB, each in a fresh process that imports no torch (`python benchmarks/runtimes.py`),
    as on a device: with torch loaded an int8 session's reading grew by half."""
    out = {}
    for method in methods_:
        readings = [runtimes.measure_in_fresh_process(method.runtime, paths[method.artifact], threads, input_shape)
                    for _ in range(repeats)]
        out[method.name] = {key: statistics.median(r[i] for r in readings) / 1024
                            for i, key in enumerate(("weights", "first_run"))}
    return out


# ---- timing ---------------------------------------------------------------------------------------

def time_round_robin(methods_: list[Method], paths: dict[str, Path], x: np.ndarray, threads: int,
                     batch_sizes: tuple[int, ...], rounds: int, warmup: int) -> dict[tuple[str, int], float]:
    """{(method, batch): median images/s} over `rounds` rounds of every method in turn, in a
    shuffled order per round; a method that has used its time budget sits out later rounds."""
    shuffler = random.Random(0)
    predicts = {m.name: RUNTIMES[m.runtime](paths[m.artifact])(threads) for m in methods_}
    throughput = {}
    for batch in batch_sizes:
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


# ---- one model, end to end ------------------------------------------------------------------------

@dataclass
class Settings:
    """What to time: intra-op thread counts (the first also for session memory), batch sizes, rounds,
    warm-up calls per method and batch."""

    threads: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    rounds: int
    warmup: int
    memory_repeats: int = MEMORY_REPEATS


def kernel_summaries(paths: dict[str, Path], methods_: list[Method], input_shape: tuple[int, ...]) -> dict[str, dict]:
    """How each method's runtime ran its artifact: `exporters.kernels.kernel_summary` for ORT,
    `openvino_kernels` for OpenVINO."""
    return {m.name: kernel_summary(paths[m.artifact], CPU) if m.runtime == "ort"
            else openvino_kernels(paths[m.artifact], input_shape) for m in methods_}


def unfused(method: Method, summary: dict) -> list[str]:
    """The weight ops that stayed float in an artifact laid out for integer kernels (INTEGER_ARTIFACTS);
    [] for the float layouts, whose weight ops are meant to run float."""
    return summary["unfused"] if method.artifact in INTEGER_ARTIFACTS else []


def _kernels_cell(method: Method, summary: dict) -> str:
    missed = unfused(method, summary)
    return f"{summary['integer_ops']}/{summary['float_weight_ops']}" + (f" ({len(missed)} unfused)" if missed else "")


def format_table(methods_: list[Method], result: dict, settings: Settings, with_accuracy: bool) -> str:
    """One markdown row per method: checks, kernels, session memory, then images/s and × ORT FP32
    per thread count and batch size."""
    header = ["method", "agree fp32", "rel err fp32", "agree literal", "rel err literal",
              *(["acc"] if with_accuracy else []), "int/float ops", "RSS MiB built/run"]
    for threads in settings.threads:
        header += [f"b{b} img/s ({threads}t)" for b in settings.batch_sizes]
        header += [f"× fp32 b{b} ({threads}t)" for b in settings.batch_sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods_:
        check = result["checks"][m.name]
        cells = [m.name, f"{check['agreement_vs_fp32']:.1%}", f"{check['rel_error_vs_fp32']:.2g}",
                 f"{check['agreement_vs_literal']:.1%}", f"{check['rel_error_vs_literal']:.2g}",
                 *([f"{check['accuracy']:.2%}"] if with_accuracy else []),
                 _kernels_cell(m, result["kernels"][m.name]),
                 "{weights:.1f}/{first_run:.1f}".format(**result["rss_mib"][m.name])]
        for threads in settings.threads:
            speed = result["throughput"][threads]
            cells += [f"{speed[m.name, b]:.1f}" for b in settings.batch_sizes]
            cells += [f"{speed[m.name, b] / speed[REFERENCE, b]:.2f}" for b in settings.batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(methods_: list[Method], result: dict, with_accuracy: bool) -> list[str]:
    """The lines under the table: session memory W8A8 against FP32, unfused weight ops, accuracy."""
    rss, ours = result["rss_mib"], "ort w8a8"
    lines = [f"session RSS, {ours} / {REFERENCE}: built (weights) {rss[ours]['weights'] / rss[REFERENCE]['weights']:.2f} "
             f"({rss[ours]['weights']:.1f} / {rss[REFERENCE]['weights']:.1f} MiB), after the first batch-1 run "
             f"{rss[ours]['first_run'] / rss[REFERENCE]['first_run']:.2f} "
             f"({rss[ours]['first_run']:.1f} / {rss[REFERENCE]['first_run']:.1f} MiB)"]
    for m in methods_:
        missed = unfused(m, result["kernels"][m.name])
        if missed:
            lines.append(f"{m.name}: {len(missed)} weight op(s) meant for integer kernels ran as float ops: "
                         f"{', '.join(missed[:5])}")
    if with_accuracy:
        checks = result["checks"]
        lines.append("test accuracy (same fp32 graph, same calibration images): " + ", ".join(
            f"{name} {checks[name]['accuracy']:.2%}" for name in (REFERENCE, "ort w8a8", "ort w4a8", f"ort {PEER}")))
    return lines


def _timed(label: str, stage: Callable, *args):
    start = time.perf_counter()
    out = stage(*args)
    print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def run_subject(subject: Subject, settings: Settings, folder: Path, with_openvino: bool) -> dict:
    """Export, check, measure memory and time one subject; prints its table and returns the results."""
    print(f"\n## {subject.label}\n", flush=True)
    methods_ = methods(with_openvino)
    paths = _timed("export ours", export_ours, subject, folder)
    paths[PEER] = _timed("export peer", export_peer, paths["fp32"], subject.calibration, folder)
    kernels = _timed("kernel summaries", kernel_summaries, paths, methods_, subject.input_shape)
    checks = _timed("checks", check_outputs, subject, paths, methods_)
    rss = _timed("session memory", session_memory_mib, paths, methods_, settings.threads[0], subject.input_shape,
                 settings.memory_repeats)
    load_before = os.getloadavg()[0]
    throughput = {threads: _timed(f"timing, {threads} thread(s)", time_round_robin, methods_, paths, subject.images,
                                  threads, settings.batch_sizes, settings.rounds, settings.warmup)
                  for threads in settings.threads}
    result = {"checks": checks, "kernels": kernels, "rss_mib": rss, "throughput": throughput}
    print(f"\n{len(subject.images)} check images; median of up to {settings.rounds} round-robin rounds; × is the ratio "
          f"to {REFERENCE} at the same batch and threads; RSS: one session built, and after its first run at "
          f"batch 1, {settings.threads[0]} thread(s); "
          f"load average {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after\n")
    print(format_table(methods_, result, settings, subject.labels is not None))
    print("\n" + "\n".join(notes(methods_, result, subject.labels is not None)), flush=True)
    return {"model": subject.label, "input_shape": list(subject.input_shape), **result,
            "throughput": {f"{t} thread(s)": {f"{name} b{b}": v for (name, b), v in speed.items()}
                           for t, speed in throughput.items()}}


def _thread_counts(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(t) for t in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected positive thread counts separated by commas, e.g. 1,2; got {value!r}")
    return counts


@click.command()
@click.option("--model", "model_names", type=click.Choice(sorted(imagenet_models.MODELS)), multiple=True,
              help="ImageNet-layout model(s) to time (repeatable; default: resnet18 then mobilenetv2).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Time a trained hero checkpoint on its own test images instead (adds test accuracy).")
@click.option("--data-root", default=None, help="Folder holding the checkpoint's dataset files.")
@click.option("--images", type=click.IntRange(min=1), default=None,
              help="Images for the checks [default: 2000 test images with --checkpoint, else 128 random; --quick 16].")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None,
              help="Calibration images, ours and the peer's [default: 128; --quick 8].")
@click.option("--threads", callback=_thread_counts, default="1,2", show_default=True,
              help="Intra-op thread counts to time, comma-separated.")
@click.option("--rounds", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--quick", is_flag=True, help="Smoke test: 64x64 images, 2 rounds, batch 1, fewer images.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the exported artifacts here (default: a temporary folder).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(model_names, checkpoint, data_root, images, calibration_images, threads, rounds, warmup, quick, out_dir,
         json_path):
    if checkpoint and model_names:
        raise click.UsageError("--checkpoint and --model each name what to time: pass one of them")
    image_size = QUICK["image_size"] if quick else imagenet_models.IMAGE_SIZE
    calibration_images = calibration_images or (QUICK["calibration_images"] if quick else 128)
    images = images or (QUICK["images"] if quick else 2000 if checkpoint else 128)
    settings = Settings(threads, QUICK["batch_sizes"] if quick else BATCH_SIZES,
                        QUICK["rounds"] if quick else rounds, 1 if quick else warmup, 1 if quick else MEMORY_REPEATS)
    missing = openvino_missing()
    if missing:
        print(f"OpenVINO rows skipped: {missing}")
    subjects = ([lambda: checkpoint_subject(checkpoint, images, calibration_images, data_root)] if checkpoint
                else [lambda name=name: imagenet_subject(name, image_size, images, calibration_images)
                      for name in model_names or ("resnet18", "mobilenetv2")])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, subject in enumerate(subjects):
            folder = Path(out_dir or tmp) / str(index)
            folder.mkdir(parents=True, exist_ok=True)
            results.append(run_subject(subject(), settings, folder, missing is None))
    if json_path:
        Path(json_path).write_text(json.dumps({"settings": vars(settings), "results": results}, indent=2))


if __name__ == "__main__":
    main()
