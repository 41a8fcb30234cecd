import numpy as np
import pytest

from exporters.device.errors import HeroError
from exporters.nested_grid import (
    canonical_quantize,
    nested_clip_fraction,
    nested_grid_codes,
    nested_grid_error,
    scale8,
)

# amax = 1, so s8 = 1/127 and the 4-bit nested step is 16/127.
HAND_WEIGHTS = np.array([1.0, -0.5, 0.06, 0.9])


def test_four_bit_codes_match_hand_computed_case():
    # w / (16/127) = [7.94, -3.97, 0.48, 7.14] -> round/clamp to [7, -4, 0, 7] -> times 16
    codes, s8 = nested_grid_codes(HAND_WEIGHTS, bits=4, axis=None)
    assert codes.dtype == np.int8
    assert codes.tolist() == [112, -64, 0, 112]
    assert s8 == pytest.approx(1 / 127)


def test_codes_lie_on_the_nested_sub_grid_for_every_bit_width():
    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3))
    for bits in range(2, 9):
        codes, _ = nested_grid_codes(w, bits)
        step = 2 ** (8 - bits)
        assert np.all(codes.astype(int) % step == 0)
        assert np.abs(codes.astype(int)).max() <= (2 ** (bits - 1) - 1) * step


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
    err = nested_grid_error(HAND_WEIGHTS, 4, axis=None)
    assert err.nested_mse == pytest.approx(np.mean((HAND_WEIGHTS - nested) ** 2))
    assert err.canonical_mse == pytest.approx(np.mean((HAND_WEIGHTS - canonical) ** 2))
    assert err.ratio == pytest.approx(err.nested_mse / err.canonical_mse)


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
