import numpy as np
import pytest

from exporters.device.bits import check_bits
from exporters.device.errors import HeroError
from exporters.device.nested_grid import (
    canonical_quantize,
    nested_clip_fraction,
    nested_grid_codes,
    nested_grid_error,
    scale8,
    symmetric_codes,
    symmetric_scale,
)

# amax = 1, so s8 = 1/127 and the 4-bit nested step is 16/127.
HAND_WEIGHTS = np.array([1.0, -0.5, 0.06, 0.9])


def test_four_bit_codes_match_hand_computed_case():
    # w / (16/127) = [7.94, -3.97, 0.48, 7.14] -> round/clamp to [7, -4, 0, 7] -> times 16
    codes, s8 = nested_grid_codes(HAND_WEIGHTS, bits=4, axis=None)
    assert codes.dtype == np.int8
    assert codes.tolist() == [112, -64, 0, 112]
    assert s8 == pytest.approx(1 / 127)


def _nearest_level_codes(w, bits, axis):
    """Brute force, independent of nested_grid_codes' round-and-clamp: the 8-bit code of the
    nearest of the 2^bits - 1 nested levels k * 2^(8-bits) * s8, s8 = float32(amax / 127)."""
    m, qmax = 2 ** (8 - bits), 2 ** (bits - 1) - 1
    ks = np.arange(-qmax, qmax + 1)
    channels_first = w.reshape(1, *w.shape) if axis is None else np.moveaxis(w, axis, 0)
    rows = channels_first.reshape(len(channels_first), -1)
    s8 = (np.abs(rows).max(1) / 127).astype(np.float32).astype(np.float64)
    levels = ks[None, :] * m * s8[:, None]  # (channels, levels)
    codes = (ks[np.abs(rows[:, :, None] - levels[:, None, :]).argmin(-1)] * m).reshape(channels_first.shape)
    return codes[0] if axis is None else np.moveaxis(codes, 0, axis)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [0, 1, None])
def test_codes_are_the_nearest_nested_level_found_by_brute_force(bits, axis):
    w = np.random.default_rng(bits).normal(size=(6, 5, 3, 3)) * np.linspace(0.5, 3, 6)[:, None, None, None]
    codes, _ = nested_grid_codes(w, bits, axis=axis)
    np.testing.assert_array_equal(codes.astype(int), _nearest_level_codes(w, bits, axis))


def test_nested_levels_are_eight_bit_levels_and_each_width_contains_the_narrower():
    # a dense ramp over [-amax, amax] reaches every level of every grid; the levels actually
    # produced (codes * s8 in float32, what a DequantizeLinear with scale s8 computes) must be
    # 8-bit grid values, 2^n - 1 of them, and the n-bit levels a subset of the (n+1)-bit ones
    ramp = np.linspace(-1.0, 1.0, 20001)
    eight_bit_values = set((np.arange(-127, 128) * scale8(ramp, axis=None)).astype(np.float32).tolist())
    previous = None
    for bits in range(2, 9):
        codes, s8 = nested_grid_codes(ramp, bits, axis=None)
        values = set((codes.astype(np.float32) * s8).tolist())
        assert len(values) == 2**bits - 1
        assert values <= eight_bit_values
        if previous is not None:
            assert previous < values
        previous = values
    assert values == eight_bit_values


@pytest.mark.parametrize("bits", range(2, 9))
def test_nested_error_stays_within_half_a_step_or_the_clipped_margin(bits):
    # module docstring: step s_n = 2^(8-n) s8, grid ends at nested_clip_fraction(n) * amax, so
    # |w - w_hat| <= max(s_n / 2, (1 - clip) * amax) per channel, with equality at w = amax
    # (up to s8 being float32: levels move by at most 2^-24 amax)
    rng = np.random.default_rng(10 + bits)
    w = rng.standard_t(df=3, size=(8, 4, 3, 3)) * rng.uniform(0.1, 5, size=(8, 1, 1, 1))
    codes, s8 = nested_grid_codes(w, bits, axis=0)
    error = np.abs(w - codes.astype(np.float64) * s8.astype(np.float64)[:, None, None, None]).reshape(8, -1)
    amax = np.abs(w).reshape(8, -1).max(1)
    float32_slack = 2.0**-23 * amax
    clipped_margin = (1 - nested_clip_fraction(bits)) * amax
    bound = np.maximum(2 ** (8 - bits) * amax / 127 / 2, clipped_margin)
    assert (error.max(1) <= bound + float32_slack).all()
    at_amax = error[np.arange(8), np.abs(w).reshape(8, -1).argmax(1)]
    assert (np.abs(at_amax - clipped_margin) <= float32_slack).all()


def test_every_bit_width_shares_the_same_dq_scale():
    w = np.random.default_rng(1).normal(size=(4, 6))
    scales = [nested_grid_codes(w, bits)[1] for bits in (2, 4, 6, 8)]
    for s in scales[1:]:
        np.testing.assert_array_equal(s, scales[0])


def test_eight_bit_nested_grid_is_the_canonical_eight_bit_quantizer():
    w = np.random.default_rng(2).normal(size=(5, 7))
    codes, s8 = nested_grid_codes(w, 8)
    np.testing.assert_allclose(codes * s8[:, None].astype(np.float64), canonical_quantize(w, 8), rtol=1e-6)


def test_per_channel_scale_follows_each_output_channel():
    base = np.random.default_rng(3).uniform(-1, 1, size=(1, 4, 3, 3))
    w = np.concatenate([base, 10 * base], axis=0)
    codes, s8 = nested_grid_codes(w, 4, axis=0)
    assert s8.shape == (2,)
    assert s8[1] == pytest.approx(10 * s8[0], rel=1e-6)
    np.testing.assert_array_equal(codes[0], codes[1])


def test_all_zero_channel_gets_positive_scale_and_zero_codes():
    w = np.zeros((2, 3))
    w[1] = [0.5, -1.0, 0.25]
    codes, s8 = nested_grid_codes(w, 4, axis=0)
    assert np.all(s8 > 0)
    assert not codes[0].any()


def test_four_bit_clip_fraction_is_112_over_127():
    assert nested_clip_fraction(4) == pytest.approx(112 / 127)
    assert nested_clip_fraction(8) == pytest.approx(1.0)


def test_error_helper_matches_hand_computed_errors():
    # nested dequant: [112, -64, 0, 112] / 127; canonical (step 1/7): 7w = [7, -3.5, 0.42, 6.3]
    # rounds half to even to [7, -4, 0, 6] -> [1, -4/7, 0, 6/7]
    nested = np.array([112, -64, 0, 112]) / 127
    canonical = np.array([1.0, -4 / 7, 0.0, 6 / 7])
    nested_mse = np.mean((HAND_WEIGHTS - nested) ** 2)
    canonical_mse = np.mean((HAND_WEIGHTS - canonical) ** 2)
    err = nested_grid_error(HAND_WEIGHTS, 4, axis=None)
    assert err.bits == 4
    assert err.nested_mse == pytest.approx(nested_mse)
    assert err.canonical_mse == pytest.approx(canonical_mse)
    assert err.ratio == pytest.approx(nested_mse / canonical_mse)


def test_ratio_is_infinite_when_only_the_canonical_grid_is_exact():
    # [1, -1, 0] lies on the canonical 4-bit grid (step 1/7); the nested grid clips +-1 to +-112/127
    err = nested_grid_error(np.array([1.0, -1.0, 0.0]), 4, axis=None)
    assert err.canonical_mse == 0
    assert err.nested_mse == pytest.approx(2 / 3 * (15 / 127) ** 2)
    assert err.ratio == float("inf")


def test_nested_grid_beats_canonical_at_two_bits_on_uniform_weights():
    # Canonical 2-bit grid is {-amax, 0, amax}; the nested one {-64/127, 0, 64/127} * amax.
    w = np.linspace(-1, 1, 4001)
    assert nested_grid_error(w, 2, axis=None).ratio < 0.7


def test_nested_grid_costs_accuracy_on_gaussian_weights_at_four_bits():
    # Per-channel amax sits in the tail, so clipping at 0.882 amax outweighs the finer step.
    w = np.random.default_rng(0).normal(size=(64, 3, 3, 3))
    assert nested_grid_error(w, 4).ratio > 1.05


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_two_to_eight_are_rejected(bits):
    with pytest.raises(HeroError, match="between 2 and 8"):
        nested_grid_codes(HAND_WEIGHTS, bits)


def test_sixteen_bits_is_a_bit_width_but_not_a_nested_one():
    assert check_bits(16) == 16
    with pytest.raises(HeroError, match="nested-grid bit width 16: use one between 2 and 8"):
        nested_grid_codes(HAND_WEIGHTS, 16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_numpy_quantizer_is_the_torch_quantizer_of_exporters_grid(bits):
    # The same Theorem 2 map in float64 (here) and float32 (exporters.grid): the codes may differ
    # only where w / scale lies within float32 rounding of a half, by one step.
    import torch

    from exporters.grid import quantize_tensor

    w = np.random.default_rng(bits).normal(size=(8, 3, 3, 3)).astype(np.float32)
    q, scale, _ = quantize_tensor(torch.from_numpy(w), bits, per_channel=True)
    np.testing.assert_allclose(symmetric_scale(np.abs(w).reshape(8, -1).max(1), bits), scale, rtol=2.0**-23)
    codes = symmetric_codes(w.astype(np.float64), scale.numpy().astype(np.float64)[:, None, None, None], bits)
    differ = codes != q.numpy()
    assert np.abs(codes - q.numpy()).max() <= 1 and differ.mean() < 1e-3
