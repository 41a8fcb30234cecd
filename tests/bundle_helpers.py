"""A tiny precision-switch bundle (fp32, w8, w4 of a small conv net on 28x28 stand-in Fashion-MNIST),
built once per test session with pipeline.bundle and shared by test_bundle, test_switch and
test_validate_bundle. Tests that change a bundle copy it first (`copy_bundle`)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import make_fashion_mnist

import exporters.device
from exporters.device.files import sha256_file
from exporters.device.trt_contract import build_flags, sidecar_path
from exporters.onnx import ExportOptions, export_onnx
from hero_train.checkpoint import DataRef, Deployable, InputSpec
from hero_train.models import ModelRef
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


def tiny_loaded(data_root: Path) -> Deployable:
    """A Deployable as load_deployable would give (checkpoint file aside), for a small random conv net."""
    torch.manual_seed(0)
    model = tiny_conv().eval()
    return Deployable(model, ModelRef(factory="bundle_helpers:tiny_conv"),
                      InputSpec((1, 28, 28), (0.2860,), (0.3530,), tuple(str(i) for i in range(10))),
                      DataRef("fashion-mnist", str(data_root)), data_root / "tiny.pt", "c0ffee" * 10 + "abcd")


def export_variants(loaded: Deployable, folder: Path) -> tuple[list[stages.Artifact], list[dict]]:
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
        options = BundleOptions(test_samples=TEST_SAMPLES, providers=CPU, latency_batch=8, latency_repeats=1)
        bundle = write_bundle(loaded, rows, {a.variant.name: a.path for a in artifacts}, root / "bundle", options)
        _BUILT.update(bundle=bundle, loaded=loaded, artifacts=artifacts, rows=rows, options=options)
    return dict(_BUILT)


def copy_bundle(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


class FakeTensorRT:
    """Stands in for exporters.device.tensorrt (no GPU here): records engine builds and refits. An
    engine's logits are a fixed function of the input and of the weights it holds (named by its
    ONNX file's sha256), so a refit that loads a variant's weights computes what that variant's own
    engine computes. With `faulty_refit` a refit reports success but keeps the weights it had, as a
    dropped bias or a weight refit under the wrong name looks from outside."""

    def __init__(self, version: str = "10.0-fake", faulty_refit: bool = False):
        self.version, self.faulty_refit = version, faulty_refit
        self.builds, self.refits = [], []

    def available(self):
        return True, self.version

    def device_identity(self):
        return {"tensorrt_version": self.version, "gpu_name": "fake GPU", "compute_capability": "0.0"}

    def build_engine(self, onnx_path, engine_path, config):
        self.builds.append((Path(engine_path).name, config.precision, config.refit))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_text(sha256_file(onnx_path))
        sidecar = {**self.device_identity(), "onnx_sha256": sha256_file(onnx_path),
                   "flags": build_flags(config, self.version)}
        Path(sidecar_path(engine_path)).write_text(json.dumps(sidecar))

    @staticmethod
    def logits(x: np.ndarray, weights: str) -> np.ndarray:
        """What an engine holding `weights` (an ONNX sha256) computes for `x`."""
        scale = 0.5 + int(weights[:8], 16) / 2 ** 32
        return (np.asarray(x, np.float32).reshape(len(x), -1)[:, :10] * scale).astype(np.float32)

    def TensorRTRunner(self, engine_path):  # noqa: N802 - mirrors the class it stands in for
        fake = self

        class Runner:
            weights = Path(engine_path).read_text()

            def refit_from_onnx(self, onnx_path):
                fake.refits.append(Path(onnx_path).name)
                if not fake.faulty_refit:
                    self.weights = sha256_file(onnx_path)

            def predict(self, x):
                return fake.logits(x, self.weights)

        return Runner()


def use_fake_tensorrt(monkeypatch, fake: FakeTensorRT) -> FakeTensorRT:
    """Make `from exporters.device import tensorrt` give `fake` for the rest of the test."""
    monkeypatch.setitem(sys.modules, "exporters.device.tensorrt", fake)
    monkeypatch.setattr(exporters.device, "tensorrt", fake, raising=False)
    return fake
