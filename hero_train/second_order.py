"""Faster second-order kernels for HERO's exact Hessian-vector products.

PyTorch's generic double backward is slow for convolution (its weight term runs as a convolution
over swapped batch and channel axes) and for batch norm (some 35 full-size elementwise passes).
While HERO builds the gradient graph at U, Conv, BatchNorm and ReLU modules run through the Functions
below: the same forward and backward kernels, and a backward of the backward built from ATen's
own backward kernels. Same values; on CPU the double backward takes ~30% less time
(benchmarks/step_cost.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _conv(x: Tensor, weight: Tensor, args: tuple) -> Tensor:
    stride, padding, dilation, groups = args
    return torch.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, args: tuple, mask: list[bool]):
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation,
                                               False, [0] * len(stride), groups, mask)


def conv_grad_vjp(x, weight, grad_out, a, b, args, needs) -> tuple:
    """Cotangents of (x, W, gO) for convolution's backward (gI, gW), given cotangents a of gI, b of gW.

    gI is bilinear in (gO, W) and gW in (x, gO), so d/dgO = conv(a, W) + conv(x, b), d/dW = the
    weight gradient of conv(a, ·) at output gradient gO and d/dx = the input gradient of conv(·, b)
    at gO: one torch.ops.aten.convolution_backward call gives both. None stands for zero; `needs`
    says whether x and W want gradients.
    """
    d_out = None
    for inp, w in ((a, weight), (x, b)):
        if inp is not None and w is not None:
            y = _conv(inp, w, args)
            d_out = y if d_out is None else d_out.add_(y)
    mask = [needs[0] and b is not None, needs[1] and a is not None, False]
    if not any(mask):
        return None, None, d_out
    d_x, d_w, _ = _conv_backward(grad_out, x if a is None else a, weight if b is None else b, args, mask)
    return d_x, d_w, d_out


def batchnorm_grad_vjp(x, weight, mean, invstd, eps, grad_out, g_sum, gx_sum, a, c, d) -> tuple:
    """Cotangents of (x, γ, gO) for train-mode batch norm's backward, given a, c, d of (gI, gγ, gβ).

    Any of a, c, d may be None, meaning zero.

    Per channel, with M elements, s = invstd, x̂ = s·(x − μ), G = Σ gO and Gx = Σ gO·x̂, the backward
    (Ioffe & Szegedy 2015, Sec. 3) is gI = γs·(gO − G/M − x̂·Gx/M), gγ = Gx, gβ = G. Differentiating
    it once more, with A = Σ a, Ax = Σ a·x̂, K = Σ a·gO − (A·G + Ax·Gx)/M:
        d/dgO = γs·(a − A/M − x̂·Ax/M) + c·x̂ + d        (the backward applied to a)
        d/dγ  = s·K
        d/dx  = s·(f − Σf/M − x̂·Σ(f·x̂)/M) − γs²K·x̂/M,  f = c·gO − γs·(Gx·a + Ax·gO)/M
    (derived here; tests/test_optim.py holds HERO against PyTorch's own double backward).
    """
    def channel(t):
        return t.view(1, -1, *[1] * (x.dim() - 2))

    dims, m, s, gs = [0, *range(2, x.dim())], x.numel() // x.shape[1], invstd, weight * invstd
    a = torch.zeros_like(x) if a is None else a
    c_ = torch.zeros_like(mean) if c is None else c
    d_out, a_x, a_sum = torch.ops.aten.native_batch_norm_backward(
        a, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
    k = (a * grad_out).sum(dims) - (a_sum * g_sum + a_x * gx_sum) / m
    f_sum = c_ * g_sum - gs * (gx_sum * a_sum + a_x * g_sum) / m
    fx_sum = c_ * gx_sum - 2 * gs * a_x * gx_sum / m
    x_hat = torch.addcmul(channel(-mean * s), x, channel(s))
    d_x = torch.addcmul(channel(-s * f_sum / m), a, channel(-gs * s * gx_sum / m))
    d_x.addcmul_(grad_out, channel(s * (c_ - gs * a_x / m)))
    d_x.addcmul_(x_hat, channel(-(s * fx_sum + gs * s * k) / m))
    # None is zero: HERO's authors' penalty leaves γ and β out, so c and d are None there and two
    # full-size passes are skipped.
    if c is not None:
        d_out.addcmul_(x_hat, channel(c))
    if d is not None:
        d_out.add_(channel(d))
    return d_x, s * k, d_out


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, args):
        ctx.save_for_backward(x, weight)
        ctx.args = args
        return _conv(x, weight, args)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        return (*_ConvGrad.apply(x, weight, grad_out, ctx.args, ctx.needs_input_grad[:2]), None)


class _ConvGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, grad_out, args, needs):
        ctx.save_for_backward(x, weight, grad_out)
        ctx.args = args
        ctx.set_materialize_grads(False)
        grad_x, grad_w, _ = _conv_backward(grad_out, x, weight, args, [needs[0], needs[1], False])
        return grad_x, grad_w

    @staticmethod
    @once_differentiable
    def backward(ctx, a, b):
        x, weight, grad_out = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        return (*conv_grad_vjp(x, weight, grad_out, a, b, ctx.args, needs), None, None)


class _BatchNormTrain(torch.autograd.Function):
    """Batch norm on batch statistics; running statistics (when given) move as nn.BatchNorm's do."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        return (*_BatchNormGrad.apply(x, weight, grad_out, mean, invstd, ctx.eps), None, None, None, None)


class _BatchNormGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, grad_out, mean, invstd, eps):
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(x, weight, grad_out, mean, invstd, grads[1], grads[2])
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return grads

    @staticmethod
    @once_differentiable
    def backward(ctx, a, c, d):
        if a is None and c is None and d is None:
            return None, None, None, None, None, None
        x, weight, grad_out, mean, invstd, gx_sum, g_sum = ctx.saved_tensors
        return (*batchnorm_grad_vjp(x, weight, mean, invstd, ctx.eps, grad_out, g_sum, gx_sum, a, c, d),
                None, None, None)


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        return _ReLUGrad.apply(grad_out, y)


class _ReLUGrad(torch.autograd.Function):
    """ReLU's backward gI = gO·[y > 0]. Its derivative in y is zero almost everywhere: None here,
    where ATen's threshold_backward hands back a full-size zero tensor for autograd to add."""

    @staticmethod
    def forward(ctx, grad_out, y):
        ctx.save_for_backward(y)
        return torch.ops.aten.threshold_backward(grad_out, y, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(a, y, 0), None


def _autocast_on(x: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _conv_forward(module, x):
    if isinstance(module.padding, str) or module.padding_mode != "zeros" or _autocast_on(x):
        return type(module).forward(module, x)
    args = (module.stride, module.padding, module.dilation, module.groups)
    y = _Conv.apply(x, module.weight, args)
    return y if module.bias is None else y + module.bias.view(1, -1, *[1] * (y.dim() - 2))


def _batchnorm_forward(module, x):
    if not (module.training and module.affine) or x.dtype != module.weight.dtype or _autocast_on(x):
        return type(module).forward(module, x)
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:  # as nn.BatchNorm's forward
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    running = (module.running_mean, module.running_var) if module.track_running_stats else (None, None)
    return _BatchNormTrain.apply(x, module.weight, module.bias, *running, momentum, module.eps)


def _relu_forward(module, x):
    if module.inplace or _autocast_on(x):
        return type(module).forward(module, x)
    return _ReLU.apply(x)


_KERNELS = {nn.Conv1d: _conv_forward, nn.Conv2d: _conv_forward, nn.Conv3d: _conv_forward,
            nn.BatchNorm1d: _batchnorm_forward, nn.BatchNorm2d: _batchnorm_forward,
            nn.BatchNorm3d: _batchnorm_forward, nn.ReLU: _relu_forward}


class SecondOrderKernels:
    """Run the model's Conv, BatchNorm and ReLU modules through the Functions above while active.

    Same values as the modules' own forward, running statistics included.
    """

    def __init__(self, model: torch.nn.Module | None):
        self.modules = [m for m in (model.modules() if model is not None else [])
                        if type(m) in _KERNELS and "forward" not in vars(m)]

    def __enter__(self):
        for m in self.modules:
            m.forward = functools.partial(_KERNELS[type(m)], m)  # shadows the class's forward
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            del m.forward
