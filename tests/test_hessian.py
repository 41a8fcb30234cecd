"""Curvature diagnostics: exact HVPs, eigenvalue, trace, ||Hz||, contour, Theorem 3 and quantization."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from exporters.device.errors import HeroError
from hero_train import hessian as H
from hero_train.optim import perturbation_paper
from hero_train.train import TrainConfig


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


def test_theorem3_bounds_hand_computed_case():
    # ||g|| = 3, λ = 2, c = 4: (sqrt(9 + 16) - 3) / 2 = 1; n = 25 -> l-inf 1/5.
    bounds = H.theorem3_bounds(3.0, 2.0, 4.0, 25)
    assert bounds["l2"] == pytest.approx(1.0) and bounds["linf"] == pytest.approx(0.2)
    assert H.theorem3_bounds(0.0, 2.0, 1.0, 1)["l2"] == pytest.approx(1.0)  # sqrt(2c/λ)
    assert H.theorem3_bounds(2.0, 0.0, 1.0, 1)["l2"] == pytest.approx(0.5)  # c/||g||
    assert H.theorem3_bounds(1.0, -1.0, 1.0, 1)["l2"] == math.inf  # the model never rises by c


def test_theorem3_bounds_shrink_as_curvature_grows():
    l2 = [H.theorem3_bounds(0.5, lam, 0.1, 100)["l2"] for lam in (0.1, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(l2, l2[1:]))
    with pytest.raises(HeroError):
        H.theorem3_bounds(0.5, 1.0, 0.0, 100)


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
