"""Post-training quantization sweep: quantize a checkpoint at 2..8 bits and evaluate each on the
test set, timing the quantization against the evaluation (target: quantization < 10% of it).

Quantization is `quantize_model` (BatchNorm folded, symmetric per-channel weights, the PyTorch
fake quantization the exported QDQ graphs reproduce). The fake-quantized weights are float32 on
the grid, so evaluation needs no QDQ export; two correct paths are compared on a probe batch and
the faster evaluates the sweep:

- torch: eager PyTorch under inference_mode, model and images in channels_last;
- ort: the BN-folded float ONNX graph, exported once (reported, not charged to any bit width),
  with each quantized model's weights written into its initializers in memory, run by
  `OnnxRuntimeRunner`. (ORT's `SessionOptions.add_initializer` is no substitute: under
  ORT_ENABLE_ALL a Conv weight rewritten by the NCHWc layout transform ignores the override.)

The probe also checks that the two paths give the same logits. Without --checkpoint an untrained
ResNet20 on random images is swept: timings valid, accuracy meaningless.

    python benchmarks/ptq_sweep.py --checkpoint /tmp/qs1/train/checkpoint.pt
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporters.device.compare import tolerance
from exporters.onnx import export_onnx
from exporters.quantize import QuantSpec, quantize_model, quantized_layers
from exporters.device.runtime import OnnxRuntimeRunner
from runtime_speed import Subject, load_subject

BITS = (2, 3, 4, 5, 6, 7, 8)
PROBE_IMAGES = 512
PROBE_REPEATS = 3
TARGET_RATIO = 0.10
# Logits of the two paths differ by float rounding only (different conv kernels and summation order).
PATH_ATOL = 1e-3


@dataclass
class Row:
    bits: int | None
    quantize_s: float
    prepare_s: float  # building the evaluator for this model (ort: graph + session)
    evaluate_s: float
    accuracy: float


class TorchEval:
    """Eager PyTorch, channels_last, inference_mode."""

    name = "torch eager (channels_last)"

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def prepare(self, model: torch.nn.Module):
        model = model.eval().to(memory_format=torch.channels_last)

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([
                    model(torch.from_numpy(x[i:i + self.batch_size]).contiguous(memory_format=torch.channels_last))
                    .numpy() for i in range(0, len(x), self.batch_size)])
        return predict


class OrtEval:
    """The float ONNX graph of the BN-folded model with a quantized model's weights swapped in."""

    name = "onnx runtime (float graph, quantized weights)"

    def __init__(self, model: torch.nn.Module, input_shape, batch_size: int, folder: Path):
        start = time.perf_counter()
        path = export_onnx(model, folder / "float.onnx", QuantSpec(bits=None), input_shape=input_shape)
        self.export_s = time.perf_counter() - start
        self.proto = onnx.load(path)
        self.folder, self.batch_size = folder, batch_size
        self.initializers = {t.name: i for i, t in enumerate(self.proto.graph.initializer)}
        shapes = {t.name: tuple(t.dims) for t in self.proto.graph.initializer}
        missing = [name for name, layer in quantized_layers(model)
                   if shapes.get(f"{name}.weight") != tuple(layer.weight.shape)]
        if missing:
            raise click.ClickException(f"the float graph has no initializer for the weights of {missing}: "
                                       "use --eval-path torch")

    def prepare(self, model: torch.nn.Module):
        graph = self.proto.graph
        for name, layer in quantized_layers(model):
            tensor = numpy_helper.from_array(layer.weight.detach().numpy(), f"{name}.weight")
            graph.initializer[self.initializers[f"{name}.weight"]].CopyFrom(tensor)
        path = self.folder / "quantized_weights.onnx"
        path.write_bytes(self.proto.SerializeToString())
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"])
        return lambda x: runner.predict(x, batch_size=self.batch_size)


def _median_seconds(predict, x: np.ndarray) -> float:
    predict(x)
    times = []
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_path(subject: Subject, paths: dict, probe_bits: int) -> tuple[object, dict]:
    """Time every evaluator on the probe images with the `probe_bits` model and check they agree;
    returns the fastest and the probe figures."""
    model = quantize_model(subject.model, QuantSpec(bits=probe_bits))
    x = subject.test_x[:PROBE_IMAGES]
    probe, logits = {}, {}
    for key, evaluator in paths.items():
        predict = evaluator.prepare(model)
        probe[key] = _median_seconds(predict, x)
        logits[key] = predict(x)
    first = next(iter(logits.values()))
    diff = max(float(np.abs(first - other).max()) for other in logits.values())
    if diff > tolerance(PATH_ATOL, float(np.abs(first).max())):
        raise click.ClickException(f"the evaluation paths disagree by {diff:.3g} in the logits: a path is wrong")
    return paths[min(probe, key=probe.get)], {"seconds": probe, "max_logit_diff": diff}


def sweep(subject: Subject, evaluator, bits_list) -> list[Row]:
    x, y = subject.test_x, subject.test_y
    rows = []
    for bits in [None, *bits_list]:
        start = time.perf_counter()
        model = quantize_model(subject.model, QuantSpec(bits=bits))
        quantized = time.perf_counter()
        predict = evaluator.prepare(model)
        prepared = time.perf_counter()
        logits = predict(x)
        done = time.perf_counter()
        rows.append(Row(bits, quantized - start, prepared - quantized, done - prepared,
                        float((logits.argmax(1) == y).mean())))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| bits | accuracy | quantize s | eval s (prepare + run) | quantize / eval |", "|---|---|---|---|---|"]
    for r in rows:
        evaluation = r.prepare_s + r.evaluate_s
        lines.append(f"| {'fp32' if r.bits is None else r.bits} | {r.accuracy:.2%} | {r.quantize_s:.3f} | "
                     f"{evaluation:.2f} ({r.prepare_s:.2f} + {r.evaluate_s:.2f}) | "
                     f"{r.quantize_s / evaluation:.1%} |")
    return "\n".join(lines)


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="hero-deploy checkpoint; without it an untrained ResNet20 is swept (accuracy meaningless).")
@click.option("--data-root", default=None, help="Folder holding the dataset files (default: the usual places).")
@click.option("--limit-test", type=click.IntRange(min=1), default=None, help="Test images (default: all).")
@click.option("--bits", "bits_list", type=click.IntRange(2, 8), multiple=True, default=BITS, show_default=True)
@click.option("--eval-path", type=click.Choice(["auto", "torch", "ort"]), default="auto", show_default=True,
              help="auto: the faster of the two on the probe batch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(checkpoint, data_root, limit_test, bits_list, eval_path, batch_size, json_path):
    subject = load_subject(checkpoint, limit_test if checkpoint or limit_test else 10_000, 0, data_root)
    print(f"model: {subject.label}; {len(subject.test_x)} test images; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        if eval_path in ("auto", "torch"):
            paths["torch"] = TorchEval(batch_size)
        if eval_path in ("auto", "ort"):
            paths["ort"] = OrtEval(subject.model, subject.input_shape, batch_size, Path(tmp))
            print(f"float ONNX graph exported once in {paths['ort'].export_s:.1f} s (not charged to a bit width)")
        evaluator, probe = choose_path(subject, paths, probe_bits=max(bits_list))
        print(f"probe ({min(PROBE_IMAGES, len(subject.test_x))} images, w{max(bits_list)}): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in probe["seconds"].items())
              + f"; max |Δlogit| between paths {probe['max_logit_diff']:.2g}; evaluating with {evaluator.name}\n")
        rows = sweep(subject, evaluator, bits_list)
    print(format_table(rows))
    worst = max(r.quantize_s / (r.prepare_s + r.evaluate_s) for r in rows if r.bits is not None)
    print(f"\nworst quantize / eval ratio {worst:.1%} (target < {TARGET_RATIO:.0%}): "
          f"{'met' if worst < TARGET_RATIO else 'NOT met'}")
    if json_path:
        Path(json_path).write_text(json.dumps({"model": subject.label, "eval_path": evaluator.name, "probe": probe,
                                               "rows": [r.__dict__ for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
