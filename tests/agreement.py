"""How the tests compare a runtime's logits with the PyTorch emulation, and why each tolerance holds
on any CPU, thread count and ONNX Runtime version.

- Float arithmetic only (float and weight-only graphs): the runtime and PyTorch sum the same
  products in another order. float32 reassociation moves a sum of K terms by at most about
  K * 2^-24 * sum|terms| (Higham, "Accuracy and Stability of Numerical Algorithms", Sec. 3.1): for
  these small models (K <= a few thousand, |logits| <= tens) that is below 1e-5 relative, so
  `FLOAT_RTOL` = 1e-4 of max(1, |reference|) holds with margin, elementwise
  (exporters.device.compare.tolerance).
- Activation quantization (A8): a QuantizeLinear rounds x / s to an integer. Where x / s lies
  within float rounding of a half-integer, a different summation order may round it to the
  neighbouring code: one activation element moves by one step s. Such flips happen (or not)
  depending on the CPU's kernels, so no test may assert either. What holds regardless: the
  activation quantization itself moves *every* activation element by up to half a step, so the
  runtime's distance from the emulation is a small fraction of the emulation's own distance from
  the same model without activation quantization (`assert_matches_act_quantized`), while an export
  that misplaces, misscales or drops the activation quantization lands at or beyond that distance.
  Exactness of the integer math itself is pinned separately, on models whose every intermediate
  value is exactly representable (tests/test_onnx_export.py, "dyadic" models), where any
  summation order gives the same bits.
- Top-1: where the reference's top-2 margin exceeds twice the largest logit error, no error that
  small can change the argmax; the argmax must agree on those samples (`decided`).
"""

from __future__ import annotations

import numpy as np

from exporters.device.compare import tolerance

FLOAT_RTOL = 1e-4
# A flip moves one element by one step; the activation quantization moves every one of the N
# quantized elements of a batch by up to half a step (their effects add up like a random walk,
# about sqrt(N / 12) steps' worth). A handful of flips among hundreds (tiny models) to millions
# (ResNet20) of elements stays a small fraction of that; even where one layer dominates (the head's
# 80 inputs of a 5-image batch) one flip is under 0.4 of the effect and two (odds ~1e-4) about 0.5.
# An export that drops the activation quantization lands at 1.0, a wrong scale beyond it.
ACT_FLIP_FRACTION = 0.5


def _arrays(*xs):
    return [np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float64) for x in xs]


def float_tolerance(reference) -> float:
    (ref,) = _arrays(reference)
    return tolerance(FLOAT_RTOL, float(np.abs(ref).max()))


def decided(reference, error: float) -> np.ndarray:
    """Samples whose top-2 logit margin exceeds 2 * error: an error that small cannot change their argmax."""
    (ref,) = _arrays(reference)
    top2 = np.sort(ref, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > 2 * error


def assert_argmax_agrees_where_decided(got, reference) -> None:
    got, ref = _arrays(got, reference)
    error = float(np.abs(got - ref).max())
    sure = decided(ref, error)
    np.testing.assert_array_equal(got.argmax(1)[sure], ref.argmax(1)[sure])


def assert_float_close(got, reference) -> None:
    """Elementwise within FLOAT_RTOL of max(1, |reference|), and the same argmax where decided."""
    got, ref = _arrays(got, reference)
    np.testing.assert_allclose(got, ref, rtol=0, atol=float_tolerance(ref))
    assert_argmax_agrees_where_decided(got, ref)


def assert_matches_act_quantized(got, emulation, without_act_quant) -> None:
    """`got` (a runtime's logits of an A8 graph) is close to `emulation` (quantize_model with the
    calibration) compared with how far the activation quantization moves the logits at all
    (`without_act_quant`: the same weights, float activations): the Frobenius distance to the
    emulation is at most ACT_FLIP_FRACTION of the emulation's distance to `without_act_quant`, or
    within the float tolerance. The argmax agrees wherever decided."""
    got, emu, plain = _arrays(got, emulation, without_act_quant)
    effect = float(np.linalg.norm(emu - plain))
    assert effect > float_tolerance(emu), "the activation quantization must move the logits beyond float noise for this check to mean anything"
    distance = float(np.linalg.norm(got - emu))
    assert distance <= max(ACT_FLIP_FRACTION * effect, float_tolerance(emu)), (
        f"runtime is {distance:.3g} from the A8 emulation, the activation quantization's own effect is {effect:.3g}")
    assert_argmax_agrees_where_decided(got, emu)
