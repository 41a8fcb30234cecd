import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporters.onnx import ExportOptions, export_onnx
from exporters.calibrate import calibrate_activations
from exporters.quantize import QuantSpec, fold_bn
from exporters.trt_lint import lint_explicit_quantization, main, residual_warnings

CHANNELS = 4


def _tensor(name, data_type, values, dims=None):
    values = np.asarray(values)
    return helper.make_tensor(name, data_type, list(values.shape if dims is None else dims), values.ravel().tolist())


def qdq_conv_model(
    *,
    act_zero_point=0,
    act_zp_type=TensorProto.INT8,
    act_scale=(0.05,),
    weight_scale=None,
    weight_axis=0,
    weight_type=TensorProto.INT8,
    weight_codes=None,
    opset=17,
):
    """x -> Q/DQ (per tensor) -> Conv(DQ(int8 W, per-channel)) -> y, all knobs defaulting to clean."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(CHANNELS, CHANNELS, 3, 3)) if weight_codes is None else weight_codes
    weight_scale = np.full(CHANNELS, 0.01) if weight_scale is None else np.asarray(weight_scale)
    act_scale = np.asarray(act_scale, dtype=np.float32)
    inits = [
        _tensor("act_scale", TensorProto.FLOAT, act_scale, dims=[] if act_scale.size == 1 else act_scale.shape),
        _tensor("act_zp", act_zp_type, [act_zero_point] * act_scale.size, dims=[] if act_scale.size == 1 else act_scale.shape),
        _tensor("w_codes", weight_type, codes),
        _tensor("w_scale", TensorProto.FLOAT, weight_scale),
        _tensor("w_zp", weight_type, np.zeros(CHANNELS, dtype=int)),
    ]
    act_axis = {} if act_scale.size == 1 else {"axis": 1}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zp"], ["xq"], name="q_x", **act_axis),
        helper.make_node("DequantizeLinear", ["xq", "act_scale", "act_zp"], ["xdq"], name="dq_x", **act_axis),
        helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zp"], ["w"], name="dq_w",
                         **({} if weight_axis is None else {"axis": weight_axis})),
        helper.make_node("Conv", ["xdq", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _has(issues, *words):
    return any(all(w in issue for w in words) for issue in issues)


def test_clean_per_channel_conv_and_per_tensor_activation_has_no_issues():
    model = qdq_conv_model()
    onnx.checker.check_model(model)
    assert lint_explicit_quantization(model) == []


def test_nonzero_zero_point_is_reported():
    issues = lint_explicit_quantization(qdq_conv_model(act_zero_point=3))
    assert _has(issues, "q_x", "zero point", "not 0")


def test_uint8_quantization_is_reported():
    issues = lint_explicit_quantization(qdq_conv_model(act_zp_type=TensorProto.UINT8))
    assert _has(issues, "q_x", "UINT8")


def test_quantize_without_zero_point_defaults_to_uint8_and_is_reported():
    model = qdq_conv_model()
    model.graph.node[0].input.pop()  # ONNX: no zero point and no output_dtype means uint8
    assert _has(lint_explicit_quantization(model), "q_x", "UINT8")


def test_negative_scale_is_reported():
    issues = lint_explicit_quantization(qdq_conv_model(weight_scale=[0.01, -0.02, 0.01, 0.01]))
    assert _has(issues, "dq_w", "strictly positive")


def test_per_channel_activation_scale_is_reported():
    issues = lint_explicit_quantization(qdq_conv_model(act_scale=[0.05] * CHANNELS))
    assert _has(issues, "q_x", "per-channel scale on an activation")


def test_conv_weight_scale_on_input_channel_axis_is_reported():
    issues = lint_explicit_quantization(qdq_conv_model(weight_axis=1))
    assert _has(issues, "dq_w", "axis is 1", "axis=0")


def test_missing_axis_defaults_to_one_and_is_reported_for_conv_weights():
    assert _has(lint_explicit_quantization(qdq_conv_model(weight_axis=None)), "dq_w", "axis=0")


def test_opset_older_than_13_is_reported():
    assert _has(lint_explicit_quantization(qdq_conv_model(opset=10)), "opset 10", "13")


def test_opset_newer_than_target_parser_is_reported_unless_raised():
    model = qdq_conv_model(opset=23)
    assert _has(lint_explicit_quantization(model), "opset 23")
    assert lint_explicit_quantization(model, max_opset=24) == []


def test_int4_weights_feeding_conv_are_reported():
    codes = np.random.default_rng(1).integers(-7, 8, size=(CHANNELS, CHANNELS, 3, 3))
    issues = lint_explicit_quantization(qdq_conv_model(weight_type=TensorProto.INT4, weight_codes=codes))
    assert _has(issues, "dq_w", "INT4", "Conv")


def test_weight_code_minus_128_is_reported_only_in_narrow_range_mode():
    codes = np.zeros((CHANNELS, CHANNELS, 3, 3), dtype=int)
    codes[0, 0, 0, 0] = -128
    model = qdq_conv_model(weight_codes=codes)
    assert _has(lint_explicit_quantization(model), "dq_w", "-128")
    assert lint_explicit_quantization(model, narrow_range=False) == []


def test_quantize_without_dequantize_is_reported():
    model = qdq_conv_model()
    model.graph.output.append(helper.make_tensor_value_info("xq", TensorProto.INT8, None))
    model.graph.node[1].input[0] = "x"  # dq_x now reads the float input, q_x only feeds the graph output
    issues = lint_explicit_quantization(model)
    assert _has(issues, "q_x", "DequantizeLinear")
    assert _has(issues, "dq_x", "neither constant weights nor a QuantizeLinear")


def _gemm_model(*, trans_b, axis, weight_type=TensorProto.INT8, op="Gemm"):
    k, n = 6, 5
    shape = (n, k) if trans_b else (k, n)
    inits = [
        _tensor("b", weight_type, np.ones(shape, dtype=int)),
        _tensor("b_scale", TensorProto.FLOAT, np.full(n, 0.1)),
        _tensor("b_zp", weight_type, np.zeros(n, dtype=int)),
    ]
    matmul = (helper.make_node("Gemm", ["x", "bw"], ["y"], name="fc", transB=int(trans_b)) if op == "Gemm"
              else helper.make_node("MatMul", ["x", "bw"], ["y"], name="fc"))
    nodes = [helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["bw"], name="dq_b", axis=axis), matmul]
    graph = helper.make_graph(
        nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b, good_axis", [(True, 0), (False, 1)])
def test_gemm_weight_axis_follows_trans_b(trans_b, good_axis):
    assert lint_explicit_quantization(_gemm_model(trans_b=trans_b, axis=good_axis)) == []
    assert _has(lint_explicit_quantization(_gemm_model(trans_b=trans_b, axis=1 - good_axis)), f"axis={good_axis}")


def test_int4_weight_only_matmul_is_accepted():
    assert lint_explicit_quantization(_gemm_model(trans_b=False, axis=1, weight_type=TensorProto.INT4, op="MatMul")) == []


def test_int4_conv_rule_says_it_is_conservative():
    codes = np.random.default_rng(1).integers(-7, 8, size=(CHANNELS, CHANNELS, 3, 3))
    issues = lint_explicit_quantization(qdq_conv_model(weight_type=TensorProto.INT4, weight_codes=codes))
    assert _has(issues, "dq_w", "conservative")


def _block_model(codes, scale_shape=(2, 4), block_size=4):
    """x (N, 8) -> MatMul(DQ(codes (8, 4), block scales along axis 0)) -> y, opset 21."""
    inits = [numpy_helper.from_array(codes, "w"),
             numpy_helper.from_array(np.full(scale_shape, 0.1, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["wf"], name="dq_w", axis=0, block_size=block_size),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("dtype", ["int4", "float8_e4m3fn", "float4_e2m1fn"])
def test_block_scales_are_accepted_for_int4_fp8_and_fp4_weights(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    codes = np.ones((8, 4), dtype=getattr(ml_dtypes, dtype))
    assert lint_explicit_quantization(_block_model(codes), max_opset=21) == []


def test_block_scales_are_refused_for_int8_and_when_not_matching_the_weight_shape():
    int8 = lint_explicit_quantization(_block_model(np.ones((8, 4), np.int8)), max_opset=21)
    assert _has(int8, "dq_w", "block scales only for INT4, FP8 and FP4")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = _block_model(np.ones((8, 4), ml_dtypes.int4), scale_shape=(2, 2))
    model.graph.node[0].attribute.pop()  # block_size: onnx would refuse the shapes otherwise
    assert _has(lint_explicit_quantization(model, max_opset=21), "dq_w", "last two axes")


def _half_activation_model(scale_type):
    """x (float16) -> Q/DQ (per tensor, scale of `scale_type`) -> y, opset 21 (scale and input types may differ)."""
    scale = np.array(0.05, dtype=helper.tensor_dtype_to_np_dtype(scale_type))
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq_x")]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
                              [helper.make_tensor_value_info("y", scale_type, ["N", 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_scale_type_must_match_the_type_it_quantizes_in_strongly_typed_networks():
    assert lint_explicit_quantization(_half_activation_model(TensorProto.FLOAT16), max_opset=21) == []
    issues = lint_explicit_quantization(_half_activation_model(TensorProto.FLOAT), max_opset=21)
    assert _has(issues, "q_x", "scale is FLOAT but its input is FLOAT16")
    assert not _has(issues, "dq_x")  # its output is float32, as its scale


def test_per_channel_quantize_of_constant_float_weights_is_accepted():
    model = qdq_conv_model()
    w_float = numpy_helper.from_array(np.ones((CHANNELS, CHANNELS, 3, 3), dtype=np.float32), "w_float")
    model.graph.initializer.append(w_float)
    q_w = helper.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zp"], ["w_codes_q"], name="q_w", axis=0)
    model.graph.node.insert(2, q_w)
    model.graph.node[3].input[0] = "w_codes_q"
    assert lint_explicit_quantization(model) == []


def test_cli_exit_codes_and_one_issue_per_line(tmp_path, capsys):
    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(qdq_conv_model(), clean)
    onnx.save(qdq_conv_model(act_zero_point=3, weight_axis=1), broken)
    assert main([str(clean)]) == 0
    assert capsys.readouterr().out == ""
    assert main([str(broken)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2 and _has(lines, "zero point") and _has(lines, "axis=0")
    (tmp_path / "junk.onnx").write_text("not a model")
    assert main([str(tmp_path / "junk.onnx")]) == 2
    assert main([str(tmp_path / "missing.onnx")]) == 2


# ---- what hero-deploy's own exporter writes ------------------------------------------------

def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("spec, options, words", [
    (QuantSpec(bits=8, act_bits=8, act_layout="tensorrt"), ExportOptions(), None),
    (QuantSpec(bits=3, per_channel=False), ExportOptions(), None),
    (QuantSpec(bits=4, symmetric=False), ExportOptions(), ("0.weight_DequantizeLinear", "UINT8")),
    (QuantSpec(bits=4), ExportOptions(int4_storage=True), ("0.weight_DequantizeLinear", "INT4", "Conv")),
], ids=["w8a8-symmetric", "w3-per-tensor", "w4-asymmetric", "w4-int4-storage"])
def test_exported_graphs_lint_clean_exactly_when_symmetric_int8(tmp_path, spec, options, words):
    net = _small_net()
    calibration = (calibrate_activations(fold_bn(net), [torch.randn(4, 2, 6, 6)], spec)
                   if spec.act_bits is not None else None)
    path = export_onnx(net, tmp_path / "m.onnx", spec, options, calibration, input_shape=(2, 6, 6))
    issues = lint_explicit_quantization(str(path))
    if words is None:
        assert issues == []
    else:
        assert _has(issues, *words)


# ---- TensorRT's residual placement ---------------------------------------------------------

class _Block(nn.Module):
    """A ResNet basic block with an identity shortcut, then a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.conv(x) + x))


def _exported_block(tmp_path):
    torch.manual_seed(0)
    net, spec = _Block().eval(), QuantSpec(bits=8, act_bits=8, act_layout="tensorrt")
    calibration = calibrate_activations(net, [torch.randn(4, 2, 6, 6)], spec)
    return export_onnx(net, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=(2, 6, 6)), calibration


def test_tensorrt_layout_quantizes_the_residual_input_of_the_add(tmp_path):
    path, calibration = _exported_block(tmp_path)
    assert "add.residual" in calibration.scales
    graph = onnx.load(path).graph
    producers = {out: node for node in graph.node for out in node.output}
    (add,) = [node for node in graph.node if node.op_type == "Add"]
    kinds = sorted(producers[name].op_type for name in add.input)
    assert kinds == ["Conv", "DequantizeLinear"]  # the conv fuses with the Add; the shortcut is INT8
    assert lint_explicit_quantization(str(path)) == [] and residual_warnings(str(path)) == []


def test_residual_add_without_qdq_is_a_warning_naming_it_not_an_issue(tmp_path, capsys):
    path, _ = _exported_block(tmp_path)
    proto = onnx.load(path)
    producers = {out: node for node in proto.graph.node for out in node.output}
    (add,) = [node for node in proto.graph.node if node.op_type == "Add"]
    index = next(i for i, name in enumerate(add.input) if producers[name].op_type == "DequantizeLinear")
    clip = producers[producers[producers[add.input[index]].input[0]].input[0]]  # DQ <- Q <- Clip
    add.input[index] = clip.input[0]  # the float residual, around its Q/DQ
    onnx.save(proto, tmp_path / "float_residual.onnx")
    warnings = residual_warnings(str(tmp_path / "float_residual.onnx"))
    assert len(warnings) == 1 and add.name in warnings[0] and "Conv" in warnings[0]
    assert lint_explicit_quantization(str(tmp_path / "float_residual.onnx")) == []
    assert main([str(tmp_path / "float_residual.onnx")]) == 0
    assert capsys.readouterr().out.startswith("warning: ")


def test_weight_only_graphs_have_no_residual_warning(tmp_path):
    net = _Block().eval()
    path = export_onnx(net, tmp_path / "m.onnx", QuantSpec(bits=8), input_shape=(2, 6, 6))
    assert residual_warnings(str(path)) == []
