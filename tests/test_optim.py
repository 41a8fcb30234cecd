"""HERO, FirstOrder and GradL1 against closed forms and literal double-backprop references."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from exporters.device.errors import HeroError
from hero_train.optim import HERO, FirstOrder, GradL1


def conv_bn_net(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(dtype)
    x = torch.randn(8, 2, 6, 6, dtype=dtype)
    y = torch.randint(0, 3, (8,))
    return net, x, y


def tanh_net(dtype):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(16, 5, dtype=dtype)
    y = torch.randint(0, 3, (16,))
    return net, x, y


def reference_hero(net, x, y, variant, h, gamma):
    """Literal double backprop: build P(U) with create_graph and differentiate it."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    if variant == "authors":
        norm = torch.sqrt(sum(((w * gi) ** 2).sum() for w, gi in zip(params, g)))
        e = [h * w * w * gi / norm for w, gi in zip(params, g)]
    else:
        e = [h * (w * w) / w.norm() * gi / gi.norm() if w.norm() * gi.norm() > 0 else 0 * w
             for w, gi in zip(params, g)]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    gu = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True)
    if variant == "authors":
        penalty = gamma * sum(((a - b) ** 2).mean() for a, b in zip(gu, g) if a.dim() >= 2)
    else:
        penalty = gamma * sum(((a - b) ** 2).sum() for a, b in zip(gu, g))
    gp = torch.autograd.grad(penalty, params) if gamma > 0 else [0 * a for a in gu]
    return torch.cat([(a + b).detach().reshape(-1) for a, b in zip(gu, gp)])


def reference_gradl1(net, x, y, lam):
    net = copy.deepcopy(net)
    params = list(net.parameters())
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True)
    obj = F.cross_entropy(net(x), y) + lam * sum(gi.abs().sum() for gi in g)
    return torch.cat([d.reshape(-1) for d in torch.autograd.grad(obj, params)])


def direction_of(opt_factory, net, x, y):
    """The direction an optimizer steps along: W - W' under plain SGD with lr=1."""
    net = copy.deepcopy(net)
    before = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    opt = opt_factory(net)
    opt.step(lambda: F.cross_entropy(net(x), y))
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return before - after


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", ["authors", "paper"])
@pytest.mark.parametrize("hvp", ["exact", "finite-difference"])
def test_hero_matches_double_backprop_on_tanh_net(variant, hvp):
    for dtype, tol in [(torch.float64, 1e-3), (torch.float32, 2e-2)]:
        net, x, y = tanh_net(dtype)
        ref = reference_hero(net, x, y, variant, h=0.5, gamma=1.0)
        got = direction_of(lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=1.0,
                                          variant=variant, hvp=hvp, model=m, lr=1.0), net, x, y)
        assert rel_err(got, ref) < tol, (dtype, rel_err(got, ref))


@pytest.mark.parametrize("variant", ["authors", "paper"])
def test_hero_exact_matches_double_backprop_on_conv_bn_net(variant):
    for dtype, tol in [(torch.float64, 1e-3), (torch.float32, 2e-2)]:
        net, x, y = conv_bn_net(dtype)
        ref = reference_hero(net, x, y, variant, h=0.5, gamma=5.0)
        got = direction_of(lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=5.0,
                                          variant=variant, model=m, lr=1.0), net, x, y)
        assert rel_err(got, ref) < tol, (dtype, rel_err(got, ref))
        # The penalty's own share must match too, or this would only test the first-order part.
        first = reference_hero(net, x, y, variant, h=0.5, gamma=0.0)
        assert rel_err(got - first, ref - first) < tol


@pytest.mark.parametrize("variant", ["authors", "paper"])
def test_first_order_matches_reference_and_hero_with_gamma_zero(variant):
    net, x, y = conv_bn_net(torch.float64)
    ref = reference_hero(net, x, y, variant, h=0.5, gamma=0.0)
    fo = direction_of(lambda m: FirstOrder(m.parameters(), torch.optim.SGD, h=0.5, variant=variant,
                                           model=m, lr=1.0), net, x, y)
    hero0 = direction_of(lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=0.0,
                                        variant=variant, model=m, lr=1.0), net, x, y)
    assert rel_err(fo, ref) < 1e-10
    assert torch.equal(fo, hero0)


@pytest.mark.parametrize("hvp,make", [("exact", conv_bn_net), ("exact", tanh_net),
                                      ("finite-difference", tanh_net)])
def test_gradl1_matches_double_backprop(hvp, make):
    for dtype, tol in [(torch.float64, 1e-3), (torch.float32, 2e-2)]:
        net, x, y = make(dtype)
        ref = reference_gradl1(net, x, y, lam=0.05)
        got = direction_of(lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.05, hvp=hvp,
                                            model=m, lr=1.0), net, x, y)
        assert rel_err(got, ref) < tol, (dtype, rel_err(got, ref))


def quadratic(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T / n + torch.eye(n, dtype=torch.float64)
    return a, torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("hvp", ["exact", "finite-difference"])
def test_paper_variant_matches_closed_form_on_quadratic(hvp):
    a, w0 = quadratic()
    h, gamma = 0.3, 0.7
    w = nn.Parameter(w0.clone())
    opt = HERO([w], torch.optim.SGD, h=h, gamma=gamma, variant="paper", hvp=hvp, lr=1.0)
    opt.step(lambda: 0.5 * w @ a @ w)
    g = a @ w0
    z = (w0 * w0) / w0.norm() * g / g.norm()
    u = w0 + h * z
    expected = a @ u + gamma * 2 * h * a @ a @ z
    assert torch.allclose(w0 - w.detach(), expected, rtol=1e-6, atol=1e-9)


def test_authors_variant_matches_closed_form_on_quadratic():
    a, w0 = quadratic()
    h, gamma, n = 0.3, 0.7, 6
    w = nn.Parameter(w0.clone().reshape(n, 1))  # dim 2: the authors' penalty covers it
    opt = HERO([w], torch.optim.SGD, h=h, gamma=gamma, variant="authors", lr=1.0)
    opt.step(lambda: 0.5 * w.reshape(-1) @ a @ w.reshape(-1))
    g = a @ w0
    e = h * w0 * w0 * g / (w0 * g).norm()
    expected = a @ (w0 + e) + gamma * (2.0 / n) * a @ a @ e
    assert torch.allclose(w0 - w.detach().reshape(-1), expected, rtol=1e-10)


def test_zero_h_and_gamma_equal_the_base_optimizer_over_steps():
    net, x, y = conv_bn_net(torch.float64)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    hero = HERO(a.parameters(), torch.optim.SGD, h=0.0, gamma=0.0, model=a, **kw)
    sgd = torch.optim.SGD(b.parameters(), **kw)
    for _ in range(3):
        hero.step(lambda: F.cross_entropy(a(x), y))
        sgd.zero_grad()
        F.cross_entropy(b(x), y).backward()
        sgd.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, nn.BatchNorm2d):
            assert torch.equal(ma.running_mean, mb.running_mean)


@pytest.mark.parametrize("make", [
    lambda m: HERO(m.parameters(), torch.optim.SGD, gamma=1.0, model=m, lr=0.1),
    lambda m: HERO(m.parameters(), torch.optim.SGD, gamma=1.0, hvp="finite-difference", model=m, lr=0.1),
    lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.1, hvp="finite-difference", model=m, lr=0.1),
    lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.1, model=m, lr=0.1),  # through the kernels
])
def test_batchnorm_statistics_move_once_from_the_unperturbed_pass(make):
    net, x, y = conv_bn_net(torch.float32)
    probe = copy.deepcopy(net)
    probe(x)  # one train-mode pass at W: what the statistics must equal afterwards
    make(net).step(lambda: F.cross_entropy(net(x), y))
    bns = [(m, p) for m, p in zip(net.modules(), probe.modules()) if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for m, p in bns:
        assert int(m.num_batches_tracked) == 1
        # The second-order Conv kernel adds its bias separately: its output (and so the statistics)
        # may differ from nn.Conv2d's in the last float32 bit.
        assert torch.allclose(m.running_mean, p.running_mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(m.running_var, p.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hvp", ["exact", "finite-difference"])
def test_step_with_zero_lr_leaves_weights_bit_identical(hvp):
    net, x, y = conv_bn_net(torch.float32)
    before = [p.detach().clone() for p in net.parameters()]
    HERO(net.parameters(), torch.optim.SGD, gamma=2.0, hvp=hvp, model=net, lr=0.0).step(
        lambda: F.cross_entropy(net(x), y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_parameters_without_gradient_are_left_alone():
    net, x, y = tanh_net(torch.float32)
    unused = nn.Parameter(torch.ones(3))
    opt = HERO(list(net.parameters()) + [unused], torch.optim.SGD, gamma=1.0, lr=0.1, momentum=0.9)
    opt.step(lambda: F.cross_entropy(net(x), y))
    assert torch.equal(unused.detach(), torch.ones(3)) and unused.grad is None


def test_state_dict_round_trip_keeps_momentum():
    net, x, y = tanh_net(torch.float32)
    opt = HERO(net.parameters(), torch.optim.SGD, gamma=0.1, lr=0.1, momentum=0.9)
    opt.step(lambda: F.cross_entropy(net(x), y))
    state = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in state["state"].values())
    clone = copy.deepcopy(net)
    opt2 = HERO(clone.parameters(), torch.optim.SGD, gamma=0.1, lr=0.1, momentum=0.9)
    opt2.load_state_dict(state)
    opt.step(lambda: F.cross_entropy(net(x), y))
    opt2.step(lambda: F.cross_entropy(clone(x), y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), clone.parameters()))


def test_lr_scheduler_drives_the_base_optimizer():
    net, x, y = tanh_net(torch.float32)
    opt = HERO(net.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    opt.step(lambda: F.cross_entropy(net(x), y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] < 0.1


@pytest.mark.parametrize("kwargs", [dict(variant="nope"), dict(hvp="nope"), dict(gamma=-1.0)])
def test_bad_options_are_clear_errors(kwargs):
    net, _, _ = tanh_net(torch.float32)
    with pytest.raises(HeroError):
        HERO(net.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def strided_grouped_net(dtype):
    """Stride 2, groups, 1x1 and dilated convolutions, BatchNorm1d: the cases the fast kernels special-case."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3),
    ).to(dtype)
    return net, torch.randn(8, 2, 9, 9, dtype=dtype), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("variant", ["authors", "paper"])
def test_hero_exact_matches_pytorch_double_backward_on_strided_grouped_convs(variant):
    net, x, y = strided_grouped_net(torch.float64)
    gamma = 50.0 if variant == "authors" else 1.0
    ref = reference_hero(net, x, y, variant, h=0.5, gamma=gamma)
    first = reference_hero(net, x, y, variant, h=0.5, gamma=0.0)
    got = direction_of(lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=gamma, variant=variant,
                                      model=m, lr=1.0), net, x, y)
    assert rel_err(got - first, ref - first) < 1e-8


def test_gradl1_exact_matches_pytorch_double_backward_through_the_kernels():
    net, x, y = strided_grouped_net(torch.float64)
    ref = reference_gradl1(net, x, y, lam=0.05)
    got = direction_of(lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.05, model=m, lr=1.0), net, x, y)
    assert rel_err(got, ref) < 1e-8


@pytest.mark.parametrize("bn", [dict(momentum=None), dict(momentum=0.3), dict(track_running_stats=False)])
def test_second_order_kernels_move_batchnorm_statistics_as_the_module_does(bn):
    from hero_train.second_order import SecondOrderKernels

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, **bn), nn.ReLU())
    kernel = copy.deepcopy(plain)
    for _ in range(2):
        x = torch.randn(4, 2, 6, 6)
        want = plain(x)
        with SecondOrderKernels(kernel):
            got = kernel(x)
        assert torch.allclose(got, want, atol=1e-6)
    for (name, a), b in zip(plain.state_dict().items(), kernel.state_dict().values()):  # last-bit slack: see above
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), name
    assert plain[1].num_batches_tracked is None or torch.equal(plain[1].num_batches_tracked, kernel[1].num_batches_tracked)
    assert "forward" not in vars(kernel[1])  # the patch is gone after the block
