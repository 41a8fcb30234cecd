"""Proposed additions to tests/test_runtime.py (owned by the lead): the weight_dequant modes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner

CPU = ["CPUExecutionProvider"]


def _weight_only_model(path, q: np.ndarray, scale: np.ndarray, hero_bits: str | None = "8"):
    """logits = input @ DequantizeLinear(q, scale, axis=0).T, tagged like a hero export."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
         helper.make_node("Gemm", ["input", "w"], ["logits"], transB=1)], "weight_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", q.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", q.shape[0]])],
        [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if hero_bits is not None:
        model.metadata_props.add(key="hero.bits", value=hero_bits)
        model.metadata_props.add(key="hero.act_bits", value="none")
    onnx.save(model, path)
    return path


@pytest.fixture
def quantized():
    rng = np.random.default_rng(3)
    return rng.integers(-127, 128, (3, 4)).astype(np.int8), rng.uniform(0.01, 0.1, 3).astype(np.float32)


@pytest.mark.parametrize("hero_bits, mode, expected", [
    ("8", "auto", "folded"), (None, "auto", "runtime"), ("none", "auto", "runtime"),
    (None, "folded", "folded"), ("8", "runtime", "runtime"),
])
def test_auto_folds_weight_dequantization_only_for_hero_quantized_weights(tmp_path, quantized, hero_bits, mode,
                                                                          expected):
    path = _weight_only_model(tmp_path / "m.onnx", *quantized, hero_bits=hero_bits)
    assert OnnxRuntimeRunner(path, CPU, weight_dequant=mode).weight_dequant == expected


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
    (dict(weight_dequant="eager"), "unknown weight_dequant"),
    (dict(weight_dequant="folded", optimization="disabled"), "needs optimization='default'"),
])
def test_bad_weight_dequant_raises_hero_error(tmp_path, quantized, kwargs, message):
    path = _weight_only_model(tmp_path / "m.onnx", *quantized)
    with pytest.raises(HeroError, match=message):
        OnnxRuntimeRunner(path, CPU, **kwargs)
