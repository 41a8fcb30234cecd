"""Tests for the linear uniform quantizer, BN folding and activation calibration (exporters/quantize.py)."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from exporters.device.errors import HeroError
from exporters.device.bits import check_bits, parse_bits
from exporters.calibrate import calibrate_activations
from exporters.quantize import (
    Calibration,
    QuantSpec,
    check_calibration,
    checked_act_scales,
    dequantize,
    fake_quantize,
    fold_bn,
    packed_weight_bytes,
    qrange,
    quantize_model,
    quantize_tensor,
)


WEIGHT_BITS = range(2, 9)  # bit widths checked against torch.fake_quantize_*


# ---- hand-computed cases -------------------------------------------------------------------

def test_symmetric_scale_matches_hand_computed_case():
    # 3 bits symmetric: qmax = 2^2 - 1 = 3, amax = 1 -> scale = 1/3;
    # w / scale = [-3, 1.5, 0.75, 3] -> round -> [-3, 2, 1, 3].
    q, scale, zero_point = quantize_tensor(torch.tensor([-1.0, 0.5, 0.25, 1.0]), 3, per_channel=False)
    assert q.tolist() == [-3, 2, 1, 3]
    assert scale.item() == pytest.approx(1 / 3)
    assert zero_point.item() == 0


def test_symmetric_rounds_half_to_even():
    # 4 bits: qmax = 7, amax = 7 -> scale = 1 exactly; 2.5 -> 2, -0.5 -> 0, 3.5 -> 4 (half to even,
    # like ONNX QuantizeLinear; half away from zero would give 3, -1, 4).
    q, scale, _ = quantize_tensor(torch.tensor([7.0, 2.5, -0.5, 3.5]), 4, per_channel=False)
    assert scale.item() == 1.0
    assert q.tolist() == [7, 2, 0, 4]


def test_asymmetric_qparams_match_hand_computed_case():
    # 2 bits asymmetric on [-1, 0, 2]: lo = -1, hi = 2, scale = 3 / (2^2 - 1) = 1,
    # zero point = round(1 / 1) = 1, q = round(w) + 1 = [0, 1, 3].
    q, scale, zero_point = quantize_tensor(torch.tensor([-1.0, 0.0, 2.0]), 2, symmetric=False, per_channel=False)
    assert (scale.item(), zero_point.item()) == (1.0, 1)
    assert q.tolist() == [0, 1, 3]


def test_asymmetric_range_always_includes_zero():
    # all positive [1, 3] at 2 bits: lo = min(1, 0) = 0, hi = 3, scale = 1, zero point 0, q = [1, 3].
    q, scale, zero_point = quantize_tensor(torch.tensor([1.0, 3.0]), 2, symmetric=False, per_channel=False)
    assert (scale.item(), zero_point.item()) == (1.0, 0)
    assert q.tolist() == [1, 3]


def test_per_channel_uses_one_scale_per_row():
    # 2 bits symmetric: qmax = 1. Row 0: amax 0.4 -> scale 0.4, [0.5 -> 0, -1]; row 1: amax 3 ->
    # scale 3, [1, 1/3 -> 0].
    w = torch.tensor([[0.2, -0.4], [3.0, 1.0]])
    q, scale, zero_point = quantize_tensor(w, 2)
    assert scale.tolist() == pytest.approx([0.4, 3.0])
    assert zero_point.tolist() == [0, 0]
    assert q.tolist() == [[0, -1], [1, 0]]


def test_per_channel_along_axis_one_scales_columns():
    # columns of [[1, 4], [-2, 2]] at 3 bits: amax 2 and 4 -> scales 2/3 and 4/3.
    w = torch.tensor([[1.0, 4.0], [-2.0, 2.0]])
    q, scale, _ = quantize_tensor(w, 3, axis=1)
    assert scale.tolist() == pytest.approx([2 / 3, 4 / 3])
    assert q.tolist() == [[2, 3], [-3, 2]]  # 1.5 -> 2, 1.5 -> 2
    assert torch.allclose(dequantize(q, scale, torch.zeros(2, dtype=torch.int32), axis=1),
                          torch.tensor([[4 / 3, 4.0], [-2.0, 8 / 3]]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_channel_gets_unit_scale_and_dequantizes_to_zero(symmetric):
    w = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    q, scale, zero_point = quantize_tensor(w, 8, symmetric=symmetric)
    assert scale[0].item() == 1.0 and zero_point[0].item() == 0 and q[0].tolist() == [0, 0]
    out = fake_quantize(w, 8, symmetric=symmetric)
    assert not out.isnan().any()
    assert out[0].tolist() == [0.0, 0.0]
    assert fake_quantize(torch.zeros(3, 2), 4, per_channel=False, symmetric=symmetric).eq(0).all()


def test_qrange_is_restricted_symmetric_and_full_asymmetric():
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(2, True) == (-1, 1)
    assert qrange(16, True) == (-32767, 32767)


def test_fake_quantize_keeps_dtype_and_16_bits_is_nearly_lossless():
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = fake_quantize(w, 16)
    assert out.dtype == torch.float64
    step = w.abs().amax(dim=1, keepdim=True) / 32767
    assert ((out - w).abs() <= step / 2 + 1e-7).all()


def test_non_finite_weights_raise_hero_error():
    with pytest.raises(HeroError, match="NaN"):
        quantize_tensor(torch.tensor([1.0, float("nan")]), 8)


# ---- agreement with torch's fake quantization -----------------------------------------------

def _assert_same_grid_up_to_ties(w, axis, ours, theirs, scale, zero_point):
    """Our codes (round(w / scale), ONNX QuantizeLinear) equal torch's fake quantization's, read back
    as codes, except where w / scale lies within float rounding of a half-integer: torch's CPU kernel
    multiplies by 1 / scale, which may land on the other side of the tie, one step away. Elsewhere
    the two grids agree by construction."""
    shape = [1] * w.dim()
    if scale.dim():
        shape[axis] = -1
    s, z = scale.reshape(shape), zero_point.reshape(shape)
    q_ours, q_theirs = torch.round(ours / s) + z, torch.round(theirs / s) + z
    differ = q_ours != q_theirs
    ratio = w.double() / s.double()
    near_tie = (ratio - ratio.floor() - 0.5).abs() <= 4 * torch.finfo(torch.float32).eps * ratio.abs().clamp(min=1)
    assert ((q_ours - q_theirs).abs()[differ] == 1).all() and near_tie[differ].all()
    torch.testing.assert_close(ours[~differ], theirs[~differ], rtol=0, atol=0)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch_fake_quantize(bits, symmetric):
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(bits)) + (0 if symmetric else 0.3)
    _, scale, zero_point = quantize_tensor(w, bits, symmetric=symmetric, per_channel=False)
    qmin, qmax = qrange(bits, symmetric)
    expected = torch.fake_quantize_per_tensor_affine(w, scale.item(), zero_point.item(), qmin, qmax)
    ours = fake_quantize(w, bits, symmetric=symmetric, per_channel=False)
    _assert_same_grid_up_to_ties(w, 0, ours, expected, scale, zero_point)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_torch_fake_quantize(bits, symmetric, axis):
    w = torch.randn(8, 5, 3, 3, generator=torch.Generator().manual_seed(10 + bits)) - (0 if symmetric else 0.4)
    _, scale, zero_point = quantize_tensor(w, bits, symmetric=symmetric, axis=axis)
    assert scale.shape == zero_point.shape == (w.shape[axis],)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    qmin, qmax = qrange(bits, symmetric)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero_point, axis, qmin, qmax)
    ours = fake_quantize(w, bits, symmetric=symmetric, axis=axis)
    _assert_same_grid_up_to_ties(w, axis, ours, expected, scale, zero_point)


def test_the_tie_rule_is_not_vacuous():
    """A value exactly half a step from two codes rounds half to even in ours (ONNX QuantizeLinear);
    an off-grid value one step away is caught by the comparison above."""
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, 127.0])
    q, scale, _ = quantize_tensor(w, 8, per_channel=False)
    assert float(scale) == 1.0 and q.tolist() == [0, 2, 2, 0, 127]
    shifted = fake_quantize(w, 8, per_channel=False) + torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(AssertionError):
        _assert_same_grid_up_to_ties(w, 0, fake_quantize(w, 8, per_channel=False), shifted, scale,
                                     torch.zeros((), dtype=torch.int32))


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 9, 32, 0, -8, True, 4.0, "8", None])
def test_unsupported_bits_raise_hero_error(bits):
    with pytest.raises(HeroError, match="bit width"):
        check_bits(bits)


def test_supported_bits_pass():
    assert [check_bits(b) for b in (2, 3, 4, 5, 6, 7, 8, 16)] == [2, 3, 4, 5, 6, 7, 8, 16]


@pytest.mark.parametrize("fields", [
    {"bits": 9}, {"bits": 4.0}, {"act_bits": 4}, {"act_bits": True}, {"act_method": "entropy"},
    {"act_percentile": 0}, {"act_percentile": 101}, {"symmetric": "yes"}, {"per_channel": 1},
    {"bn": None}, {"bn": "fold"}, {"grid": "fine"}, {"bits": True}, {"bits": 16, "grid": "nested"},
    {"bits": 4, "symmetric": False, "grid": "nested"}, {"bits": 4, "symmetric": False, "bn": "quantize-first"},
    {"layer_bits": {"conv": 1}}, {"layer_bits": {}}, {"bits": 4, "layer_bits": {"a": 8}},
])
def test_invalid_quant_spec_raises_hero_error(fields):
    with pytest.raises(HeroError):
        QuantSpec(**fields)


@pytest.mark.parametrize("text, expected", [
    ("4,8", (4, 8)),
    ("2-8", (2, 3, 4, 5, 6, 7, 8)),
    ("16", (16,)),
    (" 8 , 2-4 ", (8, 2, 3, 4)),  # order as written, spaces ignored
    ("5-5", (5,)),
])
def test_parse_bits_reads_lists_and_ranges(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text, message", [
    ("8-2", "reversed"),
    ("4,4", "twice"),
    ("2-4,3", "twice"),
    ("abc", "list like 4,8"),
    ("", "list like 4,8"),
    ("4,,8", "list like 4,8"),
    ("4-", "list like 4,8"),
    ("-2", "list like 4,8"),
    ("2-8-3", "list like 4,8"),
    ("9", "unsupported bit width 9"),
    ("8-16", "unsupported bit width 9"),  # a range covers every width in it
    ("1-4", "unsupported bit width 1"),
])
def test_parse_bits_refuses_bad_text(text, message):
    with pytest.raises(HeroError, match=message):
        parse_bits(text)


def test_parse_bits_names_the_option_it_parses():
    with pytest.raises(HeroError, match="--sweep-bits"):
        parse_bits("8-4", option="--sweep-bits")
    with pytest.raises(HeroError, match="--sweep-bits"):
        parse_bits("four", option="--sweep-bits")


@pytest.mark.parametrize("spec", [
    QuantSpec(),
    QuantSpec(bits=4, symmetric=False, per_channel=False, bn="keep"),
    QuantSpec(bits=8, act_bits=8, act_layout="tensorrt", act_method="percentile", act_percentile=99.5),
    QuantSpec(bits=16),
    QuantSpec(bits=4, per_channel=False, bn="quantize-first", grid="nested"),
    QuantSpec(layer_bits={"conv": 4, "fc": 8}),
], ids=["float", "w4-asym-per-tensor", "w8a8-percentile", "w16", "w4-qf-nested", "mixed"])
def test_quant_spec_round_trips_through_json_dict(spec):
    fields = json.loads(json.dumps(spec.to_dict()))
    assert QuantSpec.from_dict(fields) == spec


@pytest.mark.parametrize("change", [
    lambda d: {**d, "scheme": "symmetric"},
    lambda d: {k: v for k, v in d.items() if k != "bn"},
    lambda d: {},
    lambda d: list(d.items()),
], ids=["unknown-field", "missing-field", "empty", "not-a-dict"])
def test_quant_spec_from_dict_refuses_other_field_sets(change):
    with pytest.raises(HeroError, match="fields"):
        QuantSpec.from_dict(change(QuantSpec(bits=4).to_dict()))


def test_quant_spec_from_dict_checks_values_like_the_constructor():
    with pytest.raises(HeroError, match="bit width"):
        QuantSpec.from_dict({**QuantSpec().to_dict(), "bits": 9})


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_calibration_refuses_scales_that_are_not_positive_finite_numbers(scale):
    with pytest.raises(HeroError, match="positive and finite"):
        Calibration({"conv1": 0.5, "conv2": scale})


def test_calibration_keeps_valid_scales_as_floats():
    calibration = Calibration({"conv1": 1, "fc": 0.25})
    assert calibration.scales == {"conv1": 1.0, "fc": 0.25}
    assert all(type(v) is float for v in calibration.scales.values())


def test_check_calibration_pairs_act_bits_with_a_calibration():
    calibration = Calibration({"conv1": 0.1})
    check_calibration(QuantSpec(bits=4), None)
    check_calibration(QuantSpec(bits=4, act_bits=8, act_layout="tensorrt"), calibration)
    with pytest.raises(HeroError, match="act_bits=8 needs a Calibration"):
        check_calibration(QuantSpec(bits=4, act_bits=8, act_layout="tensorrt"), None)
    with pytest.raises(HeroError, match="act_bits=8 needs a Calibration"):
        check_calibration(QuantSpec(bits=4), calibration)
    with pytest.raises(HeroError, match="must be a Calibration"):
        check_calibration(QuantSpec(bits=4, act_bits=8, act_layout="tensorrt"), {"conv1": 0.1})


# ---- BatchNorm folding ---------------------------------------------------------------------

class ConvBnNet(nn.Module):
    """conv -> bn -> relu, twice, then linear -> bn1d; attributes, not a Sequential."""

    def __init__(self, conv_bias):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5, bias=conv_bias)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block with a projection shortcut."""

    def __init__(self, cin=3, cout=4, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _with_running_stats(model, seed=0):
    """Give every BN non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.num_features, generator=generator) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=generator)
            m.momentum = 0.5
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=generator) * 2 + 1)
    return model.eval()


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("model", [ConvBnNet(conv_bias=True), ConvBnNet(conv_bias=False), BasicBlock()],
                         ids=["conv-bias", "no-bias", "residual-block"])
def test_fold_bn_preserves_eval_outputs(model):
    model = _with_running_stats(model).double()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    folded = fold_bn(model)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)
    assert not _batchnorms(folded) and not folded.training
    assert all(folded.get_submodule(n).bias is not None for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert _batchnorms(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fold_bn_in_float32_stays_within_1e_5_of_output_scale():
    model = _with_running_stats(BasicBlock())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = model(x)
    assert (fold_bn(model)(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fold_bn_folds_sequential_and_leaves_leading_bn():
    model = _with_running_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    folded = fold_bn(model)
    assert isinstance(folded[0], nn.BatchNorm2d) and isinstance(folded[2], nn.Identity)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_bn_skips_conv_whose_output_has_other_users():
    model = _with_running_stats(SharedConvOutput())
    folded = fold_bn(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(folded(x), model(x))


class Untraceable(ConvBnNet):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent branch: torch.fx cannot trace it
            return super().forward(x)
        return x


def test_fold_bn_falls_back_to_consecutive_attributes_when_tracing_fails():
    model = _with_running_stats(Untraceable(conv_bias=False))
    with pytest.warns(UserWarning, match="could not trace"):
        folded = fold_bn(model)
    assert not _batchnorms(folded)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


# ---- quantize_model ------------------------------------------------------------------------

W8A8 = QuantSpec(bits=8, act_bits=8, act_layout="tensorrt")


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_model_puts_weights_on_grid_and_keeps_biases(symmetric, per_channel):
    model = _with_running_stats(ConvBnNet(conv_bias=True))
    before = copy.deepcopy(model.state_dict())
    folded = fold_bn(model)
    quantized = quantize_model(model, QuantSpec(bits=3, symmetric=symmetric, per_channel=per_channel))
    for name, layer in _layers(quantized).items():
        reference = _layers(folded)[name]
        _, scale, zero_point = quantize_tensor(reference.weight, 3, symmetric=symmetric, per_channel=per_channel)
        view = [-1] + [1] * (layer.weight.dim() - 1) if per_channel else []
        levels = layer.weight / scale.reshape(view) + zero_point.reshape(view)
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        assert levels.round().unique().numel() <= 2**3
        assert torch.equal(layer.bias, reference.bias)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert _batchnorms(model)


def test_quantize_model_error_grows_as_bits_shrink():
    model = _with_running_stats(BasicBlock())
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    reference = model(x)

    def relative_error(bits):
        return ((quantize_model(model, QuantSpec(bits=bits))(x) - reference).norm() / reference.norm()).item()

    assert relative_error(None) < 1e-5
    assert relative_error(8) < 0.02
    assert relative_error(2) > 5 * relative_error(8)


def test_quantize_model_without_folding_keeps_batchnorm():
    model = _with_running_stats(ConvBnNet(conv_bias=False))
    quantized = quantize_model(model, QuantSpec(bits=8, bn="keep"))
    assert len(_batchnorms(quantized)) == 3 and not quantized.training


@pytest.mark.parametrize("spec", [4, None, {"bits": 4}], ids=["int", "none", "dict"])
def test_quantize_model_refuses_anything_but_a_quant_spec(spec):
    with pytest.raises(HeroError, match="QuantSpec"):
        quantize_model(ConvBnNet(conv_bias=True), spec)


def test_quantize_model_has_no_loose_flags():
    model = ConvBnNet(conv_bias=True)
    with pytest.raises(TypeError, match="symmetric"):
        quantize_model(model, QuantSpec(bits=4), symmetric=False)
    with pytest.raises(TypeError, match="act_scales"):
        quantize_model(model, W8A8, act_scales={"conv1": 0.1, "conv2": 0.1, "fc": 0.1})


def test_quantize_model_needs_a_calibration_exactly_with_act_bits():
    model = _with_running_stats(BasicBlock())
    calibration = calibrate_activations(fold_bn(model), _batches(), W8A8)
    with pytest.raises(HeroError, match="act_bits=8 needs a Calibration"):
        quantize_model(model, W8A8)
    with pytest.raises(HeroError, match="act_bits=8 needs a Calibration"):
        quantize_model(model, QuantSpec(bits=8), calibration)
    with pytest.raises(HeroError, match="must be a Calibration"):
        quantize_model(model, W8A8, dict(calibration.scales))


def test_packed_weight_bytes_matches_hand_count():
    # conv 4*3*3*3 = 108 + linear 10*4 = 40 -> 148 weights; 3 bits -> ceil(444 / 8) = 56.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10))
    assert packed_weight_bytes(model, QuantSpec(bits=3)) == 56
    assert packed_weight_bytes(model, QuantSpec(bits=8)) == 148
    assert packed_weight_bytes(model, QuantSpec()) == 148 * 4
    # mixed: conv at 4 bits (432) + linear at 8 (320) -> 94 bytes
    assert packed_weight_bytes(model, QuantSpec(layer_bits={"0": 4, "3": 8})) == 94


# ---- activation calibration and int8 activations -------------------------------------------

def _batches(n=3, seed=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=generator) * (i + 1) for i in range(n)]


def test_calibrate_max_gives_one_positive_scale_per_layer():
    model = fold_bn(_with_running_stats(BasicBlock()))
    model.train()
    batches = _batches()
    calibration = calibrate_activations(model, batches, W8A8)
    assert isinstance(calibration, Calibration)
    scales = calibration.scales
    # every Conv input, and the Add's residual input (the projection shortcut's output: TensorRT
    # fuses the Add into conv2 and wants the other input quantized)
    assert set(scales) == {"conv1", "conv2", "shortcut.0", "add.residual"}
    assert all(s > 0 for s in scales.values())
    # conv1 and the shortcut conv see the raw input: amax = max |x| over all batches.
    expected = max(b.abs().max().item() for b in batches) / 127
    assert scales["conv1"] == pytest.approx(expected) and scales["shortcut.0"] == pytest.approx(expected)
    assert model.training


def test_calibrate_percentile_comes_from_the_spec_and_is_below_max():
    model = fold_bn(_with_running_stats(BasicBlock()))
    batches = _batches()
    by_max = calibrate_activations(model, batches, W8A8).scales
    spec = QuantSpec(bits=8, act_bits=8, act_layout="tensorrt", act_method="percentile", act_percentile=99.0)
    by_percentile = calibrate_activations(model, batches, spec).scales
    assert all(0 < by_percentile[name] < by_max[name] for name in by_max)
    # conv1 sees the raw input: the mean over batches of each batch's 99th percentile of |x|.
    expected = sum(torch.quantile(b.abs().reshape(-1), 0.99).item() for b in batches) / len(batches) / 127
    assert by_percentile["conv1"] == pytest.approx(expected, rel=1e-5)


def test_calibrate_rejects_no_batches_and_has_no_loose_method():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(HeroError, match="saw no input"):
        calibrate_activations(model, [], W8A8)
    with pytest.raises(HeroError, match="calibration method"):
        QuantSpec(bits=8, act_bits=8, act_layout="tensorrt", act_method="entropy")
    with pytest.raises(TypeError, match="method"):
        calibrate_activations(model, _batches(), W8A8, method="percentile")


def test_act_quantized_model_feeds_layers_inputs_on_int8_grid():
    model = _with_running_stats(BasicBlock())
    calibration = calibrate_activations(fold_bn(model), _batches(), W8A8)
    scales = calibration.scales
    quantized = quantize_model(model, W8A8, calibration)
    assert quantized.act_scales == scales
    seen = {}
    for name, layer in _layers(quantized).items():
        layer.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0]))
    x = _batches(1, seed=9)[0] * 10  # larger than calibration: some inputs saturate
    quantized(x)
    assert set(seen) | {"add.residual"} == set(scales)
    for name, inputs in seen.items():
        levels = inputs / scales[name]
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert levels.abs().max() <= 127 + 1e-3
    reference = fold_bn(model)(_batches(1, seed=9)[0])
    relative = (quantize_model(model, W8A8, calibration)(_batches(1, seed=9)[0]) - reference).norm()
    assert relative / reference.norm() < 0.05


def test_act_scales_must_match_model_layers():
    model = _with_running_stats(BasicBlock())
    scales = calibrate_activations(fold_bn(model), _batches(), W8A8).scales
    missing = Calibration({k: v for k, v in scales.items() if k != "conv2"})
    unknown = Calibration({**scales, "fc": 0.1})
    with pytest.raises(HeroError, match=r"missing: \['conv2'\]"):
        quantize_model(model, W8A8, missing)
    with pytest.raises(HeroError, match=r"unknown: \['fc'\]"):
        checked_act_scales(fold_bn(model), unknown, ["add.residual"])
    assert list(checked_act_scales(fold_bn(model), Calibration(dict(reversed(scales.items()))), ["add.residual"])) == \
        ["conv1", "conv2", "shortcut.0"]  # layer order, whatever order the calibration has


def test_act_quantized_model_survives_deepcopy():
    model = _with_running_stats(BasicBlock())
    calibration = calibrate_activations(fold_bn(model), _batches(), W8A8)
    quantized = quantize_model(model, QuantSpec(bits=4, act_bits=8, act_layout="tensorrt"), calibration)
    x = _batches(1, seed=10)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(copy.deepcopy(quantized)(x), quantized(x), rtol=0, atol=0)
