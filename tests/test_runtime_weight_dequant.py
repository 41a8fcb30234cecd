"""OnnxRuntimeRunner's weight_dequant modes, pinned on the graph ONNX Runtime really runs: folded
sessions hold the dequantized weights as float initializers, runtime ones keep DequantizeLinear."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner

CPU = ["CPUExecutionProvider"]


def _quantization(bits) -> str:
    """A hero.quantization metadata value, as exporters.onnx writes it."""
    return json.dumps({"spec": {"bits": bits, "symmetric": True, "per_channel": True, "bn": "fold-first",
                                "grid": "canonical", "layer_bits": None, "act_bits": None, "act_method": "max",
                                "act_percentile": 99.99, "act_layout": "onnxruntime", "block_size": None},
                       "act_scales": None, "act_zero_points": None,
                       "weight_storage": "float32" if bits is None else "int8", "matmul_nbits": False,
                       "tool_version": "test"})


QUANTIZED, FLOAT = _quantization(8), _quantization(None)


@pytest.mark.parametrize("bits", [8, None])
def test_the_metadata_here_is_what_the_exporter_writes(bits):
    from exporters.onnx import ExportOptions, _quantization_entry
    from exporters.quantize import QuantSpec

    written = _quantization_entry(QuantSpec(bits=bits), None, ExportOptions())
    assert json.loads(_quantization(bits)) == {**written, "tool_version": "test"}


def _weight_only_model(path, q: np.ndarray, scale: np.ndarray, quantization: str | None = QUANTIZED):
    """logits = input @ DequantizeLinear(q, scale, axis=0).T, with `quantization` as its
    hero.quantization metadata (None: no entry, as a foreign model)."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
         helper.make_node("Gemm", ["input", "w"], ["logits"], transB=1)], "weight_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", q.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", q.shape[0]])],
        [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if quantization is not None:
        model.metadata_props.add(key="hero.quantization", value=quantization)
    onnx.save(model, path)
    return path


@pytest.fixture
def quantized():
    rng = np.random.default_rng(3)
    return rng.integers(-127, 128, (3, 4)).astype(np.int8), rng.uniform(0.01, 0.1, 3).astype(np.float32)


@pytest.fixture
def session_graph(monkeypatch, tmp_path):
    """runner -> the optimized graph its session runs, as ONNX Runtime itself serializes it
    (SessionOptions.optimized_model_filepath) when the runner creates the session."""
    original, written = onnxruntime.InferenceSession, []

    def writing(path, sess_options, **kwargs):
        sess_options.optimized_model_filepath = str(tmp_path / f"optimized{len(written)}.onnx")
        sess_options.log_severity_level = 3  # ORT warns that a fully optimized graph is machine-specific
        session = original(path, sess_options, **kwargs)
        written.append((session, sess_options.optimized_model_filepath))
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", writing)
    return lambda runner: onnx.load(next(p for s, p in written if s is runner.session)).graph


@pytest.mark.parametrize("quantization, mode, folded", [
    pytest.param(QUANTIZED, "auto", True, id="w8-auto"),
    pytest.param(None, "auto", False, id="foreign-auto"),
    pytest.param(FLOAT, "auto", False, id="float-auto"),
    pytest.param("{not json", "auto", False, id="malformed-json-auto"),
    pytest.param(json.dumps({"bits": 8}), "auto", False, id="no-spec-auto"),
    pytest.param(None, "folded", True, id="foreign-folded"),
    pytest.param(QUANTIZED, "runtime", False, id="w8-runtime"),
])
def test_folding_replaces_weight_dequantize_linear_by_the_dequantized_float_weight(
        tmp_path, quantized, session_graph, quantization, mode, folded):
    q, scale = quantized
    runner = OnnxRuntimeRunner(_weight_only_model(tmp_path / "m.onnx", q, scale, quantization), CPU,
                               weight_dequant=mode)
    graph = session_graph(runner)
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert runner.weight_dequant == ("folded" if folded else "runtime")
    # Which ops ORT runs after optimisation (Gemm, FusedGemm, MatMul + Add...) changes between ORT
    # versions; what each mode means does not: folded sessions hold the dequantized weight as a
    # float initializer and no DequantizeLinear, runtime ones still read the integer initializer.
    ops = [n.op_type for n in graph.node]
    if folded:
        assert "DequantizeLinear" not in ops and "w_q" not in initializers
        (weight,) = [w for w in initializers.values() if w.dtype == np.float32 and w.size == q.size]
        # computed once by the DequantizeLinear kernel: q * scale rounded to float32, as numpy does
        dequantized = q.astype(np.float32) * scale[:, None]
        assert np.array_equal(weight, dequantized) or np.array_equal(weight, dequantized.T)
    else:
        assert initializers["w_q"].dtype == np.int8 and np.array_equal(initializers["w_q"], q)
        assert any("w_q" in n.input for n in graph.node)


def test_folded_and_runtime_dequantization_match_the_literal_graph_and_hand_math(tmp_path, quantized):
    q, scale = quantized
    path = _weight_only_model(tmp_path / "m.onnx", q, scale)
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    expected = x.astype(np.float64) @ (q.astype(np.float64) * scale[:, None].astype(np.float64)).T
    literal = OnnxRuntimeRunner(path, CPU, optimization="disabled")
    assert literal.weight_dequant == "runtime"
    for mode in ("folded", "runtime"):
        logits = OnnxRuntimeRunner(path, CPU, weight_dequant=mode).predict(x)
        np.testing.assert_allclose(logits, literal.predict(x), rtol=0, atol=1e-5)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_dequant="eager"), "unknown weight_dequant 'eager': choose one of auto, folded, runtime"),
    (dict(weight_dequant="folded", optimization="disabled"), "needs optimization='default'"),
])
def test_bad_weight_dequant_raises_hero_error(tmp_path, quantized, kwargs, message):
    path = _weight_only_model(tmp_path / "m.onnx", *quantized)
    with pytest.raises(HeroError, match=message):
        OnnxRuntimeRunner(path, CPU, **kwargs)
