"""The exported ONNX graph computes what quantize_model computes, stores real integers, and
carries its metadata."""

import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

import exporters.onnx
from exporters.device.errors import HeroError
from exporters.onnx import export_onnx, weight_initializers
from exporters.quantize import QuantSpec, calibrate_activations, fold_bn, qrange, quantize_model
from exporters.device.runtime import OnnxRuntimeRunner

INPUT_SHAPE = (2, 8, 8)


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, average pool, Linear with out_features != in_features."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SequenceNet(nn.Module):
    """Linear layers on a (batch, time, features) tensor export as MatMul with an (in, out) weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 5, 3)
        self.proj = nn.Linear(5, 7, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.proj(torch.relu(self.conv(x)).transpose(1, 2))).mean(1)


@pytest.fixture(scope="module", autouse=True)
def reuse_float_graphs():
    """Memoize the torch export (about a second each) by weights and opset: the tests export the
    same float model at many bit widths, and only the quantization after it differs."""
    real_export, graphs = exporters.onnx.export_float_graph, {}

    def export_float_graph(model, input_shape, opset):
        weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
        key = (type(model).__name__, weights, tuple(input_shape), opset)
        if key not in graphs:
            graphs[key] = real_export(model, input_shape, opset)
        graph = onnx.ModelProto()
        graph.CopyFrom(graphs[key])
        return graph

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporters.onnx, "export_float_graph", export_float_graph)
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyNet()
    for bn in (net.bn1, net.bn2):  # non-trivial statistics so folding changes the weights
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


def _assert_runtime_matches(path, reference: torch.Tensor, images: torch.Tensor) -> None:
    """Both ORT optimization levels reproduce the reference logits at batch 5 and batch 1."""
    expected = reference.detach().numpy()
    tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
    for optimization in ("default", "disabled"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        logits = runner.predict(images.numpy())
        np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance)
        np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
        np.testing.assert_allclose(runner.predict(images[:1].numpy()), expected[:1], rtol=0, atol=tolerance)


@pytest.mark.parametrize("bits", [None, 8, 6, 4, 3, 2, 16])
def test_symmetric_per_channel_export_matches_quantize_model(model, images, tmp_path, bits):
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, bits=bits)
    _assert_runtime_matches(path, quantize_model(model, bits)(images), images)
    weights = weight_initializers(path)
    if bits is None:
        assert weights == {}
        return
    assert set(weights) == {"conv1.weight", "conv2.weight", "fc.weight"}
    qmin, qmax = qrange(bits, symmetric=True)
    for q, scale, zero_point, axis in weights.values():
        assert q.dtype == (np.int16 if bits == 16 else np.int8)
        assert qmin <= q.min() and q.max() <= qmax
        assert (np.abs(q.reshape(len(q), -1)).max(1) == qmax).all()  # each channel's max |w| maps to qmax
        assert axis == 0 and scale.shape == (q.shape[0],) and not zero_point.any()
    floats = [t.name for t in onnx.load(path).graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1]
    assert floats == []


@pytest.mark.parametrize("options", [dict(symmetric=False), dict(per_channel=False),
                                     dict(symmetric=False, per_channel=False)], ids=["asym", "per_tensor", "both"])
def test_asymmetric_and_per_tensor_4_bit_exports_match_quantize_model(model, images, tmp_path, options):
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, bits=4, **options)
    _assert_runtime_matches(path, quantize_model(model, 4, **options)(images), images)
    symmetric = options.get("symmetric", True)
    qmin, qmax = qrange(4, symmetric)
    for q, scale, zero_point, axis in weight_initializers(path).values():
        assert q.dtype == (np.int8 if symmetric else np.uint8) and zero_point.dtype == q.dtype
        assert qmin <= q.min() and q.max() <= qmax
        if not symmetric:
            assert zero_point.min() > qmin  # weights of both signs: zero sits inside the grid
        assert (axis, scale.ndim) == ((0, 1) if options.get("per_channel", True) else (None, 0))


def test_activation_qdq_matches_quantize_model_beyond_calibrated_range(model, images, tmp_path):
    scales = calibrate_activations(fold_bn(model), [images])
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, spec=QuantSpec(bits=8, act_bits=8),
                       act_scales=scales)
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("Clip") == 3
    # 3x the calibrated range saturates the first layer's input, where int8 QuantizeLinear alone
    # would reach -128 but quantize_model stops at -127
    wide = images * 3
    _assert_runtime_matches(path, quantize_model(model, 8, act_scales=scales)(wide), wide)


def test_unfolded_export_keeps_batchnorm_and_matches_quantize_model(model, images, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, bits=4, fold_bn=False)
    assert [n.op_type for n in onnx.load(path).graph.node].count("BatchNormalization") == 2
    _assert_runtime_matches(path, quantize_model(model, 4, fold_bn=False)(images), images)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_storage_is_smaller_and_computes_the_same(model, images, tmp_path, symmetric):
    int8_path = export_onnx(model, tmp_path / "int8.onnx", input_shape=INPUT_SHAPE, bits=4, symmetric=symmetric)
    int4_path = export_onnx(model, tmp_path / "int4.onnx", input_shape=INPUT_SHAPE, bits=4, symmetric=symmetric,
                            int4_storage=True)
    assert int4_path.stat().st_size < int8_path.stat().st_size
    stored = {t.data_type for t in onnx.load(int4_path).graph.initializer if t.name.endswith("_quantized")}
    assert stored == {TensorProto.INT4 if symmetric else TensorProto.UINT4}
    int8_weights = weight_initializers(int8_path)
    for name, weight in weight_initializers(int4_path).items():
        for got, want in zip(weight, int8_weights[name]):
            np.testing.assert_array_equal(got, want)
    runner4, runner8 = (OnnxRuntimeRunner(p, ["CPUExecutionProvider"]) for p in (int4_path, int8_path))
    np.testing.assert_array_equal(runner4.predict(images.numpy()), runner8.predict(images.numpy()))
    _assert_runtime_matches(int4_path, quantize_model(model, 4, symmetric=symmetric)(images), images)


def test_matmul_weight_stored_in_out_is_quantized_per_output_channel(tmp_path):
    torch.manual_seed(2)
    net, x = SequenceNet().eval(), torch.randn(4, 2, 9)
    path = export_onnx(net, tmp_path / "m.onnx", input_shape=(2, 9), bits=3)
    weights = weight_initializers(path)
    proj = next(w for name, w in weights.items() if name.startswith("proj."))
    assert proj.q.shape == (5, 7) and proj.axis == 1 and proj.scale.shape == (7,)
    _assert_runtime_matches(path, quantize_model(net, 3)(x), x)


def test_metadata_records_the_quantization_and_caller_entries(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, bits=4, symmetric=False,
                       metadata={"hero.source_sha256": "ab" * 32})
    metadata = OnnxRuntimeRunner(path, ["CPUExecutionProvider"]).metadata
    assert metadata["hero.bits"] == "4"
    assert metadata["hero.scheme"] == "asymmetric,per_channel"
    assert metadata["hero.act_bits"] == "none" and metadata["hero.fold_bn"] == "true"
    assert metadata["hero.weight_storage"] == "uint8" and metadata["hero.tool_version"]
    assert metadata["hero.source_sha256"] == "ab" * 32


def test_export_has_dynamic_batch_named_input_output_and_passes_checker(model, tmp_path):
    path = export_onnx(model, tmp_path / "sub" / "m.onnx", input_shape=INPUT_SHAPE, bits=8)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_fp16_export_runs_in_half_precision_with_float32_io(model, images, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, fp16=True)
    proto = onnx.load(path)
    assert {t.data_type for t in proto.graph.initializer if len(t.dims) > 1} == {TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    logits = OnnxRuntimeRunner(path, ["CPUExecutionProvider"]).predict(images.numpy())
    expected = quantize_model(model, None)(images).detach().numpy()
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


def test_spec_and_loose_flags_give_the_same_graph(model, tmp_path):
    by_spec = export_onnx(model, tmp_path / "a.onnx", input_shape=INPUT_SHAPE, spec=QuantSpec(bits=3, symmetric=False))
    by_flags = export_onnx(model, tmp_path / "b.onnx", input_shape=INPUT_SHAPE, bits=3, symmetric=False)
    assert onnx.load(by_spec) == onnx.load(by_flags)


@pytest.mark.parametrize("options, message", [
    (dict(bits=8, int4_storage=True), "int4_storage"),
    (dict(bits=4, fp16=True), "fp16"),
    (dict(bits=8, act_bits=8), "act_scales"),
    (dict(bits=4, int4_storage=True, opset=18), "opset"),
    (dict(spec=QuantSpec(bits=4), bits=4), "not both"),
    (dict(bits=4, input_shape=(2, 0, 8)), "input_shape"),
])
def test_inconsistent_options_raise_hero_error(model, tmp_path, options, message):
    with pytest.raises(HeroError, match=message):
        export_onnx(model, tmp_path / "m.onnx", **{"input_shape": INPUT_SHAPE, **options})
    assert not (tmp_path / "m.onnx").exists()
