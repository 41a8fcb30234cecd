"""PrecisionSwitcher: checks the bundle, switches between prepared sessions or refits, measures the switch."""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from bundle_helpers import CPU, built_bundle, copy_bundle

import exporters.device
from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.switch import PrecisionSwitcher, measure_switch_latency
from exporters.device.trt_contract import build_flags, sidecar_path


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


@pytest.fixture
def images(tiny):
    with np.load(tiny["bundle"] / "test.npz") as data:
        return data["x"][:10]


def test_each_precision_predicts_like_a_fresh_runner_on_its_artifact(tiny, images):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU)
    assert switcher.precisions == [None, 8, 4] and switcher.precision is None
    outputs = {}
    for bits in (4, None, 8, 4):
        switcher.set_precision(bits)
        fresh = OnnxRuntimeRunner(tiny["bundle"] / switcher.variant(bits)["artifact"], CPU)
        outputs[bits] = switcher.predict(images)
        np.testing.assert_allclose(outputs[bits], fresh.predict(images), rtol=0, atol=1e-6)
    assert switcher.precision == 4
    assert not np.allclose(outputs[4], outputs[None], atol=1e-4)  # the switch really changed the model


def test_switching_creates_no_new_session(tiny, images, monkeypatch):
    created = []
    original = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        created.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU)
    # Every variant is prepared up front (a quantized one may take a second, weight-folded build).
    at_start = len(created)
    assert {Path(p).name for p in created} == {"fp32.onnx", "w8.onnx", "w4.onnx"} and at_start <= 6
    for bits in [8, 4, None] * 5:
        switcher.set_precision(bits)
        switcher.predict(images[:2])
    assert len(created) == at_start


def test_tampered_artifact_is_refused_naming_the_file(tiny, tmp_path):
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    path = bundle / "artifacts" / "w4.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HeroError, match="artifacts/w4.onnx in bundle .* but the manifest says"):
        PrecisionSwitcher(bundle, providers=CPU)


def test_manifest_path_leaving_the_bundle_is_refused(tiny, tmp_path):
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"][1]["artifact"] = "../w8.onnx"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeroError, match="not a relative path inside the bundle"):
        PrecisionSwitcher(bundle, providers=CPU)


@pytest.mark.parametrize("problem, message", [("no_folder", "does not exist"), ("no_manifest", "no manifest.json"),
                                              ("not_json", "not valid JSON"), ("other_format", "not a hero-deploy")])
def test_unusable_bundle_folder_is_a_hero_error(tmp_path, problem, message):
    bundle = tmp_path / "bundle"
    if problem != "no_folder":
        bundle.mkdir()
    if problem == "not_json":
        (bundle / "manifest.json").write_text("{")
    if problem == "other_format":
        (bundle / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(HeroError, match=message):
        PrecisionSwitcher(bundle)


def test_unknown_runtime_is_refused_listing_the_choices(tiny):
    with pytest.raises(HeroError, match="unknown runtime 'openvino': choose one of onnxruntime, tensorrt"):
        PrecisionSwitcher(tiny["bundle"], "openvino")


def test_unknown_precision_is_refused_listing_the_choices(tiny):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU)
    with pytest.raises(HeroError, match="no 6-bit variant: choose one of float, 8, 4"):
        switcher.set_precision(6)
    assert switcher.precision is None


def test_measure_switch_latency_switches_every_time_and_ends_where_it_began(tiny, monkeypatch):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU)
    switcher.set_precision(8)
    visited = []
    original = switcher.set_precision
    monkeypatch.setattr(switcher, "set_precision", lambda bits: (visited.append(bits), original(bits)))
    result = measure_switch_latency(switcher, repeats=4)
    assert result["switches"] == len(visited) == 12
    assert all(a != b for a, b in zip([8, *visited[:-1]], visited, strict=True))  # never "switches" to the active one
    assert switcher.precision == 8 and sorted(set(visited), key=str) == sorted({None, 8, 4}, key=str)
    assert 0 <= result["median_ms"] <= result["max_ms"] < 50  # a prepared session is only selected


class _FakeTensorRT:
    """Stands in for exporters.device.tensorrt (no GPU here): records engine builds and refits."""

    def __init__(self):
        self.builds, self.refits = [], []

    def available(self):
        return True, "10.0-fake"

    def device_identity(self):
        return {"tensorrt_version": "10.0-fake", "gpu_name": "fake GPU", "compute_capability": "0.0"}

    def build_engine(self, onnx_path, engine_path, config):
        self.builds.append((Path(onnx_path).name, config.precision, config.refit))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"plan")
        sidecar = {**self.device_identity(), "onnx_sha256": sha256_file(onnx_path), "flags": build_flags(config, self.available()[1])}
        Path(sidecar_path(engine_path)).write_text(json.dumps(sidecar))

    def TensorRTRunner(self, engine_path):  # noqa: N802 - mirrors the class it stands in for
        fake = self

        class Runner:
            def refit_from_onnx(self, onnx_path):
                fake.refits.append(Path(onnx_path).name)

            def predict(self, x):
                return np.zeros((len(x), 10), np.float32)

        return Runner()


def test_tensorrt_switch_refits_one_engine_within_a_refit_group(tiny, tmp_path, monkeypatch):
    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "exporters.device.tensorrt", fake)
    monkeypatch.setattr(exporters.device, "tensorrt", fake, raising=False)
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"][2]["refit_group"] = manifest["variants"][1]["refit_group"]  # w4 refits w8's engine
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    switcher = PrecisionSwitcher(bundle, runtime="tensorrt")
    assert fake.builds == [("fp32.onnx", "fp32", False), ("w8.onnx", "int8", True)]
    for bits in (4, 8, None, 8, 4):
        switcher.set_precision(bits)
    assert fake.refits == ["w4.onnx", "w8.onnx", "w4.onnx"]  # float has its own engine: no refit
    PrecisionSwitcher(bundle, runtime="tensorrt")
    assert len(fake.builds) == 2  # engines built on this device are reused


def test_a_nested_grid_bundle_is_one_refit_group_and_switches_by_refit(tiny, tmp_path, monkeypatch):
    from exporters.onnx import export_onnx
    from exporters.quantize import QuantSpec
    from pipeline.bundle import write_bundle

    loaded, rows, paths = tiny["loaded"], [], {}
    for name, spec in (("fp32", QuantSpec()), ("w8", QuantSpec(bits=8, grid="nested")),
                       ("w4", QuantSpec(bits=4, grid="nested"))):
        path = paths[name] = export_onnx(loaded.model, tmp_path / "run" / f"{name}.onnx", spec, input_shape=(1, 28, 28))
        rows.append({"name": name, **{k: v for k, v in spec.to_dict().items() if k in
                                      ("bits", "symmetric", "per_channel", "act_bits", "bn", "grid", "layer_bits")},
                     "runtime": "onnxruntime", "torch_accuracy": 0.5, "runtime_accuracy": 0.5,
                     "sha256": sha256_file(path), "artifact": f"artifacts/{name}.onnx"})
    bundle = write_bundle(loaded, rows, paths, tmp_path / "bundle", tiny["options"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    group = {v["name"]: v["refit_group"] for v in manifest["variants"]}
    assert group["w8"] == group["w4"] != group["fp32"]
    assert {v["name"]: v["grid"] for v in manifest["variants"]} == {"fp32": "canonical", "w8": "nested", "w4": "nested"}

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "exporters.device.tensorrt", fake)
    monkeypatch.setattr(exporters.device, "tensorrt", fake, raising=False)
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt", engine_dir=tmp_path / "engines")
    assert fake.builds == [("fp32.onnx", "fp32", False), ("w8.onnx", "int8", True)]  # one integer engine
    for bits in (4, 8, 4):
        switcher.set_precision(bits)
    assert fake.refits == ["w4.onnx", "w8.onnx", "w4.onnx"]

    (bundle / "artifacts" / "w4.onnx").write_bytes((bundle / "artifacts" / "w8.onnx").read_bytes())
    with pytest.raises(HeroError, match="w4.onnx .*sha256"):
        PrecisionSwitcher(bundle, runtime="tensorrt", engine_dir=tmp_path / "engines")


def test_on_tensorrt_11_3_every_variant_gets_its_own_engine(tiny, tmp_path, monkeypatch):
    fake = _FakeTensorRT()
    fake.available = lambda: (True, "11.3.0.1")
    monkeypatch.setitem(sys.modules, "exporters.device.tensorrt", fake)
    monkeypatch.setattr(exporters.device, "tensorrt", fake, raising=False)
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"][2]["refit_group"] = manifest["variants"][1]["refit_group"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt")
    assert [refit for _, _, refit in fake.builds] == [False, False, False]
    switcher.set_precision(4)
    assert fake.refits == []  # selected, not refit
