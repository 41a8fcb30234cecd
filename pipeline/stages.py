"""The deploy stages, plain functions over plain data.

checkpoint → variants (QuantSpec per precision) → exported artifacts → validation results → report.
Each stage that writes files records its inputs in the run's StageCache and is skipped on a rerun
whose inputs did not change.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.device import runtime as ort_runtime
from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.onnx import export_onnx
from exporters.quantize import QuantSpec, calibrate_activations, packed_weight_bytes, quantize_model
from exporters.trt_lint import lint_explicit_quantization
from hero_train import data as hdata
from hero_train.checkpoint import load_checkpoint, model_from_checkpoint
from hero_train.train import train
from pipeline.cache import StageCache, input_key
from pipeline.config import DeployConfig, QuantizeSection

TOOL_VERSION = "0.1.0"


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


def train_stage(config: DeployConfig, run_dir: Path) -> Path:
    """Train (or finish training) the config's model; a completed run is not redone."""
    train_config = config.train_config()
    if train_config is None:
        raise HeroError("the config has no 'train' section: pass --checkpoint CKPT")
    return train(train_config, run_dir / "train", resume=True)


def load_stage(checkpoint: Path) -> Loaded:
    ckpt = load_checkpoint(checkpoint)
    return Loaded(Path(checkpoint), ckpt, model_from_checkpoint(ckpt), sha256_file(checkpoint))


def variants_stage(q: QuantizeSection) -> list[Variant]:
    """The baseline plus one variant per requested bit width, named like w4 or w4a8."""
    base = QuantSpec(bits=None, fold_bn=q.fold_bn)
    out = [Variant("fp32", base)]
    for bits in q.bits:
        spec = QuantSpec(bits=bits, symmetric=q.symmetric, per_channel=q.per_channel, fold_bn=q.fold_bn,
                         act_bits=q.act_bits, act_method=q.act_method, act_percentile=q.act_percentile)
        out.append(Variant(f"w{bits}" + (f"a{q.act_bits}" if q.act_bits else ""), spec))
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


def calibrate_stage(loaded: Loaded, q: QuantizeSection, data_root: str | None) -> dict[str, float] | None:
    """Per-layer int8 activation scales from the first training batches (W{n}A8 only)."""
    if q.act_bits is None:
        return None
    x, _ = eval_data(loaded, "train", 128 * q.calibration_batches, data_root)
    batches = (torch.from_numpy(x[i : i + 128]) for i in range(0, len(x), 128))
    return calibrate_activations(loaded.model, batches, method=q.act_method, percentile=q.act_percentile)


def export_stage(loaded: Loaded, variants: list[Variant], act_scales, config: DeployConfig,
                 run_dir: Path) -> list[Artifact]:
    """Export every variant to ONNX (skipping those whose inputs did not change)."""
    cache, out = StageCache(run_dir), []
    for variant in variants:
        path = run_dir / "artifacts" / f"{variant.name}.onnx"
        int4 = config.export.int4_storage and variant.spec.bits is not None and variant.spec.bits <= 4
        fp16 = config.export.fp16_baseline and variant.spec.bits is None
        scales = act_scales if variant.spec.act_bits else None
        key = input_key(checkpoint=loaded.sha256, spec=dataclasses.asdict(variant.spec), int4=int4,
                        fp16=fp16, opset=config.export.opset, act_scales=scales, tool=TOOL_VERSION)
        if cache.get("export", variant.name, key) is None:
            export_onnx(loaded.model, path, input_shape=tuple(loaded.ckpt["input_shape"]), spec=variant.spec,
                        act_scales=scales, fp16=fp16, int4_storage=int4, opset=config.export.opset,
                        metadata={"hero.source_sha256": loaded.sha256, "hero.variant": variant.name})
            cache.put("export", variant.name, key, {"path": str(path)}, files=[path])
        out.append(Artifact(variant, path, sha256_file(path), path.stat().st_size,
                            packed_weight_bytes(loaded.model, variant.spec.bits)))
    return out


def artifact_from_file(path: Path, loaded: Loaded) -> tuple[Artifact, dict[str, float] | None]:
    """Rebuild an exported artifact's variant from its hero.* metadata (for `hero validate`)."""
    meta = ort_runtime.OnnxRuntimeRunner(path).metadata
    if "hero.bits" not in meta:
        raise HeroError(f"{path} has no hero.* metadata: validate artifacts written by hero export / hero run")
    if meta.get("hero.source_sha256") not in (None, loaded.sha256):
        raise HeroError(f"{path} was exported from another checkpoint (sha256 {meta['hero.source_sha256'][:12]}…)")
    scheme = meta.get("hero.scheme", "symmetric,per_channel").split(",")
    number = lambda key: None if meta.get(key, "none") == "none" else int(meta[key])  # noqa: E731
    spec = QuantSpec(bits=number("hero.bits"), symmetric=scheme[0] == "symmetric",
                     per_channel=scheme[-1] == "per_channel", fold_bn=meta.get("hero.fold_bn") != "false",
                     act_bits=number("hero.act_bits"))
    scales = json.loads(meta["hero.act_scales"]) if "hero.act_scales" in meta else None
    name = meta.get("hero.variant", path.stem)
    return Artifact(Variant(name, spec), path, sha256_file(path), path.stat().st_size,
                    packed_weight_bytes(loaded.model, spec.bits)), scales


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
                           for i in range(0, len(x), batch_size)])


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest absolute logit difference between two runs."""
    agreement = float((reference.argmax(1) == other.argmax(1)).mean())
    return agreement, float(np.abs(reference - other).max())


def validate_artifact(loaded: Loaded, artifact: Artifact, act_scales, x: np.ndarray, y: np.ndarray,
                      config: DeployConfig) -> dict:
    """Accuracy of the PyTorch emulation and of the runtime artifact, and how well they agree."""
    v = config.validate_
    spec = artifact.variant.spec
    emulation = quantize_model(loaded.model, spec, act_scales=act_scales if spec.act_bits else None)
    reference = torch_logits(emulation, x, v.batch_size)
    result = {"torch_accuracy": float((reference.argmax(1) == y).mean())}
    runner = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=config.runtime.providers,
                                           intra_op_threads=config.runtime.threads)
    logits = runner.predict(x, batch_size=v.batch_size)
    agreement, diff = compare_logits(reference, logits)
    result.update(runtime_accuracy=float((logits.argmax(1) == y).mean()), agreement=agreement,
                  max_logit_diff=diff, providers=runner.providers,
                  latency_ms=ort_runtime.time_batches(runner, x[: v.latency_batch], v.latency_repeats))
    # Optimisation passes have been reported to change dequantize results: check the literal graph too.
    n = v.unoptimized_samples or len(x)
    literal = ort_runtime.OnnxRuntimeRunner(artifact.path, providers=config.runtime.providers,
                                            optimization="disabled", intra_op_threads=config.runtime.threads)
    agreement, diff = compare_logits(reference[:n], literal.predict(x[:n], batch_size=v.batch_size))
    result.update(agreement_unoptimized=agreement, max_logit_diff_unoptimized=diff)
    scale = max(1.0, float(np.abs(reference).max()))
    worst_agreement = min(result["agreement"], result["agreement_unoptimized"])
    worst_diff = max(result["max_logit_diff"], result["max_logit_diff_unoptimized"])
    result["consistent"] = bool(worst_agreement >= v.min_agreement and worst_diff <= v.logit_atol * scale)
    return result


def validate_stage(loaded: Loaded, artifacts: list[Artifact], act_scales, config: DeployConfig,
                   run_dir: Path, data_root: str | None = None) -> list[dict]:
    """One result row per artifact, in the report.json schema; cached per artifact."""
    cache, rows, data = StageCache(run_dir), [], None
    for art in artifacts:
        key = input_key(artifact=art.sha256, checkpoint=loaded.sha256, validate=config.validate_.model_dump(),
                        runtime=config.runtime.model_dump(), data_root=data_root)
        measured = cache.get("validate", art.variant.name, key)
        if measured is None:
            if data is None:
                data = eval_data(loaded, "test", config.validate_.limit_test, data_root)
            measured = validate_artifact(loaded, art, act_scales, *data, config)
            cache.put("validate", art.variant.name, key, measured)
        spec = art.variant.spec
        # TensorRT's explicit-quantization rules, checked on every integer variant whatever the target.
        lint = lint_explicit_quantization(str(art.path)) if spec.bits is not None else []
        row = {"name": art.variant.name, "bits": spec.bits, "symmetric": spec.symmetric,
               "per_channel": spec.per_channel, "act_bits": spec.act_bits, "runtime": "onnxruntime",
               "target_runtime": config.runtime.name, "trt_lint": lint, **measured, "file_bytes": art.file_bytes, "packed_weight_bytes": art.packed_weight_bytes,
               "artifact": str(art.path.relative_to(run_dir)), "sha256": art.sha256}
        if not row["consistent"]:
            print(f"hero: {art.variant.name}: the runtime disagrees with the PyTorch emulation "
                  f"(agreement {min(row['agreement'], row['agreement_unoptimized']):.4f}, max |Δlogit| "
                  f"{max(row['max_logit_diff'], row['max_logit_diff_unoptimized']):.3g})", file=sys.stderr)
        rows.append(row)
    return rows
