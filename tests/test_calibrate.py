"""Activation calibration (exporters/calibrate.py): the MSE range search, and that every method gives
every quantized tensor of either layout a range, on training batches."""

import pytest
import torch
from torch import nn

from exporters.calibrate import calibrate_activations, mse_range
from exporters.quantize import QuantSpec, asymmetric_qparams, dequantize, qrange, quantize_with_qparams


def _mse(x, lo, hi):
    scale, zero_point = asymmetric_qparams(torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0)), 8)
    return float(((dequantize(quantize_with_qparams(x, scale, zero_point, *qrange(8, False)), scale, zero_point) - x) ** 2).mean())


def test_mse_range_clips_a_heavy_tail_and_beats_the_full_range():
    """Laplace values: the 8-bit grid over the full range wastes its steps on a few tail values;
    clipping them costs less than the coarser step costs everything else."""
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    lo, hi = float(x.min()), float(x.max())
    clipped = mse_range(x, lo, hi, symmetric=False)
    assert lo < clipped[0] < 0 < clipped[1] < hi
    assert _mse(x, *clipped) < _mse(x, lo, hi)
    assert _mse(x, *clipped) <= min(_mse(x, a * lo, a * hi) for a in (0.25, 0.5, 0.75, 1.0))


def test_mse_range_keeps_the_full_range_of_uniform_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lo, hi = mse_range(x, float(x.min()), float(x.max()), symmetric=True)
    assert hi > 0.9 * float(x.max()) and lo < 0.9 * float(x.min())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


@pytest.mark.parametrize("layout", ["onnxruntime", "tensorrt"])
def test_every_method_calibrates_every_tensor_and_narrower_methods_never_widen_max(layout):
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    scales = {method: calibrate_activations(model, batches, QuantSpec(bits=8, act_bits=8, act_layout=layout,
                                                                      act_method=method)).scales
              for method in ("max", "percentile", "mse")}
    assert set(scales["max"]) == set(scales["percentile"]) == set(scales["mse"]) and scales["max"]
    for method in ("percentile", "mse"):
        assert all(scales[method][k] <= scales["max"][k] * (1 + 1e-6) for k in scales["max"]), method
