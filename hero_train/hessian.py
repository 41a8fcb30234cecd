"""Curvature diagnostics of a trained network: the quantities HERO's paper plots and bounds.

HERO (Yang et al., DAC 2022, arXiv 2111.11986) argues that a small top Hessian eigenvalue makes a
model robust to bounded weight perturbations such as quantization. This module measures that:

- ``hvp``: exact Hessian-vector products by double backpropagation (Pearlmutter 1994), through
  ``hero_train.optim.double_backward_hvp``, the product HERO's optimizer takes;
- ``hz_norm``: ||H z|| with z the perturbation of Eq. 11 (the paper's Figure 2a);
- ``top_eigenvalue`` (power iteration) and ``hutchinson_trace`` (Hutchinson 1990);
- ``block_traces``: Hutchinson on diagonal blocks of H, one per layer (HAWQ's per-layer traces);
- ``loss_contour``: the loss on a plane through W along two filter-normalised random directions
  (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018; the paper's Figure 3);
- ``theorem3_l2_bound`` (Eq. 6), ``theorem3_linf_bound`` (Eq. 7) and ``theorem3_bounds``: Theorem 3's
  lower bounds on the perturbation that raises the loss by c (``pipeline.analyze`` holds them
  against the perturbation a quantizer applies).

A ``loss_fn(model, batch) -> scalar tensor`` defines the loss; the Hessian is taken over every
parameter with ``requires_grad``, in ``model.parameters()`` order (vectors are lists of tensors in
that order), and over a list of batches it is the Hessian of the mean of the batch losses. Where a
function takes ``params`` (a subset of the parameters), it works on the diagonal block H_SS of the
Hessian over that subset instead (the other weights held fixed), and vectors follow ``params``.

BatchNorm: by default the model is put in eval mode, so BatchNorm uses its running statistics and
the loss is a deterministic function of the weights, the loss of the very model that is quantized
and deployed (what Theorem 3 is applied to here). ``train_bn=True`` uses batch statistics instead,
the loss the optimizer sees during training. Either way every buffer (running statistics included)
and the model's train/eval mode are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.device.errors import HeroError
from hero_train.optim import double_backward_hvp, perturbation_paper
from hero_train.second_order import SecondOrderKernels

Tensors = list[Tensor]
LossFn = Callable[[nn.Module, object], Tensor]


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training loss of the classifiers here: mean cross-entropy of (images, labels)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- machinery


def _params(model: nn.Module) -> Tensors:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def _landscape(model: nn.Module, train_bn: bool) -> Iterator[None]:
    """Eval (or train) mode for the measurement; buffers and the previous mode restored after."""
    was_training = model.training
    saved = [b.detach().clone() for b in model.buffers()]
    model.train(train_bn)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)
        model.train(was_training)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _grad_and_hvp(model: nn.Module, loss_fn: LossFn, batch, v_of_grad: Callable[[Tensors], Tensors],
                  params: Sequence[Tensor] | None = None) -> tuple[Tensors, Tensors]:
    """g = grad L on the batch and H·v(g), from one forward pass (v may depend on g, as z does);
    over `params` only when given (g_S and H_SS·v)."""
    params = _params(model) if params is None else list(params)
    with torch.enable_grad():
        with SecondOrderKernels(model):  # same values, a faster double backward
            loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(params, grads)]
        hv = double_backward_hvp(params, grads, v_of_grad(g))
    return g, hv


def _mean_hvp(model: nn.Module, loss_fn: LossFn, batches: Sequence, v: Tensors,
              params: Sequence[Tensor] | None = None) -> Tensors:
    total = [torch.zeros_like(t) for t in v]
    for batch in batches:
        _, hv = _grad_and_hvp(model, loss_fn, batch, lambda g: v, params)
        total = [t + h for t, h in zip(total, hv)]
    return [t / len(batches) for t in total]


def _check_batches(batches: Sequence) -> Sequence:
    batches = list(batches)
    if not batches:
        raise HeroError("the curvature diagnostics need at least one batch of data")
    return batches


# --------------------------------------------------------------------------- Hessian products


def hvp(model: nn.Module, loss_fn: LossFn, batch, v: Sequence[Tensor], *, train_bn: bool = False,
        params: Sequence[Tensor] | None = None) -> Tensors:
    """Exact H·v of loss_fn on one batch by double backprop: the gradient of <grad L, v>
    (Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural Computation 1994); H_SS·v
    with v shaped like `params` when given."""
    v = list(v)
    with _landscape(model, train_bn):
        return _grad_and_hvp(model, loss_fn, batch, lambda g: v, params)[1]


def gradient(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, train_bn: bool = False) -> Tensors:
    """grad of the mean batch loss over `batches` (the g that enters Theorem 3)."""
    batches = _check_batches(batches)
    params = _params(model)
    total = [torch.zeros_like(p) for p in params]
    with _landscape(model, train_bn), torch.enable_grad():
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
            total = [t if gr is None else t + gr for t, gr in zip(total, grads)]
    return [t / len(batches) for t in total]


def hz_norm(model: nn.Module, loss_fn: LossFn, batches: Sequence, h: float = 1.0, *,
            train_bn: bool = False) -> float:
    """||H·(h z)||_2 with z of Eq. 11 (per-tensor (W⊙W)/||W|| ⊙ g/||g||, g the batch gradient),
    the quantity of the HERO paper's Figure 2a; the mean over `batches` of the per-batch norms."""
    batches = _check_batches(batches)
    weights = [p.detach() for p in _params(model)]
    norms = []
    with _landscape(model, train_bn):
        for batch in batches:
            _, hz = _grad_and_hvp(model, loss_fn, batch, lambda g: perturbation_paper(weights, g, h))
            norms.append(_norm(hz))
    return sum(norms) / len(norms)


def record_hz_norm(model: nn.Module, train_data: tuple[Tensor, Tensor], config, n_batches: int) -> float:
    """||H z|| (h = 1, so runs with different h compare) on the first `n_batches` unaugmented
    training batches of `config.batch_size`, for a per-epoch record of Figure 2a.

    Measured with BatchNorm in train mode, the loss the optimizer penalises during training;
    the running statistics are left as they were.
    """
    if n_batches < 1:
        raise HeroError(f"the number of batches for ||Hz|| must be >= 1 (got {n_batches})")
    images, labels = train_data
    batches = [(images[s : s + config.batch_size].to(config.device), labels[s : s + config.batch_size].to(config.device))
               for s in range(0, min(len(labels), n_batches * config.batch_size), config.batch_size)]
    return hz_norm(model, cross_entropy_loss, batches, h=1.0, train_bn=True)


def top_eigenvalue(model: nn.Module, loss_fn: LossFn, batches: Sequence, iters: int = 20, tol: float = 1e-3,
                   seed: int = 0, *, train_bn: bool = False, params: Sequence[Tensor] | None = None
                   ) -> tuple[float, Tensors]:
    """The dominant eigenvalue of H (largest in magnitude; the top one for a trained network) and
    its unit eigenvector, by power iteration on exact HVPs with the Rayleigh quotient v'Hv
    (Golub & Van Loan, Matrix Computations, Sec. 7.3.1), as PyHessian does (Yao et al. 2020).
    Stops after `iters` products or when the estimate moves by less than tol·|estimate|.
    Of the block H_SS when `params` is given."""
    batches = _check_batches(batches)
    gen = torch.Generator().manual_seed(seed)
    params = _params(model) if params is None else list(params)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    scale = _norm(v)
    v = [t / scale for t in v]
    eigenvalue = 0.0
    with _landscape(model, train_bn):
        for step in range(iters):
            hv = _mean_hvp(model, loss_fn, batches, v, params)
            estimate = _dot(v, hv)
            hv_norm = _norm(hv)
            if hv_norm == 0.0:
                return 0.0, v
            v = [t / hv_norm for t in hv]
            converged = step > 0 and abs(estimate - eigenvalue) <= tol * abs(estimate)
            eigenvalue = estimate
            if converged:
                break
    return eigenvalue, v


def rademacher_like(params: Sequence[Tensor], generator: torch.Generator) -> Tensors:
    """Independent ±1 entries with probability 1/2 each, shaped like `params`."""
    return [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device) for p in params]


def hutchinson_trace(model: nn.Module, loss_fn: LossFn, batches: Sequence, samples: int = 20, seed: int = 0, *,
                     train_bn: bool = False, params: Sequence[Tensor] | None = None) -> float:
    """tr(H) ≈ mean over Rademacher probes v of v'Hv (Hutchinson, "A stochastic estimator of the
    trace of the influence matrix", 1990): unbiased since E[vv'] = I; exact when H is diagonal.
    tr(H_SS) when `params` is given."""
    return block_traces(model, loss_fn, batches, [_params(model) if params is None else list(params)],
                        samples, seed, train_bn=train_bn)[0]


def block_traces(model: nn.Module, loss_fn: LossFn, batches: Sequence, blocks: Sequence[Sequence[Tensor]],
                 samples: int = 20, seed: int = 0, *, joint: bool = False, train_bn: bool = False) -> list[float]:
    """Hutchinson's estimate of tr(H_ii) for every block i of parameters (a layer's weight, say):
    the per-layer traces of HAWQ-V2/V3 (Dong et al., NeurIPS 2020; Yao et al., ICML 2021).

    Separate (default): `samples` probes per block, each v_i'H_ii v_i with v_i Rademacher on that
    block alone, one HVP per probe and batch and block. `joint`: one Rademacher probe v over all
    blocks at once and v_i'(H v)_i per block, still unbiased (E[v_i v_j'] = 0 for i != j removes
    the off-diagonal blocks) at one HVP per probe and batch, but noisier by the off-diagonal
    blocks' ||H_ij||_F² (NNCF's HAWQ estimator does the same)."""
    batches = _check_batches(batches)
    if samples < 1:
        raise HeroError(f"Hutchinson's estimator needs at least one probe (got {samples})")
    blocks = [list(b) for b in blocks]
    union = [p for block in blocks for p in block]
    ends = np.cumsum([len(block) for block in blocks]).tolist()
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(blocks)
    with _landscape(model, train_bn):
        for _ in range(samples):
            if joint:
                v = rademacher_like(union, gen)
                hv = _mean_hvp(model, loss_fn, batches, v, union)
                products = [_dot(v[end - len(block) : end], hv[end - len(block) : end])
                            for block, end in zip(blocks, ends)]
            else:
                probes = [rademacher_like(block, gen) for block in blocks]
                products = [_dot(v, _mean_hvp(model, loss_fn, batches, v, block)) for v, block in zip(probes, blocks)]
            totals = [t + x for t, x in zip(totals, products)]
    return [t / samples for t in totals]


# --------------------------------------------------------------------------- loss landscape


class Contour(NamedTuple):
    """losses[i][j] is the mean loss at W + alphas[i]·d1 + betas[j]·d2."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray


def filter_normalized_direction(params: Sequence[Tensor], generator: torch.Generator) -> Tensors:
    """Li et al. 2018, Sec. 4 ("filter normalization"): a Gaussian direction d with every filter
    d_i (slice along the output axis 0) rescaled to ||W_i||, the norm of the matching filter of W;
    1-D tensors (biases, BatchNorm) get d = 0, as the authors do."""
    out = []
    for p in params:
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        w_norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        d_norms = d.reshape(p.shape[0], -1).norm(dim=1)
        ratio = torch.where(d_norms > 0, w_norms / d_norms, torch.zeros_like(d_norms))
        out.append(d * ratio.reshape([-1] + [1] * (p.dim() - 1)))
    return out


def grid_axis(steps: int, span: float) -> np.ndarray:
    """`steps` evenly spaced points on [-span, span]; the middle one is exactly 0 for odd steps."""
    return np.array([span * (2 * i / (steps - 1) - 1) for i in range(steps)])


@torch.no_grad()
def loss_contour(model: nn.Module, loss_fn: LossFn, batches: Sequence, steps: int = 21, span: float = 1.0,
                 seed: int = 0, *, train_bn: bool = False) -> Contour:
    """The mean loss over `batches` on a steps × steps grid of the plane W + a·d1 + b·d2, d1 and d2
    filter-normalised random directions (Li et al. 2018, Sec. 5), a and b in [-span, span]
    (the HERO paper's Figure 3). The weights are restored bit for bit afterwards."""
    batches = _check_batches(batches)
    if steps < 2 or span <= 0:
        raise HeroError(f"the contour needs steps >= 2 and span > 0 (got steps={steps}, span={span})")
    gen = torch.Generator().manual_seed(seed)
    params = _params(model)
    saved = [p.detach().clone() for p in params]
    d1 = filter_normalized_direction(saved, gen)
    d2 = filter_normalized_direction(saved, gen)
    alphas, betas = grid_axis(steps, span), grid_axis(steps, span)
    losses = np.zeros((steps, steps))
    try:
        with _landscape(model, train_bn):
            for i, a in enumerate(alphas):
                for j, b in enumerate(betas):
                    for p, w, u, v in zip(params, saved, d1, d2):
                        p.copy_(w + float(a) * u + float(b) * v)
                    losses[i, j] = sum(float(loss_fn(model, batch)) for batch in batches) / len(batches)
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
    return Contour(alphas, betas, losses)


def plot_loss_contour(result: Contour, path, title: str = "loss contour"):
    """Contour lines of `result` with the trained weights marked at the centre (Figure 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = ax.contour(result.alphas, result.betas, result.losses.T, levels=15, cmap="viridis")
    ax.clabel(lines, inline=True, fontsize=7, fmt="%.2f")
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10)
    ax.set(xlabel="direction 1", ylabel="direction 2", title=title)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    return path


# --------------------------------------------------------------------------- Theorem 3


def _smallest_root(slope: float, curvature: float, c: float) -> float:
    """The smallest r >= 0 with slope·r + ½·curvature·r² = c (c > 0, slope >= 0), written
    2c / (slope + sqrt(slope² + 2·curvature·c)): the same number as (sqrt(slope² + 2·curvature·c)
    − slope) / curvature without its cancellation, c / slope at curvature 0. Infinite when no
    r reaches c (curvature < 0 and c above the peak slope² / (2|curvature|), or both zero)."""
    disc = slope * slope + 2.0 * curvature * c
    denom = slope + math.sqrt(disc) if disc >= 0 else 0.0
    return 2.0 * c / denom if denom > 0 else math.inf


def theorem3_l2_bound(grad_l2: float, lambda_max: float, c: float) -> float:
    """HERO paper, Theorem 3, Eq. 6: ||δ*||_2 >= (||g||_2 / v)·(sqrt(1 + 2vc / ||g||_2²) − 1),
    v = λ_max(H), for the smallest δ that raises the second-order loss model of Eq. 4 by c (Eq. 5).

    It is the r at which ||g||_2·r + ½·v·r², the most the model can rise over ||δ||_2 <= r
    (Cauchy-Schwarz and δ'Hδ <= v·||δ||_2²), reaches c; computed in the stable form of
    `_smallest_root` (c / ||g||_2 as v → 0, sqrt(2c / v) as ||g|| → 0). Stays valid for v < 0,
    and is infinite when c exceeds the model's peak ||g||_2² / (2|v|).
    """
    return _smallest_root(grad_l2, lambda_max, c)


def theorem3_linf_bound(grad_l1: float, lambda_max: float, c: float, n_nonzero: int) -> float:
    """HERO paper, Theorem 3, Eq. 7: ||δ*||_∞ >= (|g| / (n·v))·(sqrt(1 + 2·n·v·c / |g|²) − 1),
    |g| = ||g||_1, n = ||W||_0 the number of nonzero weights, v = λ_max(H).

    It is the r at which |g|·r + ½·n·v·r² reaches c: over ||δ||_∞ <= r, g'δ <= ||g||_1·r (Hölder)
    and δ'Hδ <= v·||δ||_2² <= n·v·r² for a δ with at most n nonzero entries. So it bounds the
    perturbations that leave zero weights at zero, as linear uniform quantization does (zero is on
    its grid); a δ free to move all N parameters needs n = N. Computed in the stable form of
    `_smallest_root` (c / ||g||_1 as v → 0; sqrt(2c / (n·v)) as |g| → 0, Eq. 8). The theorem
    assumes v >= 0; for v < 0 the curvature term is v·r², not n·v·r² (δ'Hδ <= v·||δ||_2² <=
    v·||δ||_∞²), which keeps the bound valid, and infinite when c exceeds ||g||_1² / (2|v|).
    """
    curvature = n_nonzero * lambda_max if lambda_max >= 0 else lambda_max
    return _smallest_root(grad_l1, curvature, c)


def linf_from_l2(l2_bound: float, n_params: int) -> float:
    """||δ*||_∞ >= l2_bound / sqrt(N) for N parameters, since ||δ||_2 <= sqrt(N)·||δ||_∞.

    Valid, and for v >= 0 never above Eq. 7's bound for the same g, v and c with n <= N:
    ||g||_1 <= sqrt(N)·||g||_2 makes Eq. 7's denominator the smaller; equal when n = N and every
    |g_i| is the same. For v < 0 it can be the larger of the two (Eq. 7's curvature term is then
    v·r², not N·v·r²).
    """
    return l2_bound / math.sqrt(n_params)


def theorem3_bounds(*, grad_l2: float, grad_l1: float, lambda_max: float, c: float, n_params: int,
                    n_nonzero: int) -> dict[str, float]:
    """Theorem 3's lower bounds on the smallest weight perturbation that raises the loss by c:
    ``l2`` (Eq. 6), ``linf`` (Eq. 7, for δ that keeps zero weights at zero) and ``linf_from_l2``
    (Eq. 6 over sqrt(n_params), below Eq. 7 when lambda_max >= 0). g is the gradient over all n_params
    parameters, n_nonzero of them nonzero, and lambda_max the top Hessian eigenvalue."""
    if c <= 0 or grad_l2 < 0 or grad_l1 < 0 or not 1 <= n_nonzero <= n_params:
        raise HeroError(f"Theorem 3 needs c > 0, ||g||_2 >= 0, ||g||_1 >= 0 and 1 <= n_nonzero <= n_params "
                        f"(got c={c}, ||g||_2={grad_l2}, ||g||_1={grad_l1}, n_nonzero={n_nonzero}, "
                        f"n_params={n_params})")
    l2 = theorem3_l2_bound(grad_l2, lambda_max, c)
    return {"l2": l2, "linf": theorem3_linf_bound(grad_l1, lambda_max, c, n_nonzero),
            "linf_from_l2": linf_from_l2(l2, n_params)}
