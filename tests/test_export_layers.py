"""Export and quantization cover the layers real classifiers use, not only ResNets: depthwise,
grouped and 1x1 convolutions, Linear on (B, T, D) tokens (MatMul with a transposed weight),
attention, token mixing, SiLU/GELU/Hardswish, residual adds, concatenation, pooling, Dropout,
BatchNorm that folds and BatchNorm that stays. Each model is checked against the emulation."""

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn
from torch.nn import functional as F

from agreement import assert_float_close, assert_matches_act_quantized, float_tolerance
from attention_models import SwinLike, TinyViT, ViTLike
from conftest import with_batchnorm_statistics

from exporters.act_layout import plan_points, residual_points, trace
from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.onnx import ExportOptions, export_onnx, weight_initializers
from exporters.calibrate import calibrate_activations
from exporters.quantize import (QuantSpec, dequantize, float_copy, fold_bn, quantize_model, quantize_tensor,
                                quantized_layers)

INPUT_SHAPE = (3, 8, 8)


class MobileNetLike(nn.Module):
    """Strided stem, depthwise + pointwise (1x1) convs, a grouped conv, SiLU/Hardswish, residual
    adds, a BatchNorm after an add (no conv to fold into), two concatenated branches, adaptive
    pooling, Dropout and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.dw_bn = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.pw_bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.add_bn = nn.BatchNorm2d(8)
        self.branch_a, self.branch_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.pool, self.drop, self.head = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.stem_bn(self.stem(x)))
        x = x + self.pw_bn(self.pw(F.hardswish(self.dw_bn(self.dw(x)))))
        x = self.add_bn(x + self.grouped(x))
        x = torch.cat([self.branch_a(x), torch.relu(self.branch_b(x))], dim=1)
        return self.head(self.drop(torch.flatten(self.pool(x), 1)))


class MixerLike(nn.Module):
    """MLP-Mixer block: token mixing is a Linear over the token axis of transposed tokens; then a
    Linear -> BatchNorm1d on pooled features, which folds."""

    def __init__(self, dim=12, tokens=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.norm1 = nn.LayerNorm(dim)
        self.token_mix = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mix = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.neck, self.neck_bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mix(self.norm2(x))
        return self.head(torch.relu(self.neck_bn(self.neck(x.mean(1)))))


class SharedProjection(nn.Module):
    """One Linear called twice on tokens. The ONNX constant folder turns the two Transposes of a
    small weight into two copies, and leaves those of a weight above its size limit (512 x 512
    elements) unfolded."""

    def __init__(self, dim):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.proj(torch.relu(self.proj(x))).mean(1))


class TokenBatchNorm(nn.Module):
    """BatchNorm1d(16) on the (B, T=16, D=16) output of a Linear normalizes tokens, not features."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, stride=2)
        self.fc, self.bn, self.head = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.bn(self.fc(self.patch(x).flatten(2).transpose(1, 2))).mean(1))


def _build(make):
    torch.manual_seed(0)
    return with_batchnorm_statistics(make())  # non-trivial statistics so folding changes the weights


MODELS = [MobileNetLike, TinyViT, MixerLike, ViTLike, SwinLike]
FLOAT_BATCHNORMS = {MobileNetLike: 1, TinyViT: 0, MixerLike: 0, ViTLike: 0, SwinLike: 0}  # only the BN after an add
# q.k^T and attn.v: MatMuls between activations, no weight to quantize
ACTIVATION_MATMULS = {MobileNetLike: 0, TinyViT: 2, MixerLike: 0, ViTLike: 2, SwinLike: 2}
# layers whose weight is only passed to F.linear: quantized, but the tensorrt layout (pre-hooks on
# module calls) leaves their input float
FUNCTIONAL = {SwinLike: {"attn.qkv", "attn.proj"}}
SPECS = [QuantSpec(bits=8), QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False, per_channel=False),
         QuantSpec(bits=8, act_bits=8, act_layout="tensorrt"), QuantSpec(bits=8, act_bits=8)]
SPEC_IDS = ["w8", "w4", "w4-asym-per-tensor", "w8a8-tensorrt", "w8a8"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


def _calibration(model, spec, images):
    return calibrate_activations(fold_bn(model) if spec.bn != "keep" else model, [images], spec) if spec.act_bits else None


def _assert_runtime_matches(path, model, spec, calibration, images) -> None:
    """Both ORT optimization levels reproduce quantize_model's logits at batch 5 and batch 1, under
    tests/agreement.py's rules: elementwise at float tolerance without activation quantization,
    and within a fraction of the activation quantization's own effect with it (rounding flips)."""
    emulation = quantize_model(model, spec, calibration)(images)
    without = quantize_model(model, dataclasses.replace(spec, act_bits=None))(images) if spec.act_bits else None
    for optimization in ("default", "disabled"):
        runner = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization)
        for n in (len(images), 1):
            got = runner.predict(images[:n].numpy())
            if without is None:
                assert_float_close(got, emulation[:n])
            else:
                assert_matches_act_quantized(got, emulation[:n], without[:n])


def _ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


def _assert_every_layer_stored_quantized(path, model, spec) -> None:
    """One DequantizeLinear weight per Conv/Linear, named after it, holding exactly
    quantize_tensor's integers of the (folded) weight; no float weight matrix left."""
    folded = fold_bn(model) if spec.bn != "keep" else model
    weights = weight_initializers(path)
    assert len(weights) == len(quantized_layers(model))
    by_layer = {name.removesuffix("_transposed").removesuffix(".weight"): (name.endswith("_transposed"), w)
                for name, w in weights.items()}
    assert set(by_layer) == {name for name, _ in quantized_layers(model)}
    for name, layer in quantized_layers(folded):
        q, scale, zero_point = (t.numpy() for t in quantize_tensor(layer.weight, spec.bits, symmetric=spec.symmetric,
                                                                   per_channel=spec.per_channel))
        transposed, stored = by_layer[name]
        assert stored.axis == ((1 if transposed else 0) if spec.per_channel else None)
        np.testing.assert_array_equal(stored.q.T if transposed else stored.q, q)
        np.testing.assert_array_equal(stored.scale, scale)
        np.testing.assert_array_equal(stored.zero_point, zero_point)
    assert _float_weight_matrices(path) == []


def _float_weight_matrices(path) -> list[str]:
    """Float initializers of rank >= 2 that a Conv/Gemm/MatMul reads (a class token or a position
    embedding is a float Parameter, not a weight)."""
    proto = onnx.load(path)
    floats = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1}
    return sorted({name for node in proto.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
                   for name in node.input if name in floats})


def _activation_matmuls(path) -> int:
    """MatMul/Gemm nodes that read no quantized weight."""
    proto = onnx.load(path)
    weights = set(weight_initializers(proto))
    return sum(node.op_type in ("MatMul", "Gemm") and not weights & set(node.input) for node in proto.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_export_matches_quantize_model_and_quantizes_every_layer(cls, spec, images, tmp_path):
    model = _build(cls)
    calibration = _calibration(model, spec, images)
    path = export_onnx(model, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=INPUT_SHAPE)
    _assert_runtime_matches(path, model, spec, calibration, images)
    _assert_every_layer_stored_quantized(path, model, spec)
    assert _ops(path).count("BatchNormalization") == FLOAT_BATCHNORMS[cls]
    assert _activation_matmuls(path) == ACTIVATION_MATMULS[cls]
    if spec.act_bits and spec.act_layout == "tensorrt":  # one Q on each Conv/Linear input and residual input
        residual = residual_points(trace(float_copy(model, spec)))
        called = {name for name, _ in quantized_layers(model)} - FUNCTIONAL.get(cls, set())
        assert set(calibration.scales) == called | set(residual)
        assert _ops(path).count("QuantizeLinear") == len(called) + len(residual)
    if spec.act_bits and spec.act_layout == "onnxruntime":  # one Q per quantization point
        assert _ops(path).count("QuantizeLinear") == len(calibration.scales) + sum(
            1 for name in plan_points(trace(float_copy(model, spec))).points.values() if name is not None)


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_every_layer_alone_moves_the_logits_beyond_the_export_tolerance(cls, images):
    """The differential checks above can fail: restoring any single layer's float weights in the
    4-bit emulation moves the logits past twice the tolerance, so an export that left one layer
    float would not match."""
    model = _build(cls)
    folded = fold_bn(model)
    with torch.no_grad():
        expected = quantize_model(model, QuantSpec(bits=4))(images)
        tolerance = float_tolerance(expected)
        for name, layer in quantized_layers(folded):
            one_float = quantize_model(model, QuantSpec(bits=4))
            one_float.get_parameter(f"{name}.weight").copy_(layer.weight)
            assert (one_float(images) - expected).abs().max() > 2 * tolerance, name


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_fold_bn_keeps_the_float_outputs(cls, images):
    model = _build(cls)
    folded = fold_bn(model)
    bns = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == FLOAT_BATCHNORMS[cls]
    torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-5)


def test_unfolded_export_keeps_every_batchnorm_and_matches_quantize_model(images, tmp_path):
    model, spec = _build(MobileNetLike), QuantSpec(bits=4, bn="keep")
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    assert _ops(path).count("BatchNormalization") == 4
    _assert_runtime_matches(path, model, spec, None, images)
    _assert_every_layer_stored_quantized(path, model, spec)


def test_int4_storage_of_a_transformer_matches_quantize_model(images, tmp_path):
    model, spec = _build(TinyViT), QuantSpec(bits=4, symmetric=False)
    int4_path = export_onnx(model, tmp_path / "int4.onnx", spec, ExportOptions(int4_storage=True),
                            input_shape=INPUT_SHAPE)
    stored = {t.data_type for t in onnx.load(int4_path).graph.initializer if t.name.endswith("_quantized")}
    assert stored == {TensorProto.UINT4}
    _assert_runtime_matches(int4_path, model, spec, None, images)
    _assert_every_layer_stored_quantized(int4_path, model, spec)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=8, act_bits=8, act_layout="tensorrt"),
                                  QuantSpec(bits=8, act_bits=8)], ids=["w4", "w8a8-tensorrt", "w8a8"])
@pytest.mark.parametrize("dim", [16, 520], ids=["small", "above-fold-limit"])
def test_a_linear_called_twice_shares_one_quantized_weight(dim, spec, images, tmp_path):
    model = _build(lambda: SharedProjection(dim))
    calibration = _calibration(model, spec, images)
    path = export_onnx(model, tmp_path / "m.onnx", spec, calibration=calibration, input_shape=INPUT_SHAPE)
    proto = onnx.load(path)
    initializers = {t.name for t in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    weights = weight_initializers(proto)
    assert sorted(weights) == ["head.weight", "patch.weight", "proj.weight_transposed"]
    readers = [n for n in proto.graph.node if n.op_type == "MatMul" and "proj.weight_transposed" in n.input]
    assert len(readers) == 2
    _assert_runtime_matches(path, model, spec, calibration, images)


def test_batchnorm_over_tokens_after_a_linear_is_refused_not_folded_wrongly(images, tmp_path):
    model = _build(TokenBatchNorm)
    with pytest.raises(HeroError, match='BatchNorm bn .* Linear fc.*bn="keep"'):
        quantize_model(model, QuantSpec(bits=4))(images)
    with pytest.raises(HeroError, match='bn="keep"'):
        export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=4), input_shape=INPUT_SHAPE)
    spec = QuantSpec(bits=4, bn="keep")
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    _assert_runtime_matches(path, model, spec, None, images)


def test_folding_a_folded_model_traces_without_fallback(images):
    folded = fold_bn(_build(MixerLike))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "could not trace" fallback warns
        twice = fold_bn(folded)
    assert isinstance(twice.neck_bn, nn.Identity)
    torch.testing.assert_close(twice(images), folded(images), rtol=0, atol=0)


def test_multihead_attention_in_proj_is_one_matrix_quantized_per_row(images, tmp_path):
    """q, k and v are row blocks of in_proj_weight: one per-row grid, the emulation's codes in the graph,
    and every use of the Parameter (the emulation changes it where it lives) sees the same codes."""
    model, spec = _build(ViTLike), QuantSpec(bits=4)
    layers = dict(quantized_layers(model))
    assert layers["attn.in_proj"].weight is model.attn.in_proj_weight
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)
    stored = weight_initializers(path)["attn.in_proj.weight_transposed"]
    q, scale, _ = quantize_tensor(model.attn.in_proj_weight, 4)
    np.testing.assert_array_equal(stored.q.T, q.numpy())
    np.testing.assert_array_equal(stored.scale, scale.numpy())
    assert scale.shape == (3 * 16,)  # one scale per row: per output channel of q, k and v alike
    quantized = quantize_model(model, spec)
    assert quantized.attn.in_proj.weight.data_ptr() != model.attn.in_proj_weight.data_ptr()  # a copy
    torch.testing.assert_close(quantized.attn.in_proj.weight, dequantize(q, scale, torch.zeros_like(scale), axis=0))


def test_attention_that_cannot_be_quantized_is_one_error_naming_it(tmp_path):
    class CrossDims(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 2, stride=2)
            self.attn, self.head = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.attn(x, x[..., :8], x[..., :8], need_weights=False)[0].mean(1))

    with pytest.raises(HeroError, match=r"nn.MultiheadAttention attn uses kdim/vdim"):
        export_onnx(CrossDims().eval(), tmp_path / "m.onnx", QuantSpec(bits=4), input_shape=INPUT_SHAPE)
    assert not (tmp_path / "m.onnx").exists()
    export_onnx(CrossDims().eval(), tmp_path / "m.onnx", QuantSpec(), input_shape=INPUT_SHAPE)  # float: fine

