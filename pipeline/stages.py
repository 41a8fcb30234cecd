"""The deploy stages, plain functions over plain data.

checkpoint → deploy context (`hero_train.checkpoint.Deployable`, which every stage takes) →
variants (QuantSpec per precision) → exported artifacts → validation results → report.
Each stage that writes files records its inputs in the run's StageCache and is skipped on a rerun
whose inputs did not change.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.device import TOOL_VERSION
from exporters.device import runtime as ort_runtime
from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.onnx import ExportOptions, export_onnx, read_quantization
from exporters.calibrate import calibrate_activations
from exporters.quantize import (ACT_NOISE_FACTOR, Calibration, QuantSpec, average_bits, packed_weight_bytes,
                                quantize_model)
from exporters.kernels import integer_lint, kernel_summary
from exporters.trt_lint import lint_explicit_quantization, residual_warnings
from hero_train import data as hdata
from hero_train.checkpoint import Deployable
from hero_train.config import TrainConfig
from hero_train.train import train
from pipeline.cache import StageCache, input_key
from pipeline.debug import first_divergence
from pipeline.config import ExportSection, QuantizeSection, RuntimeSection, ValidateSection


@dataclass(frozen=True)
class Variant:
    """One precision to ship; ``spec.bits is None`` is the full-precision baseline."""

    name: str
    spec: QuantSpec


@dataclass
class Artifact:
    variant: Variant
    path: Path
    sha256: str
    file_bytes: int
    packed_weight_bytes: int


def train_stage(config: TrainConfig | None, run_dir: Path) -> Path:
    """Train (or finish training) the configured model; a completed run is not redone."""
    if config is None:
        raise HeroError("the config has no 'train' section: pass --checkpoint CKPT")
    return train(config, run_dir / "train", resume=True)


def variants_stage(q: QuantizeSection) -> list[Variant]:
    """The baseline plus one variant per requested bit width, named like w4 or w4a8."""
    out = [Variant("fp32", q.spec(None))]
    for bits in q.bits:
        out.append(Variant(f"w{bits}" + (f"a{q.act_bits}" if q.act_bits else ""), q.spec(bits)))
    return out


def mixed_variant(loaded: Deployable, q: QuantizeSection, run_dir: Path) -> Variant:
    """The mixed-precision variant of q.mixed: widths solved on the first q.mixed.batches training
    batches of 128 (pipeline.mixed.assign_bits), cached per checkpoint and settings."""
    from pipeline.mixed import assign_bits

    m = q.mixed
    cache = StageCache(run_dir)
    key = input_key(checkpoint=loaded.sha256, mixed=m.model_dump(), symmetric=q.symmetric,
                    per_channel=q.per_channel, root=loaded.data.root, tool=TOOL_VERSION)
    solution = cache.get("mixed", "assignment", key)
    if solution is None:
        x, y = load_split(loaded, "train", 128 * m.batches)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)]
        solution = assign_bits(loaded.model, batches, m, symmetric=q.symmetric, per_channel=q.per_channel)
        cache.put("mixed", "assignment", key, solution)
    name = "mixed" + (f"a{q.act_bits}" if q.act_bits else "")
    return Variant(name, q.spec(None, solution["bits"]))


def _open(loaded: Deployable, split: str, limit: int | None, stream: bool):
    """The deployable's dataset split, checked against its model (classes, input shape)."""
    data, shape = loaded.data, list(loaded.input.shape)
    if data.dataset is None:
        raise HeroError(f"{loaded.path} does not say which data it was trained on: pass --dataset "
                        "(config: data: {dataset: ...})")
    ds = hdata.load_dataset(data.dataset, split, root=data.root, channels=data.channels, image_size=data.image_size,
                            limit=limit, stream=stream)
    if ds.num_classes > len(loaded.input.classes):
        raise HeroError(f"{data.dataset} has {ds.num_classes} classes but the model of {loaded.path} predicts "
                        f"{len(loaded.input.classes)}: pass the dataset it was trained on")
    found = list(ds.images[0][0].shape) if isinstance(ds, hdata.StreamedSplit) else list(ds.images.shape[1:])
    if found != shape:
        raise HeroError(f"{data.dataset} images are {found}, the model of {loaded.path} takes "
                        f"{shape}: pass the dataset it was trained on")
    return ds


def _normalized(loaded: Deployable, images) -> np.ndarray:
    return hdata.normalize(images, loaded.input.mean, loaded.input.std).numpy()


def load_split(loaded: Deployable, split: str, limit: int | None):
    """The deployable's dataset split "train" or "test" (its first `limit` samples), preprocessed
    and normalised as in training: float32 numpy images and labels, in memory. Your own images are
    decoded to the model's input shape."""
    ds = _open(loaded, split, limit, stream=False)
    return _normalized(loaded, ds.images), ds.labels.numpy()


def calibrate_stage(loaded: Deployable, spec: QuantSpec, batches: int) -> Calibration | None:
    """Per-layer int8 activation scales from the first `batches` training batches of 128
    (None when activations take no calibrated ranges: act_bits None, or block_size's per-call blocks)."""
    if not spec.calibrated:
        return None
    x, _ = load_split(loaded, "train", 128 * batches)
    return calibrate_activations(loaded.model, (torch.from_numpy(x[i : i + 128]) for i in range(0, len(x), 128)), spec)


def export_options(export: ExportSection, spec: QuantSpec, metadata: dict[str, str]) -> ExportOptions:
    """The export section applied to one variant: INT4 storage only where bits <= 4 and no integer
    kernel is meant to read the weights (ORT's QLinearConv/QGemm fuse int8 weights only, so a W4A8
    variant laid out for them stores its 4-bit codes as int8), fp16 only for the baseline."""
    widths = [b for _, b in spec.layer_bits] if spec.layer_bits else [spec.bits]
    int4 = (export.int4_storage and spec.bits is not None and min(widths) <= 4 and spec.grid == "canonical"
            and not spec.integer_activations)
    return ExportOptions(int4_storage=int4, fp16=export.fp16_baseline and spec.bits is None, opset=export.opset,
                         metadata=metadata, matmul_nbits=export.matmul_nbits and spec.block_size is not None
                         and min(widths) <= 4)


def export_stage(loaded: Deployable, variants: list[Variant], export: ExportSection, calibration: Calibration | None,
                 run_dir: Path) -> list[Artifact]:
    """Export every variant to ONNX (skipping those whose inputs did not change)."""
    cache, out = StageCache(run_dir), []
    for variant in variants:
        path = run_dir / "artifacts" / f"{variant.name}.onnx"
        spec = variant.spec
        scales = calibration if spec.calibrated else None
        options = export_options(export, spec, {"hero.source_sha256": loaded.sha256, "hero.variant": variant.name})
        key = input_key(checkpoint=loaded.sha256, spec=spec.to_dict(), int4=options.int4_storage, fp16=options.fp16,
                        opset=options.opset, nbits=options.matmul_nbits, act_scales=scales and scales.scales,
                        tool=TOOL_VERSION)
        if cache.get("export", variant.name, key) is None:
            export_onnx(loaded.model, path, spec, options, scales, input_shape=loaded.input.shape)
            cache.put("export", variant.name, key, {"path": str(path)}, files=[path])
        out.append(Artifact(variant, path, sha256_file(path), path.stat().st_size,
                            packed_weight_bytes(loaded.model, spec)))
    return out


def artifact_from_file(path: Path, loaded: Deployable) -> tuple[Artifact, Calibration | None]:
    """An exported artifact's variant, read back from its hero.quantization metadata (for `hero validate`)."""
    meta = ort_runtime.OnnxRuntimeRunner(path).metadata
    spec, calibration = read_quantization(meta, path, loaded.sha256)
    name = meta.get("hero.variant", path.stem)
    return Artifact(Variant(name, spec), path, sha256_file(path), path.stat().st_size,
                    packed_weight_bytes(loaded.model, spec)), calibration


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
                           for i in range(0, len(x), batch_size)])


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest absolute logit difference between two runs."""
    return ort_runtime.top1(other, reference.argmax(1)), float(np.abs(reference - other).max())


def validate_artifact(loaded: Deployable, artifact: Artifact, calibration: Calibration | None, batches,
                      v: ValidateSection, rt: RuntimeSection) -> dict:
    """Accuracy of the PyTorch emulation and of the runtime artifact, and how well they agree, over
    `batches()`: an iterable of (x float32, y) batches, consumed once, so a streamed test set is
    never held whole. The literal (unoptimised) graph runs on the first v.unoptimized_samples.

    Consistent: without activation quantization, every logit within v.logit_atol * max(1, max
    |logit|) and top-1 agreement >= v.min_agreement, for both sessions (float summation order is all
    that differs). With it (act_bits 8), a rounding flip moves an activation a whole step and deep
    networks carry it on, so the bounds scale with the activation rounding's own effect, measured
    against the same weights with float activations (`act_noise_rms`, `act_flip_rate`): the RMS logit
    difference within max(logit_atol * scale, ACT_NOISE_FACTOR * act_noise_rms) and the disagreement
    within max(1 - min_agreement, ACT_NOISE_FACTOR * act_flip_rate)."""
    spec = artifact.variant.spec
    act = calibration if spec.calibrated else None
    emulation = quantize_model(loaded.model, spec, act)
    # A nested grid's price: the canonical grid's accuracy at the same widths, on the same images.
    canonical = (quantize_model(loaded.model, dataclasses.replace(spec, grid="canonical"), act)
                 if spec.grid == "nested" else None)
    float_acts = quantize_model(loaded.model, dataclasses.replace(spec, act_bits=None)) if spec.act_bits else None
    runner = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=rt.providers, intra_op_threads=rt.threads)
    literal = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=rt.providers, optimization="disabled",
                                            intra_op_threads=rt.threads)
    counts = dict.fromkeys(("n", "torch", "runtime", "agree", "n_literal", "agree_literal", "canonical", "act_flips"), 0)
    squares = dict.fromkeys(("runtime", "literal", "act"), 0.0)
    diff = diff_literal = 0.0
    scale, latency, budget = 1.0, None, v.unoptimized_samples
    for x, y in batches():
        reference = torch_logits(emulation, x, v.batch_size)
        logits = runner.predict(x, batch_size=v.batch_size)
        if latency is None:
            latency = ort_runtime.time_batches(runner, x[: v.latency_batch], v.latency_repeats)
        top = reference.argmax(1)
        counts["n"] += len(y)
        counts["torch"] += int((top == y).sum())
        counts["runtime"] += int((logits.argmax(1) == y).sum())
        counts["agree"] += int((logits.argmax(1) == top).sum())
        if canonical is not None:
            counts["canonical"] += int((torch_logits(canonical, x, v.batch_size).argmax(1) == y).sum())
        if float_acts is not None:
            plain_acts = torch_logits(float_acts, x, v.batch_size)
            counts["act_flips"] += int((plain_acts.argmax(1) != top).sum())
            squares["act"] += float(((reference - plain_acts) ** 2).sum())
        diff = max(diff, float(np.abs(reference - logits).max()))
        squares["runtime"] += float(((reference - logits) ** 2).sum())
        scale = max(scale, float(np.abs(reference).max()))
        # Optimisation passes have been reported to change dequantize results: check the literal graph too.
        take = len(y) if budget is None else max(0, min(len(y), budget - counts["n_literal"]))
        if take:
            plain = literal.predict(x[:take], batch_size=v.batch_size)
            counts["n_literal"] += take
            counts["agree_literal"] += int((plain.argmax(1) == top[:take]).sum())
            diff_literal = max(diff_literal, float(np.abs(reference[:take] - plain).max()))
            squares["literal"] += float(((reference[:take] - plain) ** 2).sum())
    if not counts["n"]:
        raise HeroError(f"no test samples to validate {artifact.path} on: check the dataset and limit_test")
    classes = reference.shape[1]
    rms = {k: math.sqrt(squares[k] / (max(1, counts["n_literal" if k == "literal" else "n"]) * classes)) for k in squares}
    result = {"torch_accuracy": counts["torch"] / counts["n"], "runtime_accuracy": counts["runtime"] / counts["n"],
              "agreement": counts["agree"] / counts["n"], "max_logit_diff": diff, "providers": runner.providers,
              "latency_ms": latency, "agreement_unoptimized": counts["agree_literal"] / counts["n_literal"],
              "max_logit_diff_unoptimized": diff_literal, "rms_logit_diff": rms["runtime"],
              "rms_logit_diff_unoptimized": rms["literal"], "test_samples": counts["n"]}
    if canonical is not None:
        result["canonical_torch_accuracy"] = counts["canonical"] / counts["n"]
    worst_agreement = min(result["agreement"], result["agreement_unoptimized"])
    if float_acts is None:
        result["consistent"] = bool(worst_agreement >= v.min_agreement and max(diff, diff_literal) <= v.logit_atol * scale)
        return result
    result["act_noise_rms"], result["act_flip_rate"] = rms["act"], counts["act_flips"] / counts["n"]
    rms_bound = max(v.logit_atol * scale, ACT_NOISE_FACTOR * rms["act"])
    disagreement_bound = max(1 - v.min_agreement, ACT_NOISE_FACTOR * result["act_flip_rate"])
    result["consistent"] = bool(1 - worst_agreement <= disagreement_bound + 1e-12
                                and max(rms["runtime"], rms["literal"]) <= rms_bound)
    return result


def in_memory_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """`validate_artifact`'s batches over arrays already in memory."""
    return lambda: ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size))


def validate_stage(loaded: Deployable, artifacts: list[Artifact], calibration: Calibration | None,
                   v: ValidateSection, rt: RuntimeSection, test_data, run_dir: Path) -> list[dict]:
    """One result row per artifact, in the report.json schema; cached per artifact. `test_data`
    is an EvalSplit (opened only when some artifact is not cached)."""
    cache, rows = StageCache(run_dir), []
    for art in artifacts:
        key = input_key(artifact=art.sha256, checkpoint=loaded.sha256, validate=v.model_dump(),
                        runtime=rt.model_dump(), data=test_data.key)
        measured = cache.get("validate", art.variant.name, key)
        if measured is None:
            batches = test_data.batches(max(v.batch_size, v.latency_batch))  # latency on a full first batch
            measured = validate_artifact(loaded, art, calibration, batches, v, rt)
            cache.put("validate", art.variant.name, key, measured)
        spec = art.variant.spec
        # TensorRT's explicit-quantization rules, checked on every integer variant whatever the target.
        lint = lint_explicit_quantization(str(art.path)) if spec.bits is not None else []
        kernels = kernel_summary(art.path, rt.providers, rt.threads)
        unfused = integer_lint(spec, kernels) + (residual_warnings(str(art.path)) if spec.act_layout == "tensorrt" else [])
        for warning in unfused:
            print(f"hero: warning: {art.variant.name}: {warning}", file=sys.stderr)
        row = {"name": art.variant.name, "bits": spec.bits, "symmetric": spec.symmetric,
               "per_channel": spec.per_channel, "block_size": spec.block_size, "act_bits": spec.act_bits,
               "act_layout": spec.act_layout if spec.act_bits else None, "bn": spec.bn, "grid": spec.grid,
               "layer_bits": None if spec.layer_bits is None else dict(spec.layer_bits),
               "average_bits": average_bits(loaded.model, spec), "runtime": "onnxruntime",
               "target_runtime": rt.name, "trt_lint": lint, "kernels": kernels, "integer_lint": unfused,
               **measured, "file_bytes": art.file_bytes,
               "packed_weight_bytes": art.packed_weight_bytes,
               "artifact": str(art.path.relative_to(run_dir)), "sha256": art.sha256}
        if not row["consistent"]:
            row["first_divergence"] = _first_divergence(loaded, art, test_data, v, rt)
            where = row["first_divergence"]
            print(f"hero: {art.variant.name}: the runtime disagrees with the PyTorch emulation "
                  f"(agreement {min(row['agreement'], row['agreement_unoptimized']):.4f}, max |Δlogit| "
                  f"{max(row['max_logit_diff'], row['max_logit_diff_unoptimized']):.3g})"
                  + (f"; first diverging layer: {where['module']} (max |Δ| {where['max_abs_diff']:.3g})"
                     if where else ""), file=sys.stderr)
        rows.append(row)
    return rows


def _first_divergence(loaded: Deployable, art: Artifact, test_data, v: ValidateSection, rt: RuntimeSection) -> dict | None:
    """Where an inconsistent artifact parts from its emulation (pipeline.debug on 256 test images):
    {"module", "node", "max_abs_diff", "tolerance"} of the first layer beyond tolerance, or None."""
    x = np.concatenate([b for b, _ in itertools.islice(test_data.batches(256)(), 1)])
    row = first_divergence(loaded, art.path, x, atol=v.logit_atol, providers=rt.providers)
    return None if row is None else {k: row[k] for k in ("module", "node", "max_abs_diff", "tolerance")}


class EvalSplit:
    """A checkpoint's test split for validation, opened on first use: held in memory, or (an image
    folder larger than hero_train.data.IN_MEMORY_BYTES decoded) streamed batch by batch."""

    def __init__(self, loaded: Deployable, limit: int | None):
        self.loaded, self.limit = loaded, limit
        self.key = {"dataset": loaded.data.dataset, "limit": limit, "root": loaded.data.root}
        self._split = None

    def batches(self, batch_size: int):
        """A callable giving (x float32, y int64) numpy batches, normalised as in training."""
        def iterate():
            if self._split is None:
                self._split = _open(self.loaded, "test", self.limit, stream=True)
            split = self._split
            if isinstance(split, hdata.StreamedSplit):
                for images, labels in split.batches(batch_size, self.limit):
                    yield _normalized(self.loaded, images), labels.numpy()
                return
            for i in range(0, len(split.labels), batch_size):
                yield _normalized(self.loaded, split.images[i : i + batch_size]), split.labels[i : i + batch_size].numpy()
        return iterate
