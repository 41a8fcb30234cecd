"""The exported ONNX graph computes what quantize_model computes, stores real integers, and
carries its metadata."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

import exporters.onnx
from agreement import assert_float_close, assert_matches_act_quantized

from exporters.act_layout import plan_points, trace
from exporters.device.errors import HeroError
from exporters.device import TOOL_VERSION
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.onnx import QUANTIZATION_KEY, ExportOptions, export_onnx, read_quantization, weight_initializers
from exporters.calibrate import calibrate_activations
from exporters.quantize import Calibration, QuantSpec, fold_bn, qrange, quantize_model

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
    """Memoize the torch export (about a second each) by module structure (its repr, and its code
    for a traced module: the activation layouts' QDQ modules hold no tensors), weights and opset:
    the tests export the same float model at many bit widths, and only the quantization after it differs."""
    real_export, graphs = exporters.onnx.export_float_graph, {}

    def export_float_graph(model, input_shape, opset):
        weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
        key = (type(model).__name__, repr(model), getattr(model, "code", None), weights, tuple(input_shape), opset)
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
    """Both ORT optimization levels reproduce the reference logits of a graph without activation
    quantization at batch 5 and batch 1: float summation order is all that differs
    (tests/agreement.py: elementwise at FLOAT_RTOL, argmax wherever decided)."""
    for optimization in ("default", "disabled"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        assert_float_close(runner.predict(images.numpy()), reference)
        assert_float_close(runner.predict(images[:1].numpy()), reference[:1])


def _metadata(path) -> dict[str, str]:
    return OnnxRuntimeRunner(path, ["CPUExecutionProvider"]).metadata


def _weight_storage(path) -> str:
    return json.loads(_metadata(path)[QUANTIZATION_KEY])["weight_storage"]


@pytest.mark.parametrize("bits", [None, 8, 6, 4, 3, 2, 16])
def test_symmetric_per_channel_export_matches_quantize_model(model, images, tmp_path, bits):
    spec = QuantSpec(bits=bits)
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    _assert_runtime_matches(path, quantize_model(model, spec)(images), images)
    assert _weight_storage(path) == {None: "float32", 16: "int16"}.get(bits, "int8")
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


@pytest.mark.parametrize("fields", [dict(symmetric=False), dict(per_channel=False),
                                    dict(symmetric=False, per_channel=False)], ids=["asym", "per_tensor", "both"])
def test_asymmetric_and_per_tensor_4_bit_exports_match_quantize_model(model, images, tmp_path, fields):
    spec = QuantSpec(bits=4, **fields)
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    _assert_runtime_matches(path, quantize_model(model, spec)(images), images)
    qmin, qmax = qrange(4, spec.symmetric)
    assert _weight_storage(path) == ("int8" if spec.symmetric else "uint8")
    for q, scale, zero_point, axis in weight_initializers(path).values():
        assert q.dtype == (np.int8 if spec.symmetric else np.uint8) and zero_point.dtype == q.dtype
        assert qmin <= q.min() and q.max() <= qmax
        if not spec.symmetric:
            assert zero_point.min() > qmin  # weights of both signs: zero sits inside the grid
        assert (axis, scale.ndim) == ((0, 1) if spec.per_channel else (None, 0))


def test_activation_qdq_matches_quantize_model_beyond_calibrated_range(model, images, tmp_path):
    """A8 on a generic model: within tests/agreement.py's share of the activation quantization's own
    effect (a rounding flip may or may not happen on this CPU); exactness is the dyadic tests' job."""
    spec = QuantSpec(bits=8, act_bits=8, act_layout="tensorrt")
    calibration = calibrate_activations(fold_bn(model), [images], spec)
    path = export_onnx(model, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=INPUT_SHAPE)
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("Clip") == 3
    # 3x the calibrated range saturates the first layer's input, where int8 QuantizeLinear alone
    # would reach -128 but quantize_model stops at -127
    wide = images * 3
    emulation = quantize_model(model, spec, calibration)(wide)
    without = quantize_model(model, QuantSpec(bits=8))(wide)
    for optimization in ("default", "disabled"):
        got = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization).predict(wide.numpy())
        assert_matches_act_quantized(got, emulation, without)


class DyadicNet(nn.Module):
    """Conv-ReLU, Conv plus a residual add, ReLU, average pooling over 8x8 and a Linear, built so that
    under `DYADIC_SCALES` every value the W8A8 graph computes is exactly representable in float32:
    each weight channel is integers times 2^-k, one of them 127 and the rest in [-7, 7] (so the
    symmetric 8-bit scale amax / 127 is exactly 2^-k and the codes are those integers), biases are
    integer multiples of input scale x weight scale, activation scales are powers of two, and every
    sum, pooling's included, stays below 2^23 units of its finest step. Any summation order and any
    kernel, fused or not, then gives the same bits: exact equality holds by construction."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, k in (("conv1", 6), ("conv2", 7), ("fc", 5)):
                layer = getattr(self, name)
                codes = torch.randint(-7, 8, layer.weight.shape, generator=generator).float()
                codes.view(len(codes), -1)[:, 0] = 127  # each channel's amax is 127 * 2^-k
                layer.weight.copy_(codes * 2.0**-k)
                bias = torch.randint(-2000, 2000, layer.bias.shape, generator=generator).float()
                layer.bias.copy_(bias * DYADIC_SCALES[name] * 2.0**-k)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


DYADIC_SCALES = {"conv1": 2.0**-4, "conv2": 2.0**-3, "fc": 2.0**-2}


def dyadic_calibration(net, layout: str) -> Calibration:
    """Powers of two for every activation scale. tensorrt: the inputs of conv1, conv2 and fc, and the
    residual input of the Add (conv2's input again, at its scale).
    onnxruntime: every point of the plan; zero point 0 after a ReLU, 128 where values are signed."""
    if layout == "tensorrt":
        return Calibration({**DYADIC_SCALES, "add.residual": DYADIC_SCALES["conv2"]})
    points = plan_points(trace(fold_bn(net))).calibrated
    scales = {name: 2.0 ** -(3 + i % 3) for i, name in enumerate(points)}
    return Calibration(scales, {name: 0 if name.startswith("relu") or "pool" in name else 128 for name in points})


@pytest.mark.parametrize("layout", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("optimization", ["default", "disabled"])
def test_w8a8_graph_computes_the_emulation_exactly_where_every_value_is_representable(tmp_path, optimization, layout):
    """With ORT's optimisations the onnxruntime layout runs as QLinearConv/QLinearAdd/QGemm, which
    requantize int32 accumulators by scale ratios: powers of two here, so exact as well."""
    torch.manual_seed(4)
    net, spec = DyadicNet().eval(), QuantSpec(bits=8, act_bits=8, act_layout=layout)
    x = torch.randn(6, 2, 8, 8) * 4  # beyond the input's clip range too
    calibration = dyadic_calibration(net, layout)
    path = export_onnx(net, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=(2, 8, 8))
    codes = weight_initializers(path)
    for name, k in (("conv1", 6), ("conv2", 7)):  # the construction held: scales are exactly 2^-k
        np.testing.assert_array_equal(codes[f"{name}.weight"].scale, np.float32(2.0**-k))
    expected = quantize_model(net, spec, calibration)(x).detach().numpy()
    assert not np.array_equal(expected, quantize_model(net, QuantSpec(bits=8))(x).detach().numpy())
    runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
    np.testing.assert_array_equal(runner.predict(x.numpy()), expected)
    np.testing.assert_array_equal(runner.predict(x[:1].numpy()), expected[:1])


def test_unfolded_export_keeps_batchnorm_and_matches_quantize_model(model, images, tmp_path):
    spec = QuantSpec(bits=4, bn="keep")
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    assert [n.op_type for n in onnx.load(path).graph.node].count("BatchNormalization") == 2
    _assert_runtime_matches(path, quantize_model(model, spec)(images), images)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_storage_is_smaller_and_computes_the_same(model, images, tmp_path, symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric)
    int8_path = export_onnx(model, tmp_path / "int8.onnx", spec, input_shape=INPUT_SHAPE)
    int4_path = export_onnx(model, tmp_path / "int4.onnx", spec, ExportOptions(int4_storage=True),
                            input_shape=INPUT_SHAPE)
    assert int4_path.stat().st_size < int8_path.stat().st_size
    stored = {t.data_type for t in onnx.load(int4_path).graph.initializer if t.name.endswith("_quantized")}
    assert stored == {TensorProto.INT4 if symmetric else TensorProto.UINT4}
    assert _weight_storage(int4_path) == ("int4" if symmetric else "uint4")
    int8_weights = weight_initializers(int8_path)
    for name, weight in weight_initializers(int4_path).items():
        for got, want in zip(weight, int8_weights[name]):
            np.testing.assert_array_equal(got, want)
    # Same codes, so the same dequantized weights; the sessions may still run different kernels
    # (ORT versions handle INT4 DequantizeLinear their own way): both within float tolerance.
    _assert_runtime_matches(int4_path, quantize_model(model, spec)(images), images)
    _assert_runtime_matches(int8_path, quantize_model(model, spec)(images), images)


def test_matmul_weight_stored_in_out_is_quantized_per_output_channel(tmp_path):
    torch.manual_seed(2)
    net, x = SequenceNet().eval(), torch.randn(4, 2, 9)
    spec = QuantSpec(bits=3)
    path = export_onnx(net, tmp_path / "m.onnx", spec, input_shape=(2, 9))
    weights = weight_initializers(path)
    proj = next(w for name, w in weights.items() if name.startswith("proj."))
    assert proj.q.shape == (5, 7) and proj.axis == 1 and proj.scale.shape == (7,)
    _assert_runtime_matches(path, quantize_model(net, spec)(x), x)


# ---- metadata: one hero.quantization entry -------------------------------------------------

def test_metadata_is_one_quantization_entry_plus_caller_entries(model, tmp_path):
    spec = QuantSpec(bits=4, symmetric=False, bn="keep")
    options = ExportOptions(metadata={"hero.source_sha256": "ab" * 32, "note": 7})
    metadata = _metadata(export_onnx(model, tmp_path / "m.onnx", spec, options, input_shape=INPUT_SHAPE))
    assert set(metadata) == {QUANTIZATION_KEY, "hero.source_sha256", "note"}
    assert metadata["hero.source_sha256"] == "ab" * 32 and metadata["note"] == "7"
    assert json.loads(metadata[QUANTIZATION_KEY]) == {"spec": spec.to_dict(), "act_scales": None,
                                                      "act_zero_points": None, "weight_storage": "uint8",
                                                      "matmul_nbits": False, "tool_version": TOOL_VERSION}
    assert TOOL_VERSION
    assert read_quantization(metadata, "m.onnx") == (spec, None)


@pytest.mark.parametrize("layout", ["tensorrt", "onnxruntime"])
def test_w8a8_metadata_round_trips_the_calibration(model, images, tmp_path, layout):
    spec = QuantSpec(bits=8, act_bits=8, act_method="percentile", act_percentile=99.9, act_layout=layout)
    calibration = calibrate_activations(fold_bn(model), [images], spec)
    path = export_onnx(model, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=INPUT_SHAPE)
    read_spec, read_calibration = read_quantization(_metadata(path), path)
    assert read_spec == spec
    assert read_calibration == calibration  # float scales survive JSON exactly
    if layout == "tensorrt":
        assert set(read_calibration.scales) == {"conv1", "conv2", "fc"} and read_calibration.zero_points is None
    else:  # the input, both ReLU outputs (zero point 0) and the pooled features, each quantized once
        assert set(read_calibration.scales) == set(plan_points(trace(fold_bn(model))).calibrated)
        assert len(read_calibration.scales) == 4 and sorted(read_calibration.zero_points.values())[:3] == [0, 0, 0]
    # the graph's activation QuantizeLinear scales are the recorded ones (a pass-through repeats one)
    graph = onnx.load(path).graph
    initializers = {t.name: t for t in graph.initializer}
    graph_scales = {float(onnx.numpy_helper.to_array(initializers[n.input[1]]))
                    for n in graph.node if n.op_type == "QuantizeLinear"}
    assert graph_scales == {float(np.float32(v)) for v in read_calibration.scales.values()}


def test_read_quantization_refuses_missing_entry():
    with pytest.raises(HeroError, match="foreign.onnx has no hero.quantization"):
        read_quantization({"hero.source_sha256": "ab"}, "foreign.onnx")


def _entry(**changes) -> str:
    entry = {"spec": QuantSpec(bits=4).to_dict(), "act_scales": None, "act_zero_points": None,
             "weight_storage": "int8", "matmul_nbits": False, "tool_version": TOOL_VERSION}
    return json.dumps({**entry, **changes})


@pytest.mark.parametrize("value, message", [
    ("not json", "not readable"),
    ("[1, 2]", "not readable"),
    ('"a string"', "not readable"),
    (json.dumps({"act_scales": None}), "not readable"),
    (json.dumps({"spec": QuantSpec(bits=4).to_dict()}), "not readable"),
    (_entry(spec={**QuantSpec(bits=4).to_dict(), "scheme": "symmetric"}), "fields"),
    (_entry(spec={**QuantSpec(bits=4).to_dict(), "bits": 12}), "bit width"),
    (_entry(spec=QuantSpec(bits=8, act_bits=8).to_dict(), act_scales={"conv1": -0.1}), "positive"),
    (_entry(act_scales=[0.1]), "not readable"),
    (_entry(act_scales={"conv1": 0.1}), "act_bits=8 needs a Calibration"),
], ids=["not-json", "list", "string", "no-spec", "no-act-scales", "unknown-spec-field", "bad-bits", "bad-scale",
        "scales-not-a-mapping", "scales-without-act-bits"])
def test_read_quantization_refuses_malformed_entry(value, message):
    with pytest.raises(HeroError, match=message):
        read_quantization({QUANTIZATION_KEY: value}, "m.onnx")


# ---- the graph itself ----------------------------------------------------------------------

def test_export_has_dynamic_batch_named_input_output_and_passes_checker(model, tmp_path):
    path = export_onnx(model, tmp_path / "sub" / "m.onnx", QuantSpec(bits=8), input_shape=INPUT_SHAPE)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_fp16_export_runs_in_half_precision_with_float32_io(model, images, tmp_path):
    spec = QuantSpec()
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(fp16=True), input_shape=INPUT_SHAPE)
    proto = onnx.load(path)
    assert {t.data_type for t in proto.graph.initializer if len(t.dims) > 1} == {TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert _weight_storage(path) == "float16"
    logits = OnnxRuntimeRunner(path, ["CPUExecutionProvider"]).predict(images.numpy())
    expected = quantize_model(model, spec)(images).detach().numpy()
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


# ---- refused forms and inconsistent options ------------------------------------------------

@pytest.mark.parametrize("spec", [4, None, {"bits": 4}], ids=["int", "none", "dict"])
def test_export_refuses_anything_but_a_quant_spec(model, tmp_path, spec):
    with pytest.raises(HeroError, match="QuantSpec"):
        export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("flags", [dict(bits=4), dict(symmetric=False), dict(act_bits=8), dict(fp16=True),
                                   dict(int4_storage=True), dict(opset=21), dict(metadata={}),
                                   dict(act_scales={"conv1": 0.1})])
def test_export_has_no_loose_flags(model, tmp_path, flags):
    (flag,) = flags
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{flag}'"):
        export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=4), input_shape=INPUT_SHAPE, **flags)
    with pytest.raises(TypeError):
        export_onnx(model, tmp_path / "m.onnx", input_shape=INPUT_SHAPE, **flags)  # the old spec-less call
    assert not (tmp_path / "m.onnx").exists()


_SOME_CALIBRATION = Calibration({"conv1": 0.1, "conv2": 0.1, "fc": 0.1})


@pytest.mark.parametrize("spec, options, calibration, input_shape, message", [
    (QuantSpec(bits=8), ExportOptions(int4_storage=True), None, INPUT_SHAPE, "int4_storage"),
    (QuantSpec(bits=4), ExportOptions(fp16=True), None, INPUT_SHAPE, "fp16"),
    (QuantSpec(bits=8, act_bits=8), ExportOptions(), None, INPUT_SHAPE, "act_bits=8 needs a Calibration"),
    (QuantSpec(bits=8), ExportOptions(), _SOME_CALIBRATION, INPUT_SHAPE, "act_bits=8 needs a Calibration"),
    (QuantSpec(bits=8, act_bits=8), ExportOptions(), {"conv1": 0.1}, INPUT_SHAPE, "must be a Calibration"),
    (QuantSpec(bits=8, act_bits=8, act_layout="tensorrt"), ExportOptions(), Calibration({"conv1": 0.1}), INPUT_SHAPE,
     "missing"),
    (QuantSpec(bits=8, act_bits=8), ExportOptions(), Calibration({"conv1": 0.1}), INPUT_SHAPE, "another act_layout"),
    (QuantSpec(bits=8, act_bits=8), ExportOptions(), Calibration({"x": 0.1}, {"x": 0}), INPUT_SHAPE, "missing"),
    (QuantSpec(bits=4), ExportOptions(int4_storage=True, opset=18), None, INPUT_SHAPE, "opset"),
    (QuantSpec(bits=4), ExportOptions(metadata={QUANTIZATION_KEY: "{}"}), None, INPUT_SHAPE, "may not set"),
    (QuantSpec(bits=4), {"fp16": False}, None, INPUT_SHAPE, "ExportOptions"),
    (QuantSpec(bits=4), ExportOptions(), None, (2, 0, 8), "input_shape"),
], ids=["int4-8bit", "fp16-quantized", "act-no-calibration", "calibration-no-act", "scales-dict",
        "calibration-missing-layers", "calibration-of-the-other-layout", "calibration-missing-points", "int4-opset", "metadata-hero-quantization", "options-dict", "input-shape"])
def test_inconsistent_options_raise_hero_error(model, tmp_path, spec, options, calibration, input_shape, message):
    with pytest.raises(HeroError, match=message):
        export_onnx(model, tmp_path / "m.onnx", spec, options, calibration, input_shape=input_shape)
    assert not (tmp_path / "m.onnx").exists()


def test_export_options_refuse_non_boolean_switches():
    with pytest.raises(HeroError, match="int4_storage"):
        ExportOptions(int4_storage="yes")
    with pytest.raises(HeroError, match="fp16"):
        ExportOptions(fp16=1)
