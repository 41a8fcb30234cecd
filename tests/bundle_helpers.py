"""A tiny precision-switch bundle (fp32, w8, w4 of a small conv net on 28x28 stand-in Fashion-MNIST),
built once per test session with pipeline.bundle and shared by test_bundle, test_switch and
test_validate_bundle. Tests that change a bundle copy it first (`copy_bundle`)."""

import shutil
from pathlib import Path

import torch
from conftest import make_fashion_mnist

from exporters.device.files import sha256_file
from exporters.onnx import ExportOptions, export_onnx
from pipeline import stages
from pipeline.bundle import BundleOptions, write_bundle
from pipeline.config import QuantizeSection

TEST_SAMPLES = 24
CPU = ("CPUExecutionProvider",)
_BUILT: dict = {}


def tiny_conv(num_classes: int = 10, in_channels: int = 1) -> torch.nn.Module:
    """A small conv net outside the zoo (factory `bundle_helpers:tiny_conv`)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes))


def tiny_loaded(data_root: Path) -> stages.Loaded:
    """A Loaded as load_stage would give (checkpoint file aside), for a small random conv net."""
    torch.manual_seed(0)
    model = tiny_conv().eval()
    ckpt = {"model": {"name": None, "factory": "bundle_helpers:tiny_conv", "kwargs": {}, "num_classes": 10,
                      "in_channels": 1}, "input_shape": [1, 28, 28],
            "dataset": "fashion-mnist", "normalization": {"mean": [0.2860], "std": [0.3530]}}
    return stages.Loaded(data_root / "tiny.pt", ckpt, model, "c0ffee" * 10 + "abcd")


def export_variants(loaded: stages.Loaded, folder: Path) -> tuple[list[stages.Artifact], list[dict]]:
    """fp32, w8 and w4 (int4 storage) artifacts, and hand-made validation rows for them."""
    artifacts, rows = [], []
    for i, variant in enumerate(stages.variants_stage(QuantizeSection(bits=[8, 4]))):
        path = folder / f"{variant.name}.onnx"
        export_onnx(loaded.model, path, variant.spec, ExportOptions(int4_storage=variant.spec.bits == 4),
                    input_shape=(1, 28, 28))
        artifacts.append(stages.Artifact(variant, path, sha256_file(path), path.stat().st_size, 0))
        spec = variant.spec
        rows.append({"name": variant.name, "bits": spec.bits, "symmetric": spec.symmetric,
                     "per_channel": spec.per_channel, "act_bits": spec.act_bits, "runtime": "onnxruntime",
                     "torch_accuracy": 0.5 - 0.1 * i, "runtime_accuracy": 0.5 - 0.1 * i,
                     "sha256": artifacts[-1].sha256, "artifact": f"artifacts/{path.name}"})
    return artifacts, rows


def built_bundle(tmp_path_factory) -> dict:
    """{"bundle", "loaded", "artifacts", "rows", "options"} of the session's tiny bundle."""
    if "bundle" not in _BUILT:
        root = tmp_path_factory.mktemp("tiny_bundle")
        data_root = make_fashion_mnist(root / "fmnist", n_train=8, n_test=40)
        loaded = tiny_loaded(data_root)
        artifacts, rows = export_variants(loaded, root / "run" / "artifacts")
        options = BundleOptions(test_samples=TEST_SAMPLES, data_root=str(data_root), providers=CPU,
                                latency_batch=8, latency_repeats=1)
        bundle = write_bundle(loaded, rows, {a.variant.name: a.path for a in artifacts}, root / "bundle", options)
        _BUILT.update(bundle=bundle, loaded=loaded, artifacts=artifacts, rows=rows, options=options)
    return dict(_BUILT)


def copy_bundle(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target
