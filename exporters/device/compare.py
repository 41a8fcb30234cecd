"""When a runtime's outputs agree with a reference run: hero-deploy's one comparator and its tolerance policy.

Used by the host validator (pipeline.stages.validate_artifact: artifact logits against the PyTorch
emulation), hero debug (pipeline.debug: each layer's output against the emulation's), the device
validator (exporters.device.validate_bundle: top-1 agreement with the float variant), the TensorRT
refit proof (exporters.device.trt_switch: `relative_error`), the benchmarks and the tests.
numpy and the standard library only, so it runs on the device.

The policy:

- Float arithmetic only (float and weight-only graphs): the runtime and PyTorch sum the same products
  in another order, so every element agrees within ``atol``·max(1, max |reference|) (`tolerance`),
  and the logits' top-1 agreement is at least ``min_agreement``.
- Activation quantization (A8): a rounding flip moves an activation a whole step, and deep networks
  carry it on, so the bounds scale with the activation rounding's own effect (`ACT_NOISE_FACTOR`),
  measured against the same weights with float activations: the RMS difference within
  max(`tolerance`, ACT_NOISE_FACTOR·RMS effect) and the disagreement within
  max(1 − min_agreement, ACT_NOISE_FACTOR·flip rate) (`consistent`); per layer, the energy of the
  difference within ACT_NOISE_FACTOR² times that of the layer's quantization error (`layer_consistent`).

Batches are consumed once: `Top1`, `Difference` and `Comparison` keep running counts, maxima and sums
of squares, so a streamed test set is never held whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# A W{n}A8 runtime re-rounds the same activations at slightly different points (another summation
# order, integer requantization): its distance from the emulation is at most about the rounding's
# own size twice over (|r - e| <= |r - f| + |f - e|, f with float activations, |r - f| distributed
# like |e - f|), and it changes a prediction of the emulation at most about twice as often as the
# rounding itself changes one of f.
ACT_NOISE_FACTOR = 2.0


def tolerance(atol: float, reference_max: float) -> float:
    """The largest |other − reference| still consistent in float arithmetic: `atol` relative to the
    reference's largest magnitude, absolute below 1."""
    return atol * max(1.0, reference_max)


@dataclass
class Top1:
    """Running top-1 count: rows whose arg-max is the row's label (accuracy against true labels,
    agreement with another run against its arg-max)."""

    rows: int = 0
    hits: int = 0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        self.rows += len(labels)
        self.hits += int((logits.argmax(1) == labels).sum())

    @property
    def rate(self) -> float:
        return self.hits / self.rows


@dataclass
class Difference:
    """Running elementwise statistics of `other − reference` over batches."""

    elements: int = 0
    max_abs: float = 0.0  # max |other − reference|
    sum_squares: float = 0.0  # Σ (other − reference)², in the inputs' precision per batch
    reference_max: float = 0.0  # max |reference|

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        gap = reference - other
        self.elements += gap.size
        worst, squares = float(np.abs(gap).max()), float((gap**2).sum())
        # a NaN would drop out of max(): a non-finite difference is an infinite one, never consistent
        self.max_abs = max(self.max_abs, worst if math.isfinite(worst) else math.inf)
        self.sum_squares += squares if math.isfinite(squares) else math.inf
        self.reference_max = max(self.reference_max, float(np.abs(reference).max()))

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / self.elements) if self.elements else 0.0


@dataclass
class Comparison:
    """Running comparison of one run's logits (rows × classes) with a reference run's: the
    elementwise `difference` and the top-1 `agreement` with the reference's arg-max."""

    difference: Difference = field(default_factory=Difference)
    agreement: Top1 = field(default_factory=Top1)

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        self.difference.add(reference, other)
        self.agreement.add(other, reference.argmax(1))

    @property
    def rows(self) -> int:
        return self.agreement.rows

    @property
    def disagreement(self) -> float:
        """The fraction of rows whose arg-max differs from the reference's."""
        return (self.agreement.rows - self.agreement.hits) / self.agreement.rows


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    """RMS of got − reference over the RMS of reference (over its absolute RMS floor 1e-12), in float64:
    a scale-free size of a difference, about 1 or more for a wrong result."""
    diff = np.asarray(got, np.float64) - np.asarray(reference, np.float64)
    scale = max(float(np.sqrt(np.mean(np.square(reference, dtype=np.float64)))), 1e-12)
    return float(np.sqrt(np.mean(np.square(diff)))) / scale


def compare(reference: np.ndarray, other: np.ndarray) -> Comparison:
    """The comparison of one batch of logits."""
    out = Comparison()
    out.add(reference, other)
    return out


def consistent(runs: Sequence[Comparison], *, atol: float, min_agreement: float, reference_max: float,
               act_effect: Comparison | None = None) -> bool:
    """Whether every run agrees with the reference (module docstring). `reference_max`: max |reference|
    over every sample compared; `act_effect`: the reference against the same weights with float
    activations (None without activation quantization)."""
    worst_agreement = min(run.agreement.rate for run in runs)
    bound = tolerance(atol, reference_max)
    if act_effect is None:
        return bool(worst_agreement >= min_agreement and max(run.difference.max_abs for run in runs) <= bound)
    rms_bound = max(bound, ACT_NOISE_FACTOR * act_effect.difference.rms)
    disagreement_bound = max(1 - min_agreement, ACT_NOISE_FACTOR * act_effect.disagreement)
    return bool(1 - worst_agreement <= disagreement_bound + 1e-12
                and max(run.difference.rms for run in runs) <= rms_bound)


def layer_consistent(runs: Sequence[Difference], atol: float, quantization_error: Difference | None = None) -> bool:
    """Whether one layer's outputs agree with the reference's (module docstring); with
    `quantization_error` (an A8 layer's reference against its float model), an energy beyond the
    float tolerance is consistent while within ACT_NOISE_FACTOR² times that error's."""
    if max(run.max_abs for run in runs) <= tolerance(atol, max(run.reference_max for run in runs)):
        return True
    return quantization_error is not None and (
        max(run.sum_squares for run in runs) <= ACT_NOISE_FACTOR**2 * quantization_error.sum_squares)
