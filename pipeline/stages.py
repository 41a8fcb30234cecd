"""The deploy stages, plain functions over plain data.

checkpoint → variants (QuantSpec per precision) → exported artifacts → validation results → report.
Each stage that writes files records its inputs in the run's StageCache and is skipped on a rerun
whose inputs did not change.
"""

from __future__ import annotations

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
from exporters.quantize import Calibration, QuantSpec, calibrate_activations, packed_weight_bytes, quantize_model
from exporters.trt_lint import lint_explicit_quantization
from hero_train import data as hdata
from hero_train.checkpoint import load_checkpoint, model_from_checkpoint
from hero_train.train import TrainConfig, train
from pipeline.cache import StageCache, input_key
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


@dataclass
class Loaded:
    """A checkpoint read once: the dict, its model and its sha256."""

    path: Path
    ckpt: dict
    model: torch.nn.Module
    sha256: str


def train_stage(config: TrainConfig | None, run_dir: Path) -> Path:
    """Train (or finish training) the configured model; a completed run is not redone."""
    if config is None:
        raise HeroError("the config has no 'train' section: pass --checkpoint CKPT")
    return train(config, run_dir / "train", resume=True)


def load_stage(checkpoint: Path) -> Loaded:
    ckpt = load_checkpoint(checkpoint)
    return Loaded(Path(checkpoint), ckpt, model_from_checkpoint(ckpt), sha256_file(checkpoint))


def variants_stage(q: QuantizeSection) -> list[Variant]:
    """The baseline plus one variant per requested bit width, named like w4 or w4a8."""
    out = [Variant("fp32", q.spec(None))]
    for bits in q.bits:
        out.append(Variant(f"w{bits}" + (f"a{q.act_bits}" if q.act_bits else ""), q.spec(bits)))
    return out


def eval_data(loaded: Loaded, split: str, limit: int | None, data_root: str | None = None):
    """The checkpoint's dataset split, normalised as in training: float32 numpy images and labels."""
    ds = hdata.load_dataset(loaded.ckpt["dataset"], split, root=data_root)
    images, labels = ds.images, ds.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    norm = loaded.ckpt["normalization"]
    x = hdata.normalize(images, tuple(norm["mean"]), tuple(norm["std"]))
    return x.numpy(), labels.numpy()


def calibrate_stage(loaded: Loaded, spec: QuantSpec, batches: int, data_root: str | None) -> Calibration | None:
    """Per-layer int8 activation scales from the first `batches` training batches of 128
    (None when spec.act_bits is None: nothing to calibrate)."""
    if spec.act_bits is None:
        return None
    x, _ = eval_data(loaded, "train", 128 * batches, data_root)
    return calibrate_activations(loaded.model, (torch.from_numpy(x[i : i + 128]) for i in range(0, len(x), 128)), spec)


def export_options(export: ExportSection, spec: QuantSpec, metadata: dict[str, str]) -> ExportOptions:
    """The export section applied to one variant: INT4 storage only where bits <= 4, fp16 only for the baseline."""
    return ExportOptions(int4_storage=export.int4_storage and spec.bits is not None and spec.bits <= 4,
                         fp16=export.fp16_baseline and spec.bits is None, opset=export.opset, metadata=metadata)


def export_stage(loaded: Loaded, variants: list[Variant], export: ExportSection, calibration: Calibration | None,
                 run_dir: Path) -> list[Artifact]:
    """Export every variant to ONNX (skipping those whose inputs did not change)."""
    cache, out = StageCache(run_dir), []
    for variant in variants:
        path = run_dir / "artifacts" / f"{variant.name}.onnx"
        spec = variant.spec
        scales = calibration if spec.act_bits else None
        options = export_options(export, spec, {"hero.source_sha256": loaded.sha256, "hero.variant": variant.name})
        key = input_key(checkpoint=loaded.sha256, spec=spec.to_dict(), int4=options.int4_storage, fp16=options.fp16,
                        opset=options.opset, act_scales=scales and scales.scales, tool=TOOL_VERSION)
        if cache.get("export", variant.name, key) is None:
            export_onnx(loaded.model, path, spec, options, scales, input_shape=tuple(loaded.ckpt["input_shape"]))
            cache.put("export", variant.name, key, {"path": str(path)}, files=[path])
        out.append(Artifact(variant, path, sha256_file(path), path.stat().st_size,
                            packed_weight_bytes(loaded.model, spec.bits)))
    return out


def artifact_from_file(path: Path, loaded: Loaded) -> tuple[Artifact, Calibration | None]:
    """An exported artifact's variant, read back from its hero.quantization metadata (for `hero validate`)."""
    meta = ort_runtime.OnnxRuntimeRunner(path).metadata
    spec, calibration = read_quantization(meta, path)
    if meta.get("hero.source_sha256") not in (None, loaded.sha256):
        raise HeroError(f"{path} was exported from another checkpoint (sha256 {meta['hero.source_sha256'][:12]}…)")
    name = meta.get("hero.variant", path.stem)
    return Artifact(Variant(name, spec), path, sha256_file(path), path.stat().st_size,
                    packed_weight_bytes(loaded.model, spec.bits)), calibration


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
                           for i in range(0, len(x), batch_size)])


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest absolute logit difference between two runs."""
    return ort_runtime.top1(other, reference.argmax(1)), float(np.abs(reference - other).max())


def validate_artifact(loaded: Loaded, artifact: Artifact, calibration: Calibration | None, x: np.ndarray,
                      y: np.ndarray, v: ValidateSection, rt: RuntimeSection) -> dict:
    """Accuracy of the PyTorch emulation and of the runtime artifact, and how well they agree."""
    spec = artifact.variant.spec
    emulation = quantize_model(loaded.model, spec, calibration if spec.act_bits else None)
    reference = torch_logits(emulation, x, v.batch_size)
    result = {"torch_accuracy": ort_runtime.top1(reference, y)}
    runner = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=rt.providers, intra_op_threads=rt.threads)
    logits = runner.predict(x, batch_size=v.batch_size)
    agreement, diff = compare_logits(reference, logits)
    result.update(runtime_accuracy=ort_runtime.top1(logits, y), agreement=agreement,
                  max_logit_diff=diff, providers=runner.providers,
                  latency_ms=ort_runtime.time_batches(runner, x[: v.latency_batch], v.latency_repeats))
    # Optimisation passes have been reported to change dequantize results: check the literal graph too.
    n = v.unoptimized_samples or len(x)
    literal = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=rt.providers, optimization="disabled",
                                            intra_op_threads=rt.threads)
    agreement, diff = compare_logits(reference[:n], literal.predict(x[:n], batch_size=v.batch_size))
    result.update(agreement_unoptimized=agreement, max_logit_diff_unoptimized=diff)
    scale = max(1.0, float(np.abs(reference).max()))
    worst_agreement = min(result["agreement"], result["agreement_unoptimized"])
    worst_diff = max(result["max_logit_diff"], result["max_logit_diff_unoptimized"])
    result["consistent"] = bool(worst_agreement >= v.min_agreement and worst_diff <= v.logit_atol * scale)
    return result


def validate_stage(loaded: Loaded, artifacts: list[Artifact], calibration: Calibration | None,
                   v: ValidateSection, rt: RuntimeSection, test_data, run_dir: Path) -> list[dict]:
    """One result row per artifact, in the report.json schema; cached per artifact. `test_data`
    is a callable returning (x, y), called only when some artifact is not cached, and a dict
    of what it depends on (`test_data.key`)."""
    cache, rows, data = StageCache(run_dir), [], None
    for art in artifacts:
        key = input_key(artifact=art.sha256, checkpoint=loaded.sha256, validate=v.model_dump(),
                        runtime=rt.model_dump(), data=test_data.key)
        measured = cache.get("validate", art.variant.name, key)
        if measured is None:
            if data is None:
                data = test_data()
            measured = validate_artifact(loaded, art, calibration, *data, v, rt)
            cache.put("validate", art.variant.name, key, measured)
        spec = art.variant.spec
        # TensorRT's explicit-quantization rules, checked on every integer variant whatever the target.
        lint = lint_explicit_quantization(str(art.path)) if spec.bits is not None else []
        row = {"name": art.variant.name, "bits": spec.bits, "symmetric": spec.symmetric,
               "per_channel": spec.per_channel, "act_bits": spec.act_bits, "runtime": "onnxruntime",
               "target_runtime": rt.name, "trt_lint": lint, **measured, "file_bytes": art.file_bytes,
               "packed_weight_bytes": art.packed_weight_bytes,
               "artifact": str(art.path.relative_to(run_dir)), "sha256": art.sha256}
        if not row["consistent"]:
            print(f"hero: {art.variant.name}: the runtime disagrees with the PyTorch emulation "
                  f"(agreement {min(row['agreement'], row['agreement_unoptimized']):.4f}, max |Δlogit| "
                  f"{max(row['max_logit_diff'], row['max_logit_diff_unoptimized']):.3g})", file=sys.stderr)
        rows.append(row)
    return rows


class EvalSplit:
    """A checkpoint's test split, loaded on first call: (x, y) as `eval_data` gives them."""

    def __init__(self, loaded: Loaded, limit: int | None, root: str | None):
        self.loaded, self.limit, self.root = loaded, limit, root
        self.key = {"dataset": loaded.ckpt["dataset"], "limit": limit, "root": root}
        self._data = None

    def __call__(self):
        if self._data is None:
            self._data = eval_data(self.loaded, "test", self.limit, self.root)
        return self._data
