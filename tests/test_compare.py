"""exporters/device/compare.py: the comparator's running statistics and its tolerance policy."""

import math

import numpy as np
import pytest

from exporters.device.compare import (ACT_NOISE_FACTOR, Comparison, Difference, Top1, compare, consistent,
                                      layer_consistent, relative_error, tolerance)


def _logits(rows=40, classes=10, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=(rows, classes)) * scale).astype(np.float32)


def _flip_top(logits: np.ndarray, rows: int) -> np.ndarray:
    """A copy whose first `rows` rows predict another class (their smallest logit raised above the rest)."""
    out = logits.copy()
    for i in range(rows):
        out[i, out[i].argmin()] = out[i].max() + 1.0
    return out


def test_streamed_batches_give_the_statistics_of_the_whole_set():
    reference, other = _logits(seed=0), _logits(seed=1)
    streamed = Comparison()
    for start in range(0, len(reference), 7):
        streamed.add(reference[start : start + 7], other[start : start + 7])
    gap = reference.astype(np.float64) - other
    assert streamed.rows == len(reference) and streamed.difference.elements == reference.size
    assert streamed.difference.max_abs == pytest.approx(np.abs(gap).max())
    assert streamed.difference.rms == pytest.approx(math.sqrt((gap**2).mean()), rel=1e-5)
    assert streamed.difference.reference_max == pytest.approx(np.abs(reference).max())
    assert streamed.agreement.rate == pytest.approx(np.mean(reference.argmax(1) == other.argmax(1)))
    assert streamed.disagreement == pytest.approx(1 - streamed.agreement.rate)
    assert compare(reference, other).difference.max_abs == streamed.difference.max_abs


def test_top1_counts_rows_whose_argmax_is_the_label():
    top = Top1()
    top.add(np.eye(4), np.array([0, 1, 0, 3]))
    top.add(np.eye(2), np.array([1, 1]))
    assert (top.rows, top.hits, top.rate) == (6, 4, 4 / 6)


def test_relative_error_and_agreement():
    reference = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert relative_error(reference, reference) == 0
    assert relative_error(-reference, reference) == pytest.approx(2.0)
    assert compare(reference[:, ::-1], reference).agreement.rate == 0.0
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert relative_error(reference, reference) == 0
    assert relative_error(2 * reference, reference) == pytest.approx(1.0)
    assert compare(reference, reference[::-1]).agreement.rate == 0


def test_an_empty_difference_has_zero_rms():
    assert Difference().rms == 0.0


def test_the_float_tolerance_is_relative_above_one_and_absolute_below():
    assert tolerance(1e-3, 0.25) == 1e-3
    assert tolerance(1e-3, 20.0) == pytest.approx(0.02)


def test_float_runs_are_consistent_within_the_tolerance_and_full_agreement():
    reference = _logits(scale=10.0).astype(np.float64)
    bound = tolerance(1e-3, float(np.abs(reference).max()))
    for shift, expected in ((0.9 * bound, True), (1.1 * bound, False)):
        run = compare(reference, reference + shift)
        assert consistent([run], atol=1e-3, min_agreement=1.0, reference_max=run.difference.reference_max) is expected
    # the worst of several runs decides
    runs = [compare(reference, reference), compare(reference, reference + 1.1 * bound)]
    assert not consistent(runs, atol=1e-3, min_agreement=1.0, reference_max=float(np.abs(reference).max()))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_output_is_an_infinite_difference_never_consistent(bad):
    reference = _logits(scale=10.0).astype(np.float64)
    other = reference.copy()
    other[1, 2] = bad
    run = compare(reference, other)
    assert run.difference.max_abs == math.inf and run.difference.rms == math.inf
    assert not consistent([run], atol=1e-3, min_agreement=0.0, reference_max=run.difference.reference_max)


def test_a_run_below_min_agreement_is_inconsistent():
    reference = _logits(rows=20)
    run = compare(reference, _flip_top(reference, 2))  # 90% agreement, logits far apart but atol huge
    assert run.agreement.rate == pytest.approx(0.9)
    assert consistent([run], atol=10.0, min_agreement=0.9, reference_max=1.0)
    assert not consistent([run], atol=10.0, min_agreement=0.95, reference_max=1.0)


def test_a8_bounds_scale_with_the_activation_roundings_own_effect():
    reference = _logits(rows=20).astype(np.float64)
    reference[np.arange(20), np.arange(20) % 10] += 5.0  # margins no noise below can close
    noise = np.random.default_rng(3).normal(size=reference.shape) * 0.01
    effect = compare(reference, reference + noise)  # the rounding's effect, far beyond atol
    for factor, expected in ((0.95, True), (1.05, False)):
        run = compare(reference, reference + factor * ACT_NOISE_FACTOR * noise)
        assert run.agreement.rate == 1.0
        assert consistent([run], atol=1e-6, min_agreement=0.999, reference_max=1.0, act_effect=effect) is expected
    # disagreement: within ACT_NOISE_FACTOR times the rounding's own flip rate (here 1 of 20 rows)
    flips = compare(reference, _flip_top(reference, 1))
    for rows, expected in ((2, True), (3, False)):
        run = compare(reference, _flip_top(reference, rows))
        act = Comparison(run.difference, flips.agreement)  # the run's own RMS, so only agreement decides
        assert consistent([run], atol=1e-6, min_agreement=0.999, reference_max=1.0, act_effect=act) is expected


def test_a_layer_is_consistent_within_the_tolerance_or_for_a8_within_its_quantization_error():
    reference = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    close, far = Difference(), Difference()
    close.add(reference, reference + 1e-4)
    far.add(reference, reference + 0.1)
    assert layer_consistent([close, close], atol=1e-3)
    assert not layer_consistent([close, far], atol=1e-3)
    small, large = Difference(), Difference()  # the emulation against the float model
    small.add(reference, reference + 0.049)
    large.add(reference, reference + 0.051)
    assert not layer_consistent([close, far], 1e-3, small)  # 0.1 > 2 x 0.049
    assert layer_consistent([close, far], 1e-3, large)  # 0.1 <= 2 x 0.051


def test_the_validator_refuses_non_finite_runtime_logits_in_one_line():
    from exporters.device.errors import HeroError
    from pipeline.stages import _finite

    class Runner:
        path = "w8a8.onnx"

    good = np.zeros((4, 3), np.float32)
    assert _finite(good, Runner(), 0) is good
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(HeroError, match=r"w8a8.onnx computes non-finite logits on test samples 8..11") as err:
        _finite(bad, Runner(), 8)
    assert "\n" not in str(err.value)
