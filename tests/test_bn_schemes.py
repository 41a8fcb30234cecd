"""BatchNorm order (QuantSpec.bn) and nested grids (QuantSpec.grid): the emulation, the exported graph
in ONNX Runtime and the algebra behind them."""

import itertools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.nested_grid import nested_grid_codes
from exporters.onnx import ExportOptions, export_onnx, read_quantization, weight_initializers
from exporters.quantize import QuantSpec, quantize_model, quantize_tensor, weight_codes
from exporters.trt_lint import lint_explicit_quantization
from pipeline.bundle import refit_group

INPUT_SHAPE = (3, 8, 8)


class ConvBN(nn.Module):
    """Two Conv-BN-ReLU blocks and a Linear; BN gains include a negative and a zero channel."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.3, 3.0)  # per-channel gains far from 1: per-tensor scales then differ
            bn.weight[1] = -bn.weight[1]
            bn.weight[2] = 0.0
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


def _out(model, spec, x):
    with torch.no_grad():
        return quantize_model(model, spec)(x)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantize_first_equals_fold_first_per_channel(images, bits):
    model = _model()
    a = _out(model, QuantSpec(bits=bits, bn="quantize-first"), images)
    b = _out(model, QuantSpec(bits=bits, bn="fold-first"), images)
    assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("bits, per_channel", itertools.product([8, 4, 3], [True, False]))
def test_quantize_first_equals_keeping_batchnorm_for_every_scheme(images, bits, per_channel):
    model = _model()
    a = _out(model, QuantSpec(bits=bits, per_channel=per_channel, bn="quantize-first"), images)
    b = _out(model, QuantSpec(bits=bits, per_channel=per_channel, bn="keep"), images)
    assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item()), (a - b).abs().max()


def test_quantize_first_differs_from_fold_first_per_tensor(images):
    model = _model()
    a = _out(model, QuantSpec(bits=3, per_channel=False, bn="quantize-first"), images)
    b = _out(model, QuantSpec(bits=3, per_channel=False, bn="fold-first"), images)
    assert (a - b).abs().max() > 1e-2 * b.abs().max()


def test_quantize_first_keeps_the_trained_codes_with_positive_scales():
    model = _model()
    codes = weight_codes(model, QuantSpec(bits=4, per_channel=False, bn="quantize-first"))["conv1"]
    trained, _, _ = quantize_tensor(model.conv1.weight, 4, per_channel=False)
    assert codes.scale.shape == (6,) and bool((codes.scale > 0).all())
    assert torch.equal(codes.q[0], trained[0])  # positive gain: the trained codes
    assert torch.equal(codes.q[1], -trained[1])  # negative gain: negated, scale stays positive
    assert not codes.q[2].any()  # zero gain: a constant-zero channel
    assert codes.q.abs().max() <= 7


def test_quantize_first_refuses_asymmetric_grids():
    with pytest.raises(HeroError, match="quantize-first is defined for symmetric"):
        QuantSpec(bits=4, symmetric=False, bn="quantize-first")


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, per_channel=False, bn="quantize-first"),
    QuantSpec(bits=8, bn="quantize-first"),
    QuantSpec(bits=4, grid="nested"),
    QuantSpec(bits=3, per_channel=False, bn="quantize-first", grid="nested"),
], ids=["w4-tensor-qf", "w8-ch-qf", "w4-nested", "w3-tensor-qf-nested"])
def test_exported_graph_matches_the_emulation_and_lints_clean(images, tmp_path, spec):
    model = _model()
    path = export_onnx(model, tmp_path / "m.onnx", spec, input_shape=INPUT_SHAPE)  # INT8 codes: what TensorRT takes
    graph = onnx.load(path)
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    assert lint_explicit_quantization(graph) == []
    for w in weight_initializers(graph).values():
        assert (w.scale > 0).all() and not w.zero_point.any()
    expected = _out(model, spec, images).numpy()
    for optimization in ("default", "disabled"):
        got = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization).predict(images.numpy())
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert read_quantization(OnnxRuntimeRunner(path).metadata, path)[0] == spec


def test_nested_grid_is_the_one_nested_grid_formula():
    w = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    for bits, per_channel in itertools.product([8, 6, 4, 2], [True, False]):
        q, scale, zp = quantize_tensor(w, bits, per_channel=per_channel, grid="nested")
        codes, s8 = nested_grid_codes(w.numpy(), bits, 0 if per_channel else None)
        assert np.array_equal(q.numpy(), codes) and np.array_equal(scale.numpy(), s8) and not zp.any()
        assert q.abs().max() <= 127 and (q % 2 ** (8 - bits) == 0).all()


def test_nested_variants_share_one_refit_group_canonical_ones_do_not(tmp_path):
    model = _model()
    groups = {}
    for grid in ("nested", "canonical"):
        groups[grid] = {refit_group(export_onnx(model, tmp_path / f"{grid}{b}.onnx", QuantSpec(bits=b, grid=grid),
                                                input_shape=INPUT_SHAPE)) for b in (8, 6, 4)}
    assert len(groups["nested"]) == 1 and len(groups["canonical"]) == 3


def test_nested_int4_storage_is_refused(tmp_path):
    with pytest.raises(HeroError, match="INT8 codes"):
        export_onnx(_model(), tmp_path / "m.onnx", QuantSpec(bits=4, grid="nested"), ExportOptions(int4_storage=True),
                    input_shape=INPUT_SHAPE)
