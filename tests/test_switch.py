"""PrecisionSwitcher: checks the bundle, switches between prepared sessions or refits, measures the switch."""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from bundle_helpers import CPU, FakeTensorRT, built_bundle, copy_bundle, use_fake_tensorrt

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.switch import PrecisionSwitcher, measure_switch_latency


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


def test_resident_keeps_the_most_recently_used_sessions_and_prepares_the_others_on_a_switch(tiny, images,
                                                                                               monkeypatch):
    created = []
    original = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *args, **kwargs: (created.append(Path(args[0]).name), original(*args, **kwargs))[1])
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU, resident=2)
    assert switcher.loaded == [8, None] and switcher.precision is None  # the first two prepared, float active
    # (switch to, loaded after it, least recently used first; whether it built a session)
    steps = [(4, [None, 4], True), (None, [4, None], False), (None, [4, None], False), (8, [None, 8], True),
             (4, [8, 4], True)]
    for bits, loaded, cold in steps:
        before = len(created)
        switcher.set_precision(bits)
        assert switcher.loaded == loaded and (len(created) > before) == cold, (bits, created[before:])
        fresh = OnnxRuntimeRunner(tiny["bundle"] / switcher.variant(bits)["artifact"], CPU)
        np.testing.assert_allclose(switcher.predict(images), fresh.predict(images), rtol=0, atol=1e-6)


def test_every_prepared_session_records_what_it_cost(tiny):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU, resident=1)
    assert set(switcher.costs) == {None}
    switcher.set_precision(4)
    assert switcher.loaded == [4] and set(switcher.costs) == {None, 4}
    for cost in switcher.costs.values():
        assert cost["ready_ms"] >= cost["first_run_ms"] > 0 and cost["ready_by"] == "session"
        assert cost["resident_mib"] is None or isinstance(cost["resident_mib"], float)
        assert cost["resident_built_mib"] is None or isinstance(cost["resident_built_mib"], float)


@pytest.mark.parametrize("resident", [0, -1, True, 1.5, "2"])
def test_resident_must_be_a_positive_count(tiny, resident):
    with pytest.raises(HeroError, match="resident must be None .* or an integer >= 1"):
        PrecisionSwitcher(tiny["bundle"], providers=CPU, resident=resident)


def test_an_activation_quantized_variant_beside_a_weight_only_one_of_its_bits_is_named(tiny, tmp_path):
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "artifacts" / "w8a8.onnx").write_bytes((bundle / "artifacts" / "w8.onnx").read_bytes())
    manifest["variants"].append(dict(manifest["variants"][1], name="w8a8", act_bits=8, artifact="artifacts/w8a8.onnx"))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    switcher = PrecisionSwitcher(bundle, providers=CPU)
    assert switcher.precisions == [None, 8, 4, "w8a8"]
    switcher.set_precision("w8a8")
    assert switcher.variant("w8a8")["act_bits"] == 8 and switcher.variant(8)["act_bits"] is None

    manifest["variants"][-1]["act_bits"] = None  # two weight-only 8-bit variants: which is 8?
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeroError, match="variants w8 and w8a8 both have bits 8 and act_bits None"):
        PrecisionSwitcher(bundle, providers=CPU)


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
    with pytest.raises(HeroError, match="unknown runtime 'tflite': choose one of onnxruntime, openvino, tensorrt"):
        PrecisionSwitcher(tiny["bundle"], "tflite")


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


def _shared_refit_group(tiny, tmp_path) -> Path:
    """A copy of the tiny bundle whose w4 shares w8's refit group (w4 refits w8's engine)."""
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"][2]["refit_group"] = manifest["variants"][1]["refit_group"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_tensorrt_switch_refits_one_engine_and_proves_each_refit_once(tiny, images, tmp_path, monkeypatch):
    fake = use_fake_tensorrt(monkeypatch, FakeTensorRT())
    bundle = _shared_refit_group(tiny, tmp_path)
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt")
    assert fake.builds == [("fp32.engine", "fp32", False), ("w8.engine", "int8", True)]
    for bits in (4, 8, None, 8, 4):
        switcher.set_precision(bits)
        weights = sha256_file(bundle / switcher.variant(bits)["artifact"])
        np.testing.assert_array_equal(switcher.predict(images), FakeTensorRT.logits(images, weights))
    assert fake.refits == ["w4.onnx", "w8.onnx", "w4.onnx"]  # float has its own engine: no refit
    # The first use of each shared-engine variant built its own engine once, as the proof's reference.
    assert fake.builds[2:] == [("w4.own.engine", "int8", False), ("w8.own.engine", "int8", False)]
    assert {name: r["verdict"] for name, r in switcher.refit_verdicts.items()} == {"w4": "ok", "w8": "ok"}
    stored = json.loads((bundle / "engines" / "refit_verdicts.json").read_text())["verdicts"]
    assert sorted((r["variant"], r["verdict"]) for r in stored) == [("w4", "ok"), ("w8", "ok")]
    assert switcher.costs[4]["ready_by"] == "refit" and switcher.costs[4]["shares_engine_with"] == "w8"
    # w8 was last made ready by a refit too (back from w4); float has its own engine
    assert switcher.costs[8]["ready_by"] == "refit" and switcher.costs[None]["ready_by"] == "engine"

    again = PrecisionSwitcher(bundle, runtime="tensorrt")
    again.set_precision(4)
    assert len(fake.builds) == 4 and fake.refits[-1] == "w4.onnx"  # engines reused, verdicts trusted: no proof
    assert again.refit_verdicts == switcher.refit_verdicts


def test_a_refit_that_fails_its_proof_runs_on_its_own_engine_from_then_on(tiny, images, tmp_path, monkeypatch):
    fake = use_fake_tensorrt(monkeypatch, FakeTensorRT(faulty_refit=True))
    bundle = _shared_refit_group(tiny, tmp_path)
    w4_weights = sha256_file(bundle / "artifacts" / "w4.onnx")
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt")
    switcher.set_precision(4)  # the refit "succeeds" but the engine still computes w8
    assert switcher.refit_verdicts["w4"]["verdict"] == "mismatch" and switcher.refit_verdicts["w4"]["rel_error"] > 0.01
    np.testing.assert_array_equal(switcher.predict(images), FakeTensorRT.logits(images, w4_weights))
    switcher.set_precision(8)
    assert switcher.refit_verdicts["w8"]["verdict"] == "ok"  # refit back to the engine's own weights

    refits, builds = len(fake.refits), len(fake.builds)
    again = PrecisionSwitcher(bundle, runtime="tensorrt")  # reads the verdict: w4's own engine, cached
    assert len(fake.builds) == builds
    for bits in (8, 4, 8, 4):
        again.set_precision(bits)
    np.testing.assert_array_equal(again.predict(images), FakeTensorRT.logits(images, w4_weights))
    assert len(fake.refits) == refits  # w4 is selected, never refit; w8 stays loaded in the shared engine
    stored = json.loads((bundle / "engines" / "refit_verdicts.json").read_text())["verdicts"]
    assert {r["variant"]: r["verdict"] for r in stored} == {"w4": "mismatch", "w8": "ok"}


def test_a_verdict_of_another_tensorrt_version_is_proven_again(tiny, tmp_path, monkeypatch):
    bundle = _shared_refit_group(tiny, tmp_path)
    use_fake_tensorrt(monkeypatch, FakeTensorRT(faulty_refit=True))
    PrecisionSwitcher(bundle, runtime="tensorrt").set_precision(4)  # proven "mismatch" on 10.0-fake
    fake = use_fake_tensorrt(monkeypatch, FakeTensorRT(version="10.1-fake"))
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt")
    switcher.set_precision(4)
    assert switcher.refit_verdicts["w4"]["verdict"] == "ok" and ("w4.own.engine", "int8", False) in fake.builds
    stored = json.loads((bundle / "engines" / "refit_verdicts.json").read_text())["verdicts"]
    assert sorted((r["tensorrt_version"], r["verdict"]) for r in stored if r["variant"] == "w4") == \
           [("10.0-fake", "mismatch"), ("10.1-fake", "ok")]


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

    fake = use_fake_tensorrt(monkeypatch, FakeTensorRT())
    switcher = PrecisionSwitcher(bundle, runtime="tensorrt", engine_dir=tmp_path / "engines")
    assert fake.builds == [("fp32.engine", "fp32", False), ("w8.engine", "int8", True)]  # one integer engine
    for bits in (4, 8, 4):
        switcher.set_precision(bits)
    assert fake.refits == ["w4.onnx", "w8.onnx", "w4.onnx"]
    assert (tmp_path / "engines" / "refit_verdicts.json").is_file()

    (bundle / "artifacts" / "w4.onnx").write_bytes((bundle / "artifacts" / "w8.onnx").read_bytes())
    with pytest.raises(HeroError, match="w4.onnx .*sha256"):
        PrecisionSwitcher(bundle, runtime="tensorrt", engine_dir=tmp_path / "engines")


def test_on_tensorrt_11_3_every_variant_gets_its_own_engine(tiny, tmp_path, monkeypatch):
    fake = use_fake_tensorrt(monkeypatch, FakeTensorRT(version="11.3.0.1"))
    switcher = PrecisionSwitcher(_shared_refit_group(tiny, tmp_path), runtime="tensorrt")
    assert [refit for _, _, refit in fake.builds] == [False, False, False]
    switcher.set_precision(4)
    assert fake.refits == [] and switcher.refit_verdicts == {}  # selected, not refit: nothing to prove


def test_tensorrt_takes_no_resident(tiny):
    with pytest.raises(HeroError, match="TensorRT keeps one engine per refit group"):
        PrecisionSwitcher(tiny["bundle"], "tensorrt", resident=1)
