"""The onnxruntime activation layout (exporters/act_layout.py): where it quantizes, that every weight
op of every A8 variant runs on ONNX Runtime's integer kernels, and the three-way check (emulation,
ORT with optimisations off, ORT optimised) for every weight scheme the project has combined with A8.

Exactness of the integer math is pinned on dyadic models (tests/test_onnx_export.py). Here the
models are real (ResNet20, MobileNetV2, the own-model nets), where a rounding flip at one activation
is carried on by the layers after it; the agreement asserted is the validator's rule for A8
(exporters.device.compare.ACT_NOISE_FACTOR): within twice the activation rounding's own effect."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from exporters.act_layout import plan_points, trace
from exporters.device.compare import ACT_NOISE_FACTOR
from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.kernels import integer_lint, kernel_summary
from exporters.onnx import ExportOptions, export_onnx
from exporters.calibrate import calibrate_activations
from exporters.quantize import QuantSpec, fold_bn, quantize_model, quantized_layers
from hero_train.models import build_model
from conftest import with_batchnorm_statistics
from own_models import depthwise_cnn, tiny_attention


def _realistic(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics (as after training) so folding and zero points matter."""
    return with_batchnorm_statistics(model, mean=0.3)


MODELS = {
    "resnet20": (lambda: build_model("resnet20", num_classes=10, in_channels=1), (1, 28, 28)),
    "mobilenetv2": (lambda: build_model("mobilenetv2", num_classes=10, in_channels=3), (3, 16, 16)),
    "depthwise_cnn": (lambda: depthwise_cnn(num_classes=5, in_channels=3, width=8), (3, 16, 16)),
    "tiny_attention": (lambda: tiny_attention(num_classes=5, in_channels=3, dim=16), (3, 16, 16)),
}


@pytest.fixture(scope="module")
def built():
    out = {}
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(1)
        model = _realistic(make())
        x = torch.randn(12, *shape, generator=torch.Generator().manual_seed(2))
        out[name] = (model, shape, x)
    return out


def _mixed(model: nn.Module) -> QuantSpec:
    """Mixed precision: widths 8, 4 and 3 in turn over the layers."""
    layers = [name for name, _ in quantized_layers(model)]
    return QuantSpec(bits=8, layer_bits={name: (8, 4, 3)[i % 3] for i, name in enumerate(layers)}, act_bits=8)


SCHEMES = {
    "w8a8": lambda m: QuantSpec(bits=8, act_bits=8),
    "w4a8-per-tensor-quantize-first": lambda m: QuantSpec(bits=4, per_channel=False, bn="quantize-first", act_bits=8),
    "w4a8-asymmetric": lambda m: QuantSpec(bits=4, symmetric=False, act_bits=8, act_method="percentile"),
    "w3a8-nested": lambda m: QuantSpec(bits=3, grid="nested", act_bits=8),
    "mixed-a8": _mixed,
}


def _rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_weight_op_of_an_a8_variant_runs_integer_and_agrees_three_ways(built, tmp_path, name, scheme):
    model, shape, x = built[name]
    spec = SCHEMES[scheme](model)
    calibration = calibrate_activations(model, [x], spec)
    # int4 storage where a width allows it: the exporter must still give ORT int8 weights to fuse
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(), calibration, input_shape=shape)
    summary = kernel_summary(path)
    layers = len(quantized_layers(model))
    assert summary["unfused"] == [] and summary["float_weight_ops"] == 0, summary["ops"]
    # attention's q.k^T between two quantized activations may run integer as well
    assert summary["integer_ops"] >= layers and integer_lint(spec, summary) == []
    emulation = quantize_model(model, spec, calibration)(x).detach().numpy()
    float_acts = quantize_model(model, dataclasses.replace(spec, act_bits=None))(x).detach().numpy()
    effect = _rms(emulation, float_acts)
    assert effect > 0
    for optimization in ("default", "disabled"):
        got = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization).predict(x.numpy())
        assert _rms(got, emulation) <= ACT_NOISE_FACTOR * effect, (optimization, _rms(got, emulation), effect)


def test_resnet_block_points_are_the_fusable_tensors(built):
    """In a ResNet20 every Conv output is quantized after its ReLU where it has one, the residual add
    after the block's ReLU, the pooled features once more after Flatten (same parameters), and the
    logits stay float."""
    model, shape, x = built["resnet20"]
    gm = trace(fold_bn(model))
    plan = plan_points(gm)
    kinds = {n.name: n for n in gm.graph.nodes}
    calibrated = plan.calibrated
    assert calibrated[0] == "x"  # the network input
    assert sum(kinds[p].op == "call_function" and "add" in p for p in calibrated) == 0  # adds are quantized after ReLU
    relus = [p for p in calibrated if kinds[p].op == "call_module" and "relu" in p]
    assert len(relus) == 9  # one per BasicBlock: relu(residual + shortcut)
    passes = {p: src for p, src in plan.points.items() if src is not None}
    assert list(passes) == ["flatten"] and passes["flatten"] == "pool"
    assert not any(n.op == "output" or n.name == "classifier" for n in (kinds[p] for p in plan.points))
    calibration = calibrate_activations(model, [x], QuantSpec(bits=8, act_bits=8))
    assert all(calibration.zero_points[p] == 0 for p in relus)  # after a ReLU the range starts at 0


def test_a_convolution_whose_output_feeds_two_ops_is_quantized_before_its_relu():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head(torch.flatten(torch.relu(y) + y.mean(), 1)[:, :4])

    plan = plan_points(trace(Fork().eval()))
    assert "conv" in plan.calibrated  # where the ReLU is not the only consumer, the Q comes before it


def test_a_model_fx_cannot_trace_is_refused_for_the_integer_layout_only():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))  # data-dependent control flow

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(HeroError, match="act_layout tensorrt"), pytest.warns(UserWarning, match="could not trace"):
        calibrate_activations(Branchy().eval(), [x], QuantSpec(bits=8, act_bits=8))  # fold_bn falls back, then refused
    assert calibrate_activations(Branchy().eval(), [x], QuantSpec(bits=8, act_bits=8, act_layout="tensorrt")).scales


def test_a_w4a8_variant_for_integer_kernels_stores_int8_codes():
    """ORT's QLinearConv fuses int8 weights only: the run stores a W4A8 variant's 4-bit codes as int8
    where it is laid out for ORT's integer kernels, and as INT4 where it is not."""
    from pipeline.config import ExportSection
    from pipeline.stages import export_options

    section = ExportSection(int4_storage=True)
    assert not export_options(section, QuantSpec(bits=4, act_bits=8), {}).int4_storage
    assert export_options(section, QuantSpec(bits=4, act_bits=8, act_layout="tensorrt"), {}).int4_storage
    assert export_options(section, QuantSpec(bits=4), {}).int4_storage


def test_the_validator_bounds_an_a8_variant_by_its_rounding_and_catches_a_broken_one(trained, tmp_path):
    """A W8A8 ResNet20 on its integer kernels is consistent under the default validate section (a
    max-logit rule of 1e-3 would not survive a carried-on flip on every machine); the same artifact
    with its classifier's weight scale times 1e6 is not, whatever the kernels."""
    import onnx
    from onnx import numpy_helper

    from hero_train.checkpoint import DataRef, load_deployable
    from pipeline import stages
    from pipeline.config import RuntimeSection, ValidateSection

    loaded = load_deployable(trained["checkpoint"], data=DataRef(root=trained["data"]))
    spec = QuantSpec(bits=8, act_bits=8)
    calibration = stages.calibrate_stage(loaded, spec, 1)
    path = export_onnx(loaded.model, tmp_path / "w8a8.onnx", spec, ExportOptions(), calibration, input_shape=(1, 28, 28))
    x, y = stages.load_split(loaded, "test", None)
    v, rt = ValidateSection(batch_size=16, latency_repeats=1), RuntimeSection()
    artifact = stages.Artifact(stages.Variant("w8a8", spec), path, "0" * 64, 0, 0)
    row = stages.validate_artifact(loaded, artifact, calibration, stages.in_memory_batches(x, y, 16), v, rt)
    assert row["consistent"] and row["act_noise_rms"] > 0
    assert row["rms_logit_diff"] <= ACT_NOISE_FACTOR * row["act_noise_rms"] + v.logit_atol
    proto = onnx.load(path)
    (head,) = [t for t in proto.graph.initializer if t.name == "classifier.weight_scale"]
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1e6), head.name))
    onnx.save(proto, tmp_path / "broken.onnx")
    broken = stages.Artifact(stages.Variant("w8a8", spec), tmp_path / "broken.onnx", "0" * 64, 0, 0)
    assert not stages.validate_artifact(loaded, broken, calibration, stages.in_memory_batches(x, y, 16), v, rt)["consistent"]
