"""Block-wise weights (QuantSpec.block_size): the grid, its DequantizeLinear-21 export, and the
MatMulNBits form (exporters/matmul_nbits.py), each against the emulation."""

import collections

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from agreement import assert_float_close, assert_matches_act_quantized
from exporters import matmul_nbits
from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.grid import blockwise_symmetric, dynamic_block_qdq, expand_blocks
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, quantize_model, quantized_layers, weight_codes
from attention_models import SwinLike, TinyViT, ViTLike
from conftest import with_batchnorm_statistics

MODELS = [ViTLike, SwinLike, TinyViT]
INPUT_SHAPE = (3, 8, 8)


def _build(make):
    torch.manual_seed(0)
    return with_batchnorm_statistics(make())


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2))


def test_blockwise_grid_is_one_symmetric_grid_per_block():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[2, 16:32] = 0  # an all-zero block keeps scale 1 and codes 0
    q, scale, zero_point = blockwise_symmetric(w, 4, 16)
    assert q.shape == (6, 40) and scale.shape == (6, 3) and not zero_point.any()  # 40 = 16 + 16 + 8
    for block, columns in enumerate((slice(0, 16), slice(16, 32), slice(32, 40))):
        amax = w[:, columns].abs().amax(dim=1)
        live = amax > 0
        torch.testing.assert_close(scale[live, block], amax[live] / 7)
        assert (q[live, columns].abs().amax(dim=1) == 7).all()  # each block reaches its own grid's end
    assert scale[2, 1] == 1 and not q[2, 16:32].any()
    error = (q * expand_blocks(scale, 16, 40) - w).abs()
    assert (error <= expand_blocks(scale, 16, 40) / 2 + 1e-7).all()


@pytest.mark.parametrize("bad, words", [
    (dict(block_size=24), "power of two"), (dict(block_size=8), "power of two"),
    (dict(block_size=32, act_bits=8, bits=8), "bits <= 4"), (dict(block_size=32, symmetric=False), "symmetric"),
    (dict(block_size=32, per_channel=False), "per_channel"), (dict(block_size=32, grid="nested"), "nested"),
    (dict(block_size=32, bn="quantize-first"), "quantize-first")])
def test_block_size_is_checked_once_in_the_spec(bad, words):
    with pytest.raises(HeroError, match=words):
        QuantSpec(**{"bits": 4, **bad})


def test_only_linear_weights_are_blockwise(images):
    model = _build(ViTLike)
    codes = weight_codes(model, QuantSpec(bits=4, block_size=16))
    assert codes["patch"].block_size is None and codes["patch"].scale.shape == (16,)  # a Conv: per channel
    for name, layer in quantized_layers(model):
        if isinstance(layer, nn.Linear):
            assert codes[name].block_size == 16
            assert codes[name].scale.shape == (layer.weight.shape[0], -(-layer.weight.shape[1] // 16))


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize("int4_storage", [False, True], ids=["int8-storage", "int4-storage"])
@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_blockwise_dequantize_form_computes_the_emulation(cls, int4_storage, images, tmp_path):
    model, spec = _build(cls), QuantSpec(bits=4, block_size=16)
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(int4_storage=int4_storage), input_shape=INPUT_SHAPE)
    blocked = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert len(blocked) == sum(isinstance(m, nn.Linear) for _, m in quantized_layers(model))
    emulation = quantize_model(model, spec)(images)
    for optimization in ("disabled", "default"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        assert_float_close(runner.predict(images.numpy()), emulation)
    # INT4 codes are not folded to float by the runner: ONNX Runtime runs them as MatMulNBits
    runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"])
    assert runner.weight_dequant == ("runtime" if int4_storage else "folded")


def test_pack_puts_codes_plus_eight_low_nibble_first():
    q = np.array([[-7, 7, 0, 1, -1, 3]], dtype=np.int8)  # one row, 6 inputs, blocks of 4: the last padded
    packed = matmul_nbits.pack(q, 4)
    assert packed.shape == (1, 2, 2) and packed.dtype == np.uint8
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(1, -1).astype(np.int16) - 8
    np.testing.assert_array_equal(unpacked[:, :6], q)
    np.testing.assert_array_equal(unpacked[:, 6:], 0)  # padding is the code of 0
    assert packed[0, 0, 0] == (-7 + 8) | ((7 + 8) << 4)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_matmul_nbits_form_runs_every_linear_as_matmul_nbits_at_the_emulation(cls, bits, images, tmp_path):
    model, spec = _build(cls), QuantSpec(bits=bits, block_size=16)
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(matmul_nbits=True), input_shape=INPUT_SHAPE)
    proto = onnx.load(path)
    linears = sum(isinstance(m, nn.Linear) for _, m in quantized_layers(model))
    ops = _ops(path)
    assert ops["MatMulNBits"] == linears and ops["DequantizeLinear"] == 1  # the patch conv stays per channel
    assert any(o.domain == matmul_nbits.DOMAIN for o in proto.opset_import)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "block_size"} == {16}
    emulation = quantize_model(model, spec)(images)
    for optimization in ("disabled", "default"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        assert_float_close(runner.predict(images.numpy()), emulation)
        assert_float_close(runner.predict(images[:1].numpy()), emulation[:1])


def test_matmul_nbits_holds_the_emulations_codes(tmp_path):
    model, spec = _build(ViTLike), QuantSpec(bits=4, block_size=16)
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(matmul_nbits=True, int4_storage=True),
                       input_shape=INPUT_SHAPE)
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    codes = weight_codes(model, spec)["attn.in_proj"]
    np.testing.assert_array_equal(initializers["attn.in_proj.weight_nbits"], matmul_nbits.pack(codes.q.numpy(), 16))
    np.testing.assert_array_equal(initializers["attn.in_proj.weight_nbits_scale"], codes.scale.numpy().reshape(-1))
    assert initializers["attn.in_proj.weight_nbits"].nbytes == codes.q.numel() // 2  # 4 bits a weight


def test_matmul_nbits_needs_blockwise_weights_of_four_bits_or_fewer(tmp_path):
    model = _build(ViTLike)
    with pytest.raises(HeroError, match="set block_size"):
        export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=4), ExportOptions(matmul_nbits=True), input_shape=INPUT_SHAPE)
    with pytest.raises(HeroError, match="4 bits or fewer"):
        export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=8, block_size=16), ExportOptions(matmul_nbits=True),
                    input_shape=INPUT_SHAPE)
    assert not (tmp_path / "m.onnx").exists()


def test_int4_codes_read_back_from_int4_storage(tmp_path):
    """INT4 storage of block-wise codes holds the same integers as the emulation."""
    model, spec = _build(TinyViT), QuantSpec(bits=3, block_size=16)
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(int4_storage=True), input_shape=INPUT_SHAPE)
    stored = {t.name: t for t in onnx.load(path).graph.initializer}
    q = numpy_helper.to_array(stored["mlp.0.weight_transposed_quantized"])
    assert q.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(q.astype(np.int8).T, weight_codes(model, spec)["mlp.0"].q.numpy())


# ---- int8 activations per block: MatMulNBits accuracy level 4 -------------------------------------

def test_dynamic_block_activations_are_one_int8_grid_per_block_and_call():
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 0, 16:32] = 0
    y = dynamic_block_qdq(x, 16)
    assert y.shape == x.shape
    for columns in (slice(0, 16), slice(16, 32), slice(32, 40)):
        block, out = x[..., columns], y[..., columns]
        amax = block.abs().amax(dim=-1, keepdim=True)
        step = amax / 127
        live = (amax > 0).expand_as(block)
        levels = out[live] / step.expand_as(block)[live]
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)  # on the block's own grid
        assert ((out - block).abs() <= step / 2 + 1e-6).all()
    assert not y[0, 0, 16:32].any()  # an all-zero block stays zero
    torch.testing.assert_close(dynamic_block_qdq(x * 2, 16), 2 * y)  # the range is the call's own


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_int8_compute_matmul_nbits_computes_the_emulation(cls, images, tmp_path):
    """The emulation quantizes each module-called Linear's input as the kernel does; a weight used
    only through F.linear (SwinLike's attention) keeps float activations, accuracy level 0."""
    model, spec = _build(cls), QuantSpec(bits=4, block_size=16, act_bits=8)
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(matmul_nbits=True), input_shape=INPUT_SHAPE)
    levels = collections.Counter(helper.get_attribute_value(a) for n in onnx.load(path).graph.node
                                 if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")
    functional = 2 if cls is SwinLike else 0
    assert levels == collections.Counter({4: sum(levels.values()) - functional, **({0: functional} if functional else {})})
    emulation = quantize_model(model, spec)(images)
    weight_only = quantize_model(model, QuantSpec(bits=4, block_size=16))(images)
    assert not torch.equal(emulation, weight_only)
    for optimization in ("disabled", "default"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        assert_matches_act_quantized(runner.predict(images.numpy()), emulation, weight_only)


def test_int8_compute_needs_the_matmul_nbits_form_and_no_calibration(tmp_path):
    model, spec = _build(TinyViT), QuantSpec(bits=4, block_size=16, act_bits=8)
    with pytest.raises(HeroError, match="runs only as MatMulNBits"):
        export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    from exporters.quantize import Calibration
    with pytest.raises(HeroError, match="pass no Calibration"):
        quantize_model(model, spec, Calibration({"patch": 0.1}))
    assert not (tmp_path / "m.onnx").exists()


# ---- the pipeline ---------------------------------------------------------------------------------

def _deploy_config(tmp_path, quantize: dict, export: dict, runtime: str = "onnxruntime"):
    import yaml

    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": "blocks", "quantize": quantize, "export": export, "runtime": {"name": runtime},
                                      "data": {"limit_test": 16}, "gate": {"max_drop": 100.0},
                                      "validate": {"batch_size": 16, "latency_repeats": 1, "unoptimized_samples": 8}}))
    return str(config)


def test_hero_run_ships_int8_compute_matmul_nbits_and_reports_the_block_size(trained, tmp_path, capsys):
    import json

    from pipeline.cli import main

    config = _deploy_config(tmp_path, {"bits": [4], "block_size": 16, "act_bits": 8}, {"matmul_nbits": True})
    out = tmp_path / "run"
    assert main(["run", config, "--checkpoint", trained["checkpoint"], "--out", str(out), "--data-root", trained["data"]]) == 0
    (row,) = json.loads((out / "report.json").read_text())["variants"]
    assert (row["name"], row["block_size"], row["act_bits"]) == ("w4a8", 16, 8) and row["consistent"]
    assert row["kernels"]["ops"].get("MatMulNBits") == 1  # ResNet20's one Linear, the head
    assert "act_noise_rms" in row and row["act_noise_rms"] > 0  # bounded like every A8 variant


@pytest.mark.parametrize("quantize, export, runtime, words", [
    ({"bits": [4], "block_size": 16, "act_bits": 8}, {}, "onnxruntime", "export.matmul_nbits"),
    ({"bits": [4], "block_size": 16}, {"matmul_nbits": True}, "tensorrt", "contrib operator"),
])
def test_deploy_config_refuses_block_options_that_cannot_run(tmp_path, capsys, quantize, export, runtime, words):
    from pipeline.cli import main

    assert main(["run", _deploy_config(tmp_path, quantize, export, runtime), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
