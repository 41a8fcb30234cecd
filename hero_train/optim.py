"""HERO, "first-order only" and Gradient-L1 as wrappers around a base optimizer.

Each optimizer wraps a torch optimizer class (SGD in the paper), built over the same parameter
groups, so momentum, weight decay and LR schedulers work through it (as davda54/sam does). A step
computes a *direction* per parameter, writes it into ``p.grad`` with the weights exactly as they
were, and lets the base optimizer step::

    from hero_train.allocator import keep_freed_memory
    keep_freed_memory()  # CPU: glibc keeps freed activation blocks, as `hero train` does
    opt = HERO(model.parameters(), torch.optim.SGD, h=0.5, gamma=0.1, model=model,
               lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x, y in loader:
        loss = opt.step(lambda: F.cross_entropy(model(x), y))  # no backward() in the closure
        scheduler.step()  # per epoch, as usual

The closure runs the forward pass on the current batch and returns the loss; the optimizer takes
every gradient it needs with ``torch.autograd.grad``. Under an initialised torch.distributed
process group each of those gradients is averaged across ranks here, since DDP's hooks fire only
on ``backward()``. With ``model=`` BatchNorm running statistics move once per step, from the
unperturbed pass only, and the exact Hessian-vector products (HERO's and Gradient-L1's) run Conv,
BatchNorm and ReLU layers through faster second-order kernels (same values).

Notation: g = grad L(W) on the batch; U = W + e the perturbed weights; v = dP/d(grad L(U)) the
weighting of the penalty, so that grad_U P(U) = H(U) v is one Hessian-vector product.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from exporters.device.errors import HeroError, unknown_choice
from hero_train.config import HVP_MODES, VARIANTS
from hero_train.second_order import SecondOrderKernels

Tensors = list[Tensor]


# --------------------------------------------------------------------------- the equations


def perturbation_paper(weights: Sequence[Tensor], grads: Sequence[Tensor], h: float) -> Tensors:
    """HERO paper, Eq. 11: z_i = (W_i ⊙ W_i) / ||W_i||_2 · g_i / ||g_i||_2 per tensor; returns h·z.

    A tensor whose weights or gradient are all zeros gets z_i = 0.
    """
    out = []
    for w, g, wn, gn in zip(weights, grads, torch._foreach_norm(weights), torch._foreach_norm(grads)):
        # torch.where instead of an `if` keeps the device from syncing twice per tensor.
        scale = torch.where((wn > 0) & (gn > 0), h / (wn * gn), 0.0)
        out.append((w * w) * g * scale)
    return out


def perturbation_authors(weights: Sequence[Tensor], grads: Sequence[Tensor], h: float) -> Tensors:
    """Authors' code (github.com/Xiaoxuan-Yang/HERO, sam.py, adaptive=True), ASAM's perturbation.

    e = h · (W ⊙ W ⊙ g) / ||W ⊙ g||_2, the norm taken over all parameters together; e = 0 when
    that norm is zero.
    """
    norm = torch.linalg.vector_norm(torch.stack([(w * g).norm() for w, g in zip(weights, grads)]))
    if norm == 0:
        return [torch.zeros_like(w) for w in weights]
    return [h * (w * w * g) / norm for w, g in zip(weights, grads)]


def penalty_weights_paper(grads_u: Sequence[Tensor], grads: Sequence[Tensor], gamma: float) -> Tensors:
    """HERO paper, Eqs. 10 and 12: P(U) = gamma · Σ_i ||grad_i L(U) − g_i||², over all tensors.

    Returns v = dP/d(grad L(U)) = 2·gamma·(grad L(U) − g), so that grad_U P = H(U)·v (Eq. 12).
    """
    return [2.0 * gamma * (gu - g) for gu, g in zip(grads_u, grads)]


def penalty_weights_authors(grads_u: Sequence[Tensor], grads: Sequence[Tensor], gamma: float) -> Tensors:
    """Authors' code (cifar_hero.py): P(U) = gamma · Σ_i mean((grad_i L(U) − g_i)²).

    Only weight tensors of dimension >= 2 enter (biases and BatchNorm are excluded); the mean is over
    each tensor's elements. Returns v = dP/d(grad L(U)) = 2·gamma/n_i·(grad_i L(U) − g_i), zero for
    the excluded tensors.
    """
    return [
        (2.0 * gamma / gu.numel()) * (gu - g) if gu.dim() >= 2 else torch.zeros_like(gu)
        for gu, g in zip(grads_u, grads)
    ]


def double_backward_hvp(params: Sequence[Tensor], grads: Sequence[Tensor | None], v: Sequence[Tensor],
                        skip: Sequence[bool] | None = None) -> Tensors:
    """H·v = grad_W Σ_i <grad_i L(W), v_i> by double backprop (Pearlmutter, "Fast Exact
    Multiplication by the Hessian", Neural Computation 1994), `grads` = grad L(W) taken with
    ``create_graph=True``. At the perturbed weights U with v = dP/d(grad L(U)) of the penalty
    weights above, this is grad_U P(U) = H(U)·v, the penalty gradient of HERO's Eq. 12, exactly.

    A gradient that is None or does not depend on the weights has a zero Hessian block, and a
    tensor flagged in `skip` (its v is exactly zero: the authors' penalty leaves biases and
    BatchNorm out) adds nothing; both are kept out of the double backward. Parameters the product
    does not reach get zeros.
    """
    live = [i for i, g in enumerate(grads)
            if g is not None and g.requires_grad and not (skip is not None and skip[i])]
    hv = [torch.zeros_like(p) for p in params]
    if live:
        parts = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
                                    allow_unused=True)
        hv = [h if part is None else part for h, part in zip(hv, parts)]
    return hv


def hero_direction(grads_u: Sequence[Tensor], penalty_grad: Sequence[Tensor] | None) -> Tensors:
    """HERO paper, Eq. 13: the update direction grad L(U) + grad_U P(U)."""
    if penalty_grad is None:
        return list(grads_u)
    return [gu + pg for gu, pg in zip(grads_u, penalty_grad)]


def gradl1_direction(grads: Sequence[Tensor], hvp_sign: Sequence[Tensor], lam: float) -> Tensors:
    """Gradient-L1 (Alizadeh et al., ICLR 2020): grad of L + lam·||grad L||_1 = g + lam·H(W)·sign(g)."""
    return [g + lam * hs for g, hs in zip(grads, hvp_sign)]


def fd_step_size(weights: Sequence[Tensor], direction_norm: float) -> float:
    """Step r of the forward difference H·v ≈ (grad L(U + r·v) − grad L(U)) / r.

    r = sqrt(eps) · (1 + ||U||) / ||v||: the textbook balance of truncation error (O(r)) against
    round-off (O(eps / r)) for forward differences (Nocedal & Wright, Sec. 8.1), eps the machine
    epsilon of the weights' dtype. On smooth networks this matches double backprop to ~sqrt(eps);
    on ReLU networks the kinks crossed within r·v make it a smoothed estimate of H·v instead.
    """
    eps = torch.finfo(weights[0].dtype).eps
    wnorm = float(_global_norm(weights))
    return math.sqrt(eps) * (1.0 + wnorm) / direction_norm


# --------------------------------------------------------------------------- machinery


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """||(t_1, ..., t_n)||_2 in float64, as one tensor (no device sync)."""
    norms = torch._foreach_norm([t.detach() for t in tensors], 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms))


def _all_average(tensors: Tensors) -> Tensors:
    """Average over ranks when a process group is up (DDP's hooks only fire on backward())."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


class _BatchNormFreeze:
    """Snapshot BatchNorm buffers and restore them, so extra passes leave the statistics alone."""

    def __init__(self, model: torch.nn.Module | None):
        self.modules = [
            m for m in (model.modules() if model is not None else [])
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]

    def __enter__(self):
        self.saved = [[b.clone() for b in m.buffers(recurse=False)] for m in self.modules]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, saved in zip(self.modules, self.saved):
                for b, s in zip(m.buffers(recurse=False), saved):
                    b.copy_(s)


class _Wrapper(torch.optim.Optimizer):
    """Shared plumbing: base optimizer over the same groups, gradient helpers, final step."""

    def __init__(self, params, base_optimizer, defaults, model, hvp, **base_kwargs):
        if hvp not in HVP_MODES:
            raise HeroError(unknown_choice("hvp mode", hvp, HVP_MODES))
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise HeroError("base_optimizer must be a torch.optim.Optimizer class, e.g. torch.optim.SGD")
        super().__init__(params, dict(defaults, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self.hvp = hvp

    def _params(self) -> Tensors:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _grad(self, loss: Tensor, params: Tensors, create_graph: bool = False) -> Tensors:
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _used(self, closure: Callable[[], Tensor], create_graph: bool = False) -> tuple[Tensor, Tensors, Tensors]:
        """Unperturbed pass at W: the loss, the parameters that get a gradient, and g.

        With `create_graph` g keeps its graph for an exact H(W)·v, and the pass runs through the
        second-order kernels. Parameters without a gradient get ``p.grad = None``.
        """
        with torch.enable_grad(), SecondOrderKernels(self.model if create_graph else None):
            loss = closure()
            params = self._params()
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                p.grad = None
        return loss, [p for p, g in zip(params, grads) if g is not None], [g for g in grads if g is not None]

    def _hvp(self, closure, params: Tensors, at_grads: Tensors, graph_grads: Tensors | None,
             v: Tensors) -> Tensors:
        """H(params)·v, the gradient of Σ <grad L, v> (Eq. 12), exact or by forward difference."""
        # One device sync for all the norms. A tensor whose v is exactly zero (the authors' penalty
        # skips biases and BatchNorm) adds nothing to H·v, so the double backward leaves it out.
        vnorms = torch.stack(torch._foreach_norm(v, 2, dtype=torch.float64)).tolist()
        if self.hvp == "exact":
            return _all_average(double_backward_hvp(params, graph_grads, v, skip=[n == 0 for n in vnorms]))
        vnorm = math.sqrt(sum(n * n for n in vnorms))
        if vnorm == 0.0:
            return [torch.zeros_like(p) for p in params]
        r = fd_step_size(params, vnorm)
        with torch.no_grad():
            torch._foreach_add_(params, v, alpha=r)
        with torch.enable_grad():
            shifted = _all_average(self._grad(closure(), params))
        with torch.no_grad():
            torch._foreach_sub_(params, v, alpha=r)
        diff = torch._foreach_sub(shifted, at_grads)
        torch._foreach_div_(diff, r)
        return diff

    def _finish(self, params: Tensors, weights: Tensors, direction: Tensors) -> None:
        """Restore W exactly, hand the direction to the base optimizer, and step."""
        with torch.no_grad():
            for p, w, d in zip(params, weights, direction):
                p.copy_(w)
                p.grad = d.detach().clone()
        self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state



class HERO(_Wrapper):
    """HERO (Yang et al., DAC 2022): W ← base_step(grad L(U) + grad_U P(U)), U = W + e (Eq. 13).

    ``variant="authors"`` follows the code that produced the published numbers (ASAM-style e over all
    parameters, mean-squared penalty over weight tensors of dim >= 2); ``variant="paper"`` follows
    the text (per-tensor z of Eq. 11, squared-norm penalty of Eq. 10 over all tensors). ``gamma=0``
    skips the penalty and is the "first-order only" baseline.
    """

    def __init__(self, params, base_optimizer, *, h: float = 0.5, gamma: float = 0.1,
                 variant: str = "authors", hvp: str = "exact", model=None, **base_kwargs):
        if variant not in VARIANTS:
            raise HeroError(unknown_choice("HERO variant", variant, VARIANTS))
        if h < 0 or gamma < 0:
            raise HeroError(f"h and gamma must be >= 0 (got h={h}, gamma={gamma})")
        super().__init__(params, base_optimizer, dict(h=h, gamma=gamma), model, hvp, **base_kwargs)
        self.variant = variant
        self.penalty_enabled = True  # the training loop switches it off during the warm-up epochs

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss, params, grads = self._used(closure)
        if not params:
            return loss.detach()
        grads = _all_average(grads)
        weights = [p.detach().clone() for p in params]
        h, gamma = self.param_groups[0]["h"], self.param_groups[0]["gamma"]
        gamma = gamma if self.penalty_enabled else 0.0
        perturb = perturbation_authors if self.variant == "authors" else perturbation_paper
        torch._foreach_add_(params, perturb(weights, grads, h))
        exact_penalty = gamma > 0 and self.hvp == "exact"
        with _BatchNormFreeze(self.model):
            with torch.enable_grad(), SecondOrderKernels(self.model if exact_penalty else None):
                graph_grads = self._grad(closure(), params, create_graph=exact_penalty)
            grads_u = _all_average([g.detach() for g in graph_grads])
            penalty_grad = None
            if gamma > 0:
                weigh = penalty_weights_authors if self.variant == "authors" else penalty_weights_paper
                v = weigh(grads_u, grads, gamma)
                with torch.enable_grad():
                    penalty_grad = self._hvp(closure, params, grads_u, graph_grads, v)
        self._finish(params, weights, hero_direction(grads_u, penalty_grad))
        return loss.detach()


class FirstOrder(HERO):
    """"First-order only": HERO's perturbation and gradient at U, without the Hessian penalty."""

    def __init__(self, params, base_optimizer, *, h: float = 0.5, variant: str = "authors",
                 model=None, **base_kwargs):
        super().__init__(params, base_optimizer, h=h, gamma=0.0, variant=variant, model=model,
                         **base_kwargs)


class GradL1(_Wrapper):
    """Gradient-L1 regularisation (Alizadeh et al., ICLR 2020): minimise L + lam·||grad L||_1."""

    def __init__(self, params, base_optimizer, *, lam: float, hvp: str = "exact", model=None,
                 **base_kwargs):
        if lam < 0:
            raise HeroError(f"lam must be >= 0 (got {lam})")
        super().__init__(params, base_optimizer, dict(lam=lam), model, hvp, **base_kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        lam = self.param_groups[0]["lam"]
        loss, params, graph_grads = self._used(closure, create_graph=self.hvp == "exact" and lam > 0)
        if not params:
            return loss.detach()
        grads = _all_average([g.detach() for g in graph_grads])
        weights = [p.detach().clone() for p in params]
        hvp_sign = [torch.zeros_like(g) for g in grads]
        if lam > 0:
            with _BatchNormFreeze(self.model), torch.enable_grad():
                hvp_sign = self._hvp(closure, params, grads, graph_grads, [g.sign() for g in grads])
        self._finish(params, weights, gradl1_direction(grads, hvp_sign, lam))
        return loss.detach()
