"""Engine tests on an NVIDIA GPU with TensorRT; skipped elsewhere (see test_trt_contract.py for the rest)."""

import json

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine (NVIDIA-only extra)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed as the reference runtime")

from onnx import TensorProto, helper, numpy_helper, save  # noqa: E402

from exporters.device.errors import HeroError  # noqa: E402
from exporters.device.trt_contract import REBUILD_HINT, tensorrt_major  # noqa: E402
from exporters.device.nested_grid import nested_grid_codes  # noqa: E402
from exporters.device.tensorrt import (  # noqa: E402
    EngineConfig,
    TensorRTRunner,
    available,
    build_engine,
    load_engine,
    onnx_initializers,
)

OK, WHY_NOT = available()
if not OK:
    pytest.skip(WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.tensorrt

CLASSES, CHANNELS, SIZE = 10, 8, 8
RNG = np.random.default_rng(0)
CONV_W = RNG.normal(scale=0.3, size=(CHANNELS, 3, 3, 3)).astype(np.float32)
CONV_B = RNG.normal(scale=0.1, size=CHANNELS).astype(np.float32)
FC_W = RNG.normal(scale=0.3, size=(CLASSES, CHANNELS)).astype(np.float32)
FC_B = RNG.normal(scale=0.1, size=CLASSES).astype(np.float32)
ACT_SCALE = np.float32(4.0 / 127)
# Q/DQ conv with a float output computes the same int products in both runtimes; the
# variants below differ by 0.15 (2 bits) at most, far above this.
INT8_ATOL = 5e-3


def classifier(path, *, bits=None, scale=None, codes=None, half=False):
    """x (N,3,8,8) -> [Q/DQ] -> Conv -> Relu -> GAP -> Flatten -> Gemm -> logits; float when bits is None.

    Quantized variants store INT8 codes (nested grid by default) behind a per-channel DQ. half=True
    (float only) computes in float16 between Casts, as ExportOptions(fp16=True) writes it.
    """
    inits = [numpy_helper.from_array(a, n) for a, n in ((CONV_B, "conv.bias"), (FC_W, "fc.weight"), (FC_B, "fc.bias"))]
    nodes, conv_in = [], "x"
    if bits is None:
        inits.append(numpy_helper.from_array(CONV_W, "conv.weight"))
    else:
        if codes is None:
            codes, scale = nested_grid_codes(CONV_W, bits, axis=0)
        inits += [numpy_helper.from_array(codes, "conv.weight_q"), numpy_helper.from_array(scale, "conv.weight_scale"),
                  numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "conv.weight_zp"),
                  numpy_helper.from_array(np.array(ACT_SCALE), "x.scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "x.zp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zp"], ["x.q"]),
                  helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zp"], ["x.dq"]),
                  helper.make_node("DequantizeLinear", ["conv.weight_q", "conv.weight_scale", "conv.weight_zp"],
                                   ["conv.weight"], axis=0)]
        conv_in = "x.dq"
    nodes += [helper.make_node("Conv", [conv_in, "conv.weight", "conv.bias"], ["h"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    if half:
        for i, tensor in enumerate(inits):
            inits[i] = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)
        nodes[0].input[0], nodes[-1].output[0] = "x16", "logits16"
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16), *nodes,
                 helper.make_node("Cast", ["logits16"], ["logits"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def reference(onnx_path, x):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, size=(10, 3, SIZE, SIZE)).astype(np.float32)


def test_fp32_engine_matches_onnxruntime_on_chunked_batches(tmp_path, images):
    onnx_path = classifier(tmp_path / "fp32.onnx")
    sidecar = build_engine(onnx_path, tmp_path / "fp32.engine", EngineConfig("fp32", opt_batch=2, max_batch=4))
    assert sidecar["tensorrt_version"] == trt.__version__ and sidecar["profile"]["max"][0] == 4
    runner = TensorRTRunner(tmp_path / "fp32.engine")
    logits = runner.predict(images)  # 10 rows through a max-batch-4 profile
    assert logits.dtype == np.float32 and logits.shape == (10, CLASSES)
    np.testing.assert_allclose(logits, reference(onnx_path, images), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runner.predict(images, batch_size=3), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(HeroError, match="does not fit"):
        runner.predict(images[:, :2])


def test_int8_qdq_engine_matches_onnxruntime(tmp_path, images):
    onnx_path = classifier(tmp_path / "int8.onnx", bits=8)
    build_engine(onnx_path, tmp_path / "int8.engine", EngineConfig("int8", opt_batch=4, max_batch=16))
    logits = TensorRTRunner(tmp_path / "int8.engine").predict(images)
    np.testing.assert_allclose(logits, reference(onnx_path, images), atol=INT8_ATOL)


def test_refit_switches_between_nested_grid_variants(tmp_path, images):
    eight, two = classifier(tmp_path / "w8.onnx", bits=8), classifier(tmp_path / "w2.onnx", bits=2)
    build_engine(eight, tmp_path / "w8.engine", EngineConfig("int8", max_batch=16, refit=True))
    runner = TensorRTRunner(tmp_path / "w8.engine")
    before = runner.predict(images)
    runner.refit_from_onnx(two)
    after = runner.predict(images)
    assert np.abs(before - after).max() > 10 * INT8_ATOL
    np.testing.assert_allclose(after, reference(two, images), atol=INT8_ATOL)
    runner.refit_from_onnx(eight)
    np.testing.assert_allclose(runner.predict(images), before, atol=1e-5)


def test_refit_to_canonical_grid_with_other_scales_is_refused_and_keeps_the_engine(tmp_path, images):
    """Q/DQ scales are not documented as refittable, so a variant with its own scales is refused
    (README: refit may only change weight values) and the engine keeps running its own weights."""
    eight = classifier(tmp_path / "w8.onnx", bits=8)
    amax = np.abs(CONV_W).reshape(CHANNELS, -1).max(axis=1)
    scale = (amax / 7).astype(np.float32)
    codes = np.clip(np.rint(CONV_W / scale[:, None, None, None]), -7, 7).astype(np.int8)
    canonical = classifier(tmp_path / "c4.onnx", bits=4, scale=scale, codes=codes)
    build_engine(eight, tmp_path / "w8.engine", EngineConfig("int8", max_batch=16, refit=True))
    runner = TensorRTRunner(tmp_path / "w8.engine")
    with pytest.raises(HeroError, match=r"c4\.onnx changes or lacks \['conv\.weight_scale'\], which this engine "
                                        "cannot refit"):
        runner.refit_from_onnx(canonical)
    np.testing.assert_allclose(runner.predict(images), reference(eight, images), atol=INT8_ATOL)


def test_refit_rejects_wrong_element_count(tmp_path):
    build_engine(classifier(tmp_path / "w8.onnx", bits=8), tmp_path / "w8.engine",
                 EngineConfig("int8", max_batch=16, refit=True))
    runner = TensorRTRunner(tmp_path / "w8.engine")
    with pytest.raises(HeroError, match="elements"):
        runner.refit({"conv.weight_q": np.zeros(5, np.int8)})


def test_weight_stripped_engine_runs_after_refit_with_its_own_weights_only(tmp_path, images):
    eight, four = classifier(tmp_path / "w8.onnx", bits=8), classifier(tmp_path / "w4.onnx", bits=4)
    build_engine(eight, tmp_path / "s.engine", EngineConfig("int8", max_batch=16, strip_weights=True))
    runner = TensorRTRunner(tmp_path / "s.engine")
    with pytest.raises(HeroError, match="weight-stripped"):
        runner.predict(images)
    with pytest.raises(HeroError, match="REFIT_IDENTICAL"):
        runner.refit_from_onnx(four)
    runner.refit_from_onnx(eight)
    np.testing.assert_allclose(runner.predict(images), reference(eight, images), atol=INT8_ATOL)


def test_sidecar_mismatch_or_absence_refuses_to_load(tmp_path):
    engine = tmp_path / "fp32.engine"
    build_engine(classifier(tmp_path / "fp32.onnx"), engine, EngineConfig("fp32", max_batch=4))
    sidecar_file = tmp_path / "fp32.engine.json"
    sidecar = json.loads(sidecar_file.read_text())
    sidecar_file.write_text(json.dumps({**sidecar, "tensorrt_version": "0.0.0"}))
    with pytest.raises(HeroError) as info:
        load_engine(engine)
    assert "0.0.0" in str(info.value) and trt.__version__ in str(info.value)
    assert REBUILD_HINT in str(info.value)
    sidecar_file.unlink()
    with pytest.raises(HeroError, match="no sidecar"):
        TensorRTRunner(engine)


def test_fp16_engine_takes_its_precision_from_the_flag_on_10_and_the_onnx_types_on_11(tmp_path, images):
    onnx_path = classifier(tmp_path / "fp16.onnx", half=True)
    sidecar = build_engine(onnx_path, tmp_path / "fp16.engine", EngineConfig("fp16", max_batch=16))
    strongly_typed = tensorrt_major(trt.__version__) >= 11
    assert sidecar["flags"]["precision_from"] == ("onnx types" if strongly_typed else "builder flags")
    assert ("FP16" in sidecar["flags"]["set"]) is not strongly_typed
    if strongly_typed:
        assert "HALF" in sidecar["network_types"]
    logits = TensorRTRunner(tmp_path / "fp16.engine").predict(images)
    np.testing.assert_allclose(logits, reference(onnx_path, images), atol=2e-2)


@pytest.mark.skipif(tensorrt_major(trt.__version__) < 11, reason="TensorRT 10 builds fp16 from BuilderFlag.FP16")
def test_fp16_engine_from_a_float32_onnx_is_refused_on_strongly_typed_tensorrt(tmp_path):
    with pytest.raises(HeroError, match=r"ExportOptions\(fp16=True\)"):
        build_engine(classifier(tmp_path / "fp32.onnx"), tmp_path / "x.engine", EngineConfig("fp16", max_batch=4))


def test_refit_from_npz_sets_another_variants_weights_by_name(tmp_path, images):
    eight, two = classifier(tmp_path / "w8.onnx", bits=8), classifier(tmp_path / "w2.onnx", bits=2)
    build_engine(eight, tmp_path / "w8.engine", EngineConfig("int8", max_batch=16, refit=True))
    runner = TensorRTRunner(tmp_path / "w8.engine")
    np.savez(tmp_path / "w2.npz", **onnx_initializers(two))
    runner.refit_from_npz(tmp_path / "w2.npz")
    np.testing.assert_allclose(runner.predict(images), reference(two, images), atol=INT8_ATOL)
    codes = onnx_initializers(eight)["conv.weight_q"]
    with pytest.raises(HeroError, match="weight 'conv.weight_q' is float64 but the engine expects int8"):
        runner.refit({"conv.weight_q": codes.astype(np.float64)})


def test_timing_cache_is_saved_and_reused(tmp_path):
    onnx_path, cache = classifier(tmp_path / "fp32.onnx"), tmp_path / "timing.cache"
    config = EngineConfig("fp32", max_batch=4, timing_cache=str(cache))
    assert build_engine(onnx_path, tmp_path / "a.engine", config)["timing_cache_reused"] is False
    assert cache.stat().st_size > 0
    assert build_engine(onnx_path, tmp_path / "b.engine", config)["timing_cache_reused"] is True
