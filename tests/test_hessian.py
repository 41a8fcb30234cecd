"""Curvature diagnostics: exact HVPs, eigenvalue, trace, ||Hz||, contour, Theorem 3 and quantization."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from exporters.device.errors import HeroError
from hero_train import hessian as H
from hero_train.optim import perturbation_paper
from hero_train.config import TrainConfig


class Quadratic(nn.Module):
    """L(w) = ½ w'Aw (the batch is ignored), so H = A exactly."""

    def __init__(self, A, w):
        super().__init__()
        self.A = A
        self.w = nn.Parameter(w.clone())


def quadratic_loss(model, batch):
    return 0.5 * model.w @ model.A @ model.w


def symmetric_with_spectrum(eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def tanh_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def tanh_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


def full_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_hvp_equals_A_v_on_a_quadratic():
    A = symmetric_with_spectrum([3.0, -1.0, 0.5, 2.0])
    model = Quadratic(A, torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64))
    v = torch.tensor([0.3, -0.2, 1.0, 4.0], dtype=torch.float64)
    (hv,) = H.hvp(model, quadratic_loss, None, [v])
    torch.testing.assert_close(hv, A @ v, rtol=1e-12, atol=1e-12)


def test_hvp_matches_autograd_hessian_on_a_tanh_net():
    model, batch = tanh_net(), tanh_batch()
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    hv = H.hvp(model, H.cross_entropy_loss, batch, v)
    torch.testing.assert_close(flat(hv), full_hessian(model, batch) @ flat(v), rtol=1e-10, atol=1e-12)


def test_top_eigenvalue_of_a_known_spectrum():
    A = symmetric_with_spectrum([5.0, 2.0, 1.0, 0.5, -0.3])
    model = Quadratic(A, torch.ones(5, dtype=torch.float64))
    value, (vector,) = H.top_eigenvalue(model, quadratic_loss, [None], iters=100, tol=1e-10)
    assert value == pytest.approx(5.0, rel=1e-6)
    assert abs(float(vector @ torch.linalg.eigh(A).eigenvectors[:, -1])) == pytest.approx(1.0, abs=1e-4)


def test_top_eigenvalue_of_the_tanh_net_matches_eigh():
    model, batch = tanh_net(), tanh_batch()
    eig = torch.linalg.eigvalsh(full_hessian(model, batch))
    dominant = float(eig[eig.abs().argmax()])
    value, _ = H.top_eigenvalue(model, H.cross_entropy_loss, [batch], iters=500, tol=1e-9)
    assert value == pytest.approx(dominant, rel=1e-3)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    A = torch.diag(torch.tensor([4.0, -1.0, 2.5, 0.25], dtype=torch.float64))
    model = Quadratic(A, torch.ones(4, dtype=torch.float64))
    assert H.hutchinson_trace(model, quadratic_loss, [None], samples=3) == pytest.approx(5.75, rel=1e-12)


def test_hutchinson_trace_is_close_on_a_dense_hessian():
    A = symmetric_with_spectrum([3.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    model = Quadratic(A, torch.ones(6, dtype=torch.float64))
    assert H.hutchinson_trace(model, quadratic_loss, [None], samples=1000) == pytest.approx(8.0, rel=0.05)


def test_hz_norm_on_a_quadratic_equals_norm_of_A_z():
    A = symmetric_with_spectrum([3.0, 1.0, 0.5])
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(A, w)
    g = A @ w
    z = (w * w) / w.norm() * g / g.norm()
    assert H.hz_norm(model, quadratic_loss, [None, None], h=0.5) == pytest.approx(float((A @ (0.5 * z)).norm()))
    (expected,) = perturbation_paper([w], [g], 1.0)
    torch.testing.assert_close(expected, z)


def test_measurements_leave_bn_statistics_and_mode_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tanh_batch()
    for train_bn in (False, True):
        H.hz_norm(model, H.cross_entropy_loss, [batch], train_bn=train_bn)
        H.top_eigenvalue(model, H.cross_entropy_loss, [batch], iters=3, train_bn=train_bn)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_record_hz_norm_uses_the_first_training_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, 1, 2, 2, generator=gen), torch.tensor([0, 1] * 5)
    config = TrainConfig(batch_size=4)
    value = H.record_hz_norm(model, (images, labels), config, n_batches=2)
    batches = [(images[:4], labels[:4]), (images[4:8], labels[4:8])]
    assert value > 0
    assert value == pytest.approx(H.hz_norm(model, H.cross_entropy_loss, batches, train_bn=True))


def test_filter_normalized_direction_matches_filter_norms():
    conv = nn.Conv2d(2, 3, 3)
    params = [conv.weight.detach(), conv.bias.detach(), torch.ones(5)]
    d = H.filter_normalized_direction(params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d[0].reshape(3, -1).norm(dim=1), params[0].reshape(3, -1).norm(dim=1))
    assert not torch.equal(d[0], params[0])
    assert torch.count_nonzero(d[1]) == 0 and torch.count_nonzero(d[2]) == 0


def test_contour_centre_is_the_current_loss_and_weights_are_restored():
    model, batch = tanh_net(), tanh_batch()
    before = [p.detach().clone() for p in model.parameters()]
    loss = float(H.cross_entropy_loss(model.eval(), batch).detach())
    result = H.loss_contour(model, H.cross_entropy_loss, [batch], steps=5, span=0.5)
    assert result.losses.shape == (5, 5) and result.alphas[2] == 0.0 and result.betas[2] == 0.0
    assert result.losses[2, 2] == loss
    assert result.losses.max() > loss  # the plane leaves the point
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_plot_loss_contour_writes_a_png(tmp_path):
    model, batch = tanh_net(), tanh_batch()
    result = H.loss_contour(model, H.cross_entropy_loss, [batch], steps=4, span=1.0)
    path = H.plot_loss_contour(result, tmp_path / "c.png", "tanh")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Theorem 3 against the exact minimum of Eq. 5 on quadratics small enough to solve, L(δ) = g'δ + ½δ'Hδ:
# the smallest ||δ||_∞ with L(δ) >= c is the smallest r whose box max of L reaches c (box_max, by
# enumeration), the smallest ||δ||_2 from the trust-region solution; both by bisection, not by formula.


def box_max(g, hess, r):
    """max of L over ||δ||_∞ <= r: at a vertex r·s, s in {±1}^n, when hess is PSD (L is convex);
    coordinate by coordinate (ends and stationary point) when hess is diagonal."""
    if torch.equal(hess, torch.diag(torch.diagonal(hess))) and bool((torch.diagonal(hess) < 0).any()):
        best = 0.0
        for gi, hi in zip(g.tolist(), torch.diagonal(hess).tolist()):
            candidates = [-r, r] + ([min(max(-gi / hi, -r), r)] if hi < 0 else [])
            best += max(gi * d + 0.5 * hi * d * d for d in candidates)
        return best
    assert float(torch.linalg.eigvalsh(hess)[0]) >= -1e-12, "vertex enumeration needs a convex L"
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(g))), dtype=torch.float64)
    return float((r * signs @ g + 0.5 * r * r * ((signs @ hess) * signs).sum(1)).max())


def smallest_radius(rise, c):
    """The smallest r with rise(r) >= c (rise nondecreasing, rise(0) = 0), inf if none up to 1e6."""
    hi = 1e-6
    while rise(hi) < c:
        hi *= 2
        if hi > 1e6:
            return math.inf
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rise(mid) >= c else (mid, hi)
    return hi


def exact_linf(g, hess, c):
    return smallest_radius(lambda r: box_max(g, hess, r), c)


def exact_l2(g, hess, c):
    """Smallest ||δ||_2 with L(δ) >= c for PSD hess = H and g not orthogonal to the top eigenvectors: the
    maximiser of L on ||δ||_2 = r is δ = (μI − H)⁻¹g with μ > λ_max (the trust-region optimality
    conditions for −L, Nocedal & Wright, Thm. 4.1), and L rises with t = 1/(μ − λ_max): bisect on t."""
    lam, q = torch.linalg.eigh(hess)
    lam, gq = lam.tolist(), (q.T @ g).tolist()

    def delta(t):
        return [gi / (1.0 / t + lam[-1] - li) for gi, li in zip(gq, lam)]

    t = smallest_radius(lambda t: sum(gi * d + 0.5 * li * d * d for gi, li, d in zip(gq, lam, delta(t))), c)
    return math.sqrt(sum(d * d for d in delta(t)))


def bounds_for(g, v, c, n_nonzero=None):
    return H.theorem3_bounds(grad_l2=float(g.norm()), grad_l1=float(g.abs().sum()), lambda_max=v, c=c,
                             n_params=len(g), n_nonzero=len(g) if n_nonzero is None else n_nonzero)


@pytest.mark.parametrize("v", [0.0, 1e-12, 0.5, 3.0])
@pytest.mark.parametrize("g", [[0.3, -1.2], [0.7, -0.2, 1.5, 0.05], [0.0, 0.0, 0.0]])
def test_theorem3_bounds_equal_the_exact_minimum_when_h_is_isotropic(g, v):
    # H = v·I with every weight nonzero: the maximiser over the box is r·sign(g) and over the ball
    # r·g/||g||, so Eqs. 6 and 7 are the exact minimum of Eq. 5 (g = 0: Eq. 8, sqrt(2c / (n·v))).
    g = torch.tensor(g, dtype=torch.float64)  # g = 0 and v = 0: L never rises, both are infinite
    hess, c = v * torch.eye(len(g), dtype=torch.float64), 0.2
    bounds = bounds_for(g, v, c)
    assert bounds["linf"] == pytest.approx(exact_linf(g, hess, c), rel=1e-9)
    if g.any():
        assert bounds["l2"] == pytest.approx(exact_l2(g, hess, c), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_theorem3_bounds_stay_below_the_exact_minimum_for_a_psd_hessian(n, seed):
    gen = torch.Generator().manual_seed(seed)
    spectrum = [2.0, 0.7, 0.1, 0.0][:n]
    hess = symmetric_with_spectrum(spectrum, seed=seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    for c in (0.01, 0.3, 5.0):
        bounds = bounds_for(g, max(spectrum), c)
        true_linf = exact_linf(g, hess, c)
        assert bounds["linf"] <= true_linf * (1 + 1e-12)
        assert bounds["linf_from_l2"] <= true_linf * (1 + 1e-12)
        assert bounds["l2"] <= exact_l2(g, hess, c) * (1 + 1e-12)


def test_theorem3_linf_bound_holds_for_perturbations_that_keep_zero_weights_at_zero():
    # W = (1, 0, -2, 0.5): n = ||W||_0 = 3, and δ (a quantizer's: zero is on its grid) leaves w_2 alone.
    support = torch.tensor([0, 2, 3])
    hess = symmetric_with_spectrum([1.5, 0.8, 0.3, 0.05], seed=4)
    v = float(torch.linalg.eigvalsh(hess)[-1])
    g = torch.tensor([0.4, -0.9, 0.2, -0.6], dtype=torch.float64)
    sub = hess[support][:, support]
    for c in (0.05, 1.0):
        assert bounds_for(g, v, c, n_nonzero=3)["linf"] <= exact_linf(g[support], sub, c) * (1 + 1e-12)
    # Tight again when H = v·I and the gradient vanishes off the support.
    g_on = torch.tensor([0.4, 0.0, 0.2, -0.6], dtype=torch.float64)
    iso = 1.5 * torch.eye(3, dtype=torch.float64)
    assert bounds_for(g_on, 1.5, 1.0, n_nonzero=3)["linf"] == pytest.approx(
        exact_linf(g_on[support], iso, 1.0), rel=1e-9)


def test_theorem3_linf_bound_needs_n_params_when_zero_weights_may_move():
    # g = 0, H = v·I, W = (1, 0): moving both entries reaches c at sqrt(c / v), below Eq. 7 with
    # n = ||W||_0 = 1 (sqrt(2c / v)); with n = 2 the bound is that exact minimum.
    g, hess, c = torch.zeros(2, dtype=torch.float64), 2.0 * torch.eye(2, dtype=torch.float64), 0.5
    free = exact_linf(g, hess, c)
    assert bounds_for(g, 2.0, c, n_nonzero=1)["linf"] > 1.4 * free
    assert bounds_for(g, 2.0, c, n_nonzero=2)["linf"] == pytest.approx(free, rel=1e-9)


def test_theorem3_linf_bound_stays_valid_for_negative_curvature():
    # λ_max = -0.1 < 0 (outside the theorem): the best box vertex moves only w_1, so ||δ||_2 =
    # ||δ||_∞ and the exact minimum is the root of r − 0.05·r² = 1; n·v in Eq. 7 would overshoot it.
    g, hess = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.diag(torch.tensor([-0.1, -100.0],
                                                                                    dtype=torch.float64))
    bounds = bounds_for(g, -0.1, 1.0)
    assert bounds["linf"] == pytest.approx(exact_linf(g, hess, 1.0), rel=1e-9)
    # Above the peak 1² / (2·0.1) = 5 nothing reaches c.
    assert exact_linf(g, hess, 6.0) == math.inf
    assert bounds_for(g, -0.1, 6.0)["linf"] == math.inf and bounds_for(g, -0.1, 6.0)["l2"] == math.inf


def test_eq7_is_tighter_than_l2_over_sqrt_n_for_nonnegative_curvature():
    # ||g||_1 <= sqrt(n)·||g||_2, so Eq. 7 >= Eq. 6 / sqrt(n); equal when every |g_i| is the same.
    g = torch.tensor([0.7, -0.2, 1.5, 0.05], dtype=torch.float64)
    for v in (0.0, 0.3, 5.0):
        bounds = bounds_for(g, v, 0.2)
        assert bounds["linf_from_l2"] < 0.9 * bounds["linf"] < bounds["l2"]
    flat_g = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=torch.float64)
    bounds = bounds_for(flat_g, 0.3, 0.2)
    assert bounds["linf_from_l2"] == pytest.approx(bounds["linf"], rel=1e-12)


def test_l2_over_sqrt_n_can_beat_eq7_for_negative_curvature():
    # H = −I, |g_i| = ½: the exact minimum is the root of 2r − 2r² = 0.1, which Eq. 6 / sqrt(n)
    # reaches and Eq. 7 (curvature v·r² for v < 0) does not; both stay below it.
    g, hess, c = torch.full((4,), 0.5, dtype=torch.float64), -torch.eye(4, dtype=torch.float64), 0.1
    bounds, true_linf = bounds_for(g, -1.0, c), exact_linf(g, hess, c)
    assert bounds["linf"] < bounds["linf_from_l2"]
    assert bounds["linf_from_l2"] == pytest.approx(true_linf, rel=1e-9)
    assert bounds["linf"] <= true_linf


def test_theorem3_bounds_grow_as_curvature_and_gradient_shrink():
    # The paper's remarks after Theorem 3: both bounds rise as v falls, Eq. 7 as |g| falls.
    g = torch.tensor([0.5, -0.1, 0.3], dtype=torch.float64)
    by_v = [bounds_for(g, v, 0.1) for v in (100.0, 10.0, 1.0, 0.1)]
    assert all(a["l2"] < b["l2"] and a["linf"] < b["linf"] for a, b in zip(by_v, by_v[1:]))
    by_g = [bounds_for(g * s, 1.0, 0.1)["linf"] for s in (4.0, 1.0, 0.25)]
    assert by_g[0] < by_g[1] < by_g[2]
    with pytest.raises(HeroError):
        bounds_for(g, 1.0, 0.0)
    with pytest.raises(HeroError):
        bounds_for(g, 1.0, 0.1, n_nonzero=4)


@pytest.mark.parametrize("train_bn", [True, False])
def test_hvp_through_the_second_order_kernels_matches_autograd_hessian(train_bn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(12, 3)).double()
    model(torch.randn(8, 2, 4, 4, dtype=torch.float64))  # non-trivial running statistics for eval mode
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    hv = H.hvp(model, H.cross_entropy_loss, batch, v, train_bn=train_bn)
    model.train(train_bn)
    torch.testing.assert_close(flat(hv), full_hessian(model, batch) @ flat(v), rtol=1e-9, atol=1e-11)
