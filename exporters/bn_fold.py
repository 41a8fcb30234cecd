"""BatchNorm folding: an eval-mode BatchNorm that directly follows a Conv/Linear becomes a per-output-
channel rescale of that layer's weight and a new bias (`fold_conv_bn_weights`). `bn_pairs` finds the
pairs (torch.fx, else registration order), `fold_bn` folds them into a copy of the model, and
`bn_factors` gives each pair's k = gamma / sqrt(var + eps), which `exporters.quantize` multiplies into
DequantizeLinear scales when it quantizes before folding.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from exporters.device.errors import HeroError

QUANTIZED_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _along(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim-dimensional tensor."""
    if t.dim() == 0:
        return t
    return t.reshape([-1 if d == axis % ndim else 1 for d in range(ndim)])


def fold_conv_bn_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                         bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer (Jacob et al., "Quantization and
    Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018,
    Sec. 3.2): with k = gamma / sqrt(var + eps) per output channel,
    W' = W * k and b' = (b - mean) * k + beta. Computed in float64, returned in weight's dtype."""
    mean = bn.running_mean.double()
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    b = bias.double() if bias is not None else torch.zeros_like(mean)
    k = bn_factor(bn)
    folded_weight = weight.double() * _along(k, weight.dim(), 0)
    return folded_weight.to(weight.dtype), ((b - mean) * k + beta).to(weight.dtype)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, QUANTIZED_LAYER_TYPES) or not isinstance(bn, _BN_TYPES):
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.running_mean is not None and bn.num_features == channels


def _traced_pairs(model: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """(layer, bn) names where the bn's only input is the layer's output and nothing else uses it,
    from the torch.fx graph of `model`; modules called more than once are left alone."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] == 1 and calls[source.target] == 1:
            if _foldable(model.get_submodule(source.target), model.get_submodule(node.target)):
                pairs.append((source.target, node.target))
    return pairs


def _consecutive_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names of a Conv/Linear registered directly before a BN in the same parent: exact
    for nn.Sequential, a convention (self.conv1 then self.bn1) for attributes."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:]):
            if _foldable(layer, bn):
                pairs.append((prefix + layer_name, prefix + bn_name))
    return pairs


class _FoldedIntoLinear(nn.Identity):
    """What replaces a BatchNorm folded into the Linear before it. A BatchNorm normalizes dim 1,
    which is the Linear's feature dim only for 2-D (batch, features) input; on a (B, T, D) input
    with T == D the fold would silently compute something else, so that raises instead."""

    def __init__(self, layer: str, bn: str):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise HeroError(f"BatchNorm {self.bn} normalizes dim 1 of the {x.dim()}-D output of Linear {self.layer}, "
                            "not its features, so it cannot be folded into it: quantize with bn=\"keep\"")
        return x


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping a `_FoldedIntoLinear` (whose shape check fx cannot trace) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, _FoldedIntoLinear) or super().is_leaf_module(m, qualified_name)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """k = gamma / sqrt(running_var + eps) per channel, in float64 (Jacob et al. 2018, Sec. 3.2)."""
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var.double())
    return gamma.detach() / torch.sqrt(bn.running_var.double() + bn.eps)


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names of every BatchNorm that directly follows a Conv/Linear: from torch.fx
    tracing; a model that does not trace falls back to `_consecutive_pairs` (with a warning)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        warnings.warn(f"torch.fx could not trace {type(model).__name__} ({exc}); folding BatchNorm into "
                      "the Conv/Linear registered just before it", stacklevel=3)
        return _consecutive_pairs(model)
    return _traced_pairs(model, graph)


def bn_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: k of the BatchNorm folded into it} for `model`'s pairs (float64, per channel)."""
    return {layer: bn_factor(model.get_submodule(bn)) for layer, bn in bn_pairs(copy.deepcopy(model).eval())}


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of `model` with every BatchNorm that directly follows a Conv/Linear
    folded into it (`fold_conv_bn_weights`) and replaced by nn.Identity; module names stay the
    same. Pairs come from torch.fx tracing; a model that does not trace falls back to
    `_consecutive_pairs` (with a warning). A BN with no preceding Conv/Linear stays. A BN folded
    into a Linear is replaced by an identity that raises HeroError on other than 2-D input
    (`_FoldedIntoLinear`): tracing has no shapes, and only on 2-D input is the fold exact."""
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in bn_pairs(folded):
        layer = folded.get_submodule(layer_name)
        weight, bias = fold_conv_bn_weights(layer.weight.detach(), layer.bias, folded.get_submodule(bn_name))
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias)
        _replace(folded, bn_name, _FoldedIntoLinear(layer_name, bn_name) if isinstance(layer, nn.Linear)
                 else nn.Identity())
    return folded
