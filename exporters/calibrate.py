"""Activation calibration: the range of every quantized activation, measured on training batches.

One observer per quantized tensor records what each batch shows, and one rule turns that into a
range (spec.act_method):
- "max": the running min and max over all batches (what ORT's MinMax calibrator does);
- "percentile": per batch the spec.act_percentile-th percentile at the top and its mirror at the
  bottom, averaged over batches (robust to a few outliers);
- "mse": the clipping range that minimises the mean squared quantization error of the observed
  values (`mse_range`; the "MSE" range setting of NNCF and of TensorRT's calibrators' spirit).
The range then gives the quantizer of HERO Theorem 2: symmetric int8 on [-amax, amax] for the
tensorrt layout (`exporters.quantize.symmetric_qparams`), asymmetric uint8 on [min(lo, 0),
max(hi, 0)] for the onnxruntime layout (`asymmetric_qparams`).

Where the tensors are, on the BatchNorm-folded model (what the emulation runs): for the tensorrt
layout the input of every Conv/Linear (forward pre-hooks) and the residual input of every Add that
TensorRT fuses into a convolution (`exporters.act_layout.residual_points`); for the onnxruntime
layout every point of its plan (`exporters.act_layout.plan_points`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from exporters import act_layout
from exporters.device.errors import HeroError
from exporters.quantize import (ACT_BITS, Calibration, QuantSpec, asymmetric_qparams, dequantize, float_copy, qrange,
                                quantize_with_qparams, quantized_layers, symmetric_qparams)

_SAMPLES_PER_BATCH = 1 << 20  # values kept per tensor and batch (torch.quantile refuses more than 2^24)
_MSE_SAMPLES = 1 << 18  # values the MSE search scores each clipping ratio on
_MSE_STEPS = 64  # clipping ratios tried by `mse_range`, evenly over (0, 1]


def mse_range(samples: torch.Tensor, lo: float, hi: float, symmetric: bool, bits: int = ACT_BITS,
              steps: int = _MSE_STEPS) -> tuple[float, float]:
    """The range [a·lo, a·hi], a in {1/steps, 2/steps, ..., 1}, whose `bits`-bit quantizer (Theorem 2,
    symmetric on [-a·max(|lo|, |hi|), +...] or asymmetric) gives `samples` the least mean squared
    error E[(x - Q(x))^2]: clipping a few outliers buys a finer step for all the rest."""
    x = samples.to(torch.float32)
    best, best_error = (lo, hi), float("inf")
    for k in range(1, steps + 1):
        a = k / steps
        if symmetric:
            scale, zero_point = symmetric_qparams(torch.tensor(a * max(abs(lo), abs(hi))), bits)
        else:
            scale, zero_point = asymmetric_qparams(torch.tensor(min(a * lo, 0.0)), torch.tensor(max(a * hi, 0.0)), bits)
        q = quantize_with_qparams(x, scale, zero_point, *qrange(bits, symmetric))
        error = float(((dequantize(q, scale, zero_point) - x) ** 2).mean())
        if error < best_error:
            best, best_error = (a * lo, a * hi), error
    return best


class Observer(nn.Module):
    """Watches one tensor: its min and max per batch, and a fixed-seed sample of its values (for
    percentiles and the MSE search). Returns its input unchanged."""

    def __init__(self, name: str, keep_samples: bool, generator: torch.Generator):
        super().__init__()
        self.name, self.keep_samples, self.generator = name, keep_samples, generator
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.samples: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise HeroError(f"non-finite activations at {self.name} during calibration: check the model and data")
        flat = x.detach().reshape(-1).to(torch.float32)
        self.lo.append(float(flat.min()))
        self.hi.append(float(flat.max()))
        if self.keep_samples:
            if flat.numel() > _SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (_SAMPLES_PER_BATCH,), generator=self.generator).to(flat.device)]
            self.samples.append(flat.cpu())
        return x

    def range(self, method: str, percentile: float, symmetric: bool) -> tuple[float, float]:
        """(lo, hi) by `method` (see the module docstring); symmetric ranges use |x|."""
        if not self.lo:
            raise HeroError(f"{self.name} saw no input during calibration: pass at least one batch and make sure "
                            "every Conv/Linear runs in forward")
        lo, hi = min(self.lo), max(self.hi)
        if method == "max":
            return lo, hi
        if method == "mse":
            samples = torch.cat(self.samples)
            if samples.numel() > _MSE_SAMPLES:
                samples = samples[torch.randint(samples.numel(), (_MSE_SAMPLES,), generator=self.generator)]
            return mse_range(samples, lo, hi, symmetric)
        p = torch.tensor([1 - percentile / 100, percentile / 100])
        per_batch = [torch.quantile(s.abs() if symmetric else s, p) for s in self.samples]
        return (-float(sum(q[1] for q in per_batch)) / len(per_batch) if symmetric
                else float(sum(q[0] for q in per_batch)) / len(per_batch),
                float(sum(q[1] for q in per_batch)) / len(per_batch))


def _run(model: nn.Module, batches: Iterable) -> None:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for m, training in modes.items():
            m.training = training


def calibrate_activations(model: nn.Module, batches: Iterable, spec: QuantSpec) -> Calibration:
    """The Calibration of `model` for `spec`'s activation layout, from running it in eval mode over
    `batches` (tensors, or tuples whose first item is the input): tensorrt, one symmetric int8 scale
    per Conv/Linear input keyed by module name and per residual point; onnxruntime, a uint8 scale and zero point per point
    of the plan. Ranges by spec.act_method (module docstring). Modes are restored afterwards."""
    method, percentile, keep = spec.act_method, spec.act_percentile, spec.act_method != "max"
    generator = torch.Generator().manual_seed(0)
    if spec.integer_activations:
        gm = act_layout.trace(float_copy(model, spec))
        observers = {name: Observer(name, keep, generator) for name in act_layout.plan_points(gm).calibrated}
        act_layout.insert_after(gm, observers)
        _run(gm, batches)
        params = {}
        for name, observer in observers.items():
            lo, hi = observer.range(method, percentile, symmetric=False)
            scale, zero_point = asymmetric_qparams(torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0)), ACT_BITS)
            params[name] = (float(scale), int(zero_point))
        return Calibration({k: s for k, (s, _) in params.items()}, {k: z for k, (_, z) in params.items()})
    module, points = act_layout.residual_plan(float_copy(model, spec))
    layers = quantized_layers(module)
    observers = {name: Observer(name, keep, generator) for name in [*(name for name, _ in layers), *points]}
    for name, layer in layers:
        layer.register_forward_pre_hook(lambda _, args, o=observers[name]: (o(args[0]), *args[1:]))
    act_layout.insert_residual(module, points, {p: observers[p] for p in points})
    _run(module, batches)
    amax = {name: max(abs(v) for v in o.range(method, percentile, symmetric=True)) for name, o in observers.items()}
    return Calibration({name: float(symmetric_qparams(torch.tensor(a), ACT_BITS)[0]) for name, a in amax.items()})
