"""exporters/forced_codes.py: with every quantization point fed the emulation's own codes, an A8
export reproduces the emulation's codes at every point (both layouts, each attention pattern) and
its logits to float tolerance; a graph that computes something else (a weight mis-scaled or left
float, an activation dequantized with the wrong scale) moves the codes past the bound; an artifact
of another model is refused, not paired wrongly."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exporters.calibrate import calibrate_activations
from exporters.device.errors import HeroError
from exporters.forced_codes import FORCED_FLIP_RATE, forced_comparison
from exporters.onnx import export_onnx
from exporters.quantize import QuantSpec, quantize_model
from tests import agreement
from tests.attention_models import SwinLike, TinyViT, ViTLike

LAYOUTS = ("onnxruntime", "tensorrt")


def _artifact(cls, layout, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    x = torch.randn(8, 3, 8, 8)
    spec = QuantSpec(bits=8, act_bits=8, act_layout=layout)
    calibration = calibrate_activations(model, [x], spec)
    path = export_onnx(model, tmp_path / f"{cls.__name__}_{layout}.onnx", spec, calibration=calibration,
                       input_shape=(3, 8, 8))
    return path, quantize_model(model, spec, calibration), x.numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls", [TinyViT, ViTLike, SwinLike])
def test_forced_export_reproduces_every_point_and_the_logits(cls, layout, tmp_path):
    path, emulation, x = _artifact(cls, layout, tmp_path)
    result = forced_comparison(path, emulation, x)
    assert result.agrees and len(result.points) >= 5
    assert all(p.max_step <= 1 and p.differing <= FORCED_FLIP_RATE * p.elements for p in result.points)
    assert result.logits_max_diff <= agreement.float_tolerance(emulation(torch.from_numpy(x)).detach())


def _rewrite(path, out, edit):
    proto = onnx.load(str(path))
    edit(proto.graph)
    onnx.save(proto, str(out))
    return out


def _weight_dequantizers(graph):
    stored = {init.name: init for init in graph.initializer}
    return [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in stored
            and len(stored[n.input[0]].dims) >= 2]


def _scale_initializer(graph, node, factor):
    for init in graph.initializer:
        if init.name == node.input[1]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
            return
    raise AssertionError(f"no initializer {node.input[1]}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_mis_scaled_weight_moves_the_codes_past_the_bound(layout, tmp_path):
    path, emulation, x = _artifact(ViTLike, layout, tmp_path)
    broken = _rewrite(path, tmp_path / "broken.onnx",
                      lambda g: _scale_initializer(g, _weight_dequantizers(g)[1], 1.05))
    result = forced_comparison(broken, emulation, x)
    assert not result.agrees and result.worst.rate > FORCED_FLIP_RATE


def test_a_weight_left_float_moves_the_codes_past_the_bound(tmp_path):
    path, emulation, x = _artifact(TinyViT, "onnxruntime", tmp_path)

    def float_weight(graph):
        node = _weight_dequantizers(graph)[1]
        codes = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        scale = codes[node.input[1]].reshape(-1, *([1] * (codes[node.input[0]].ndim - 1)))
        # what the float model holds: the dequantized weight plus a sub-step error (< half a step)
        rng = np.random.default_rng(0)
        weight = (codes[node.input[0]].astype(np.float32) + rng.uniform(-0.45, 0.45, codes[node.input[0]].shape)) * scale
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), "float_weight"))
        consumers = [n for n in graph.node if node.output[0] in n.input]
        for consumer in consumers:
            consumer.input[list(consumer.input).index(node.output[0])] = "float_weight"

    broken = _rewrite(path, tmp_path / "float.onnx", float_weight)
    assert not forced_comparison(broken, emulation, x).agrees


def test_an_activation_dequantized_with_another_scale_moves_the_codes(tmp_path):
    path, emulation, x = _artifact(SwinLike, "onnxruntime", tmp_path)

    def wrong_dq(graph):
        q = [n for n in graph.node if n.op_type == "QuantizeLinear"][3]
        dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and q.output[0] in n.input)
        scale = next(i for i in graph.initializer if i.name == dq.input[1]) if any(
            i.name == dq.input[1] for i in graph.initializer) else None
        value = numpy_helper.to_array(scale) if scale is not None else None
        graph.initializer.append(numpy_helper.from_array(
            np.asarray(value * 1.5 if value is not None else _constant(graph, dq.input[1]) * 1.5, np.float32),
            "wrong_scale"))
        dq.input[1] = "wrong_scale"

    broken = _rewrite(path, tmp_path / "dq.onnx", wrong_dq)
    assert not forced_comparison(broken, emulation, x).agrees


def _constant(graph, name):
    node = next(n for n in graph.node if n.op_type == "Constant" and name in n.output)
    return numpy_helper.to_array(node.attribute[0].t)


def test_an_artifact_of_another_model_is_refused(tmp_path):
    path, _, x = _artifact(TinyViT, "onnxruntime", tmp_path)
    _, other, _ = _artifact(SwinLike, "onnxruntime", tmp_path)
    with pytest.raises(HeroError, match="cannot pair them"):
        forced_comparison(path, other, x)


def test_a_weight_only_model_has_no_points_to_force(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    path = export_onnx(model, tmp_path / "w8.onnx", QuantSpec(bits=8), input_shape=(3, 2, 2))
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    result = forced_comparison(path, quantize_model(model, QuantSpec(bits=8)), x)
    assert result.points == [] and result.agrees
    assert result.logits_max_diff <= agreement.float_tolerance(quantize_model(model, QuantSpec(bits=8))(torch.from_numpy(x)).detach())
