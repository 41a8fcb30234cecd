"""nn.MultiheadAttention as two Linear layers around plain tensor ops, so it quantizes like the rest.

PyTorch's nn.MultiheadAttention keeps its input projection as a bare Parameter, `in_proj_weight`
(3E x E: the query, key and value projections stacked by rows), and calls its `out_proj` Linear
functionally (torch.nn.functional.multi_head_attention_forward); in eval mode it may also take a
fused "fast path". Neither is a Conv/Linear call that a pre-hook or a torch.fx pass can see. So:

- `in_projection(mha)` is an nn.Linear that *shares* the module's `in_proj_weight` and `in_proj_bias`
  Parameters: `exporters.quantize.quantized_layers` lists it as "<mha>.in_proj", one matrix
  quantized per row (per output channel), so q, k and v are its row blocks on the same grid.
- `DecomposedAttention` computes what the module computes in eval mode (Vaswani et al. 2017,
  Eq. 1: softmax(Q K^T / sqrt(d)) V per head, then the output projection) with `in_proj` and
  `out_proj` called as modules; `decompose_attention` swaps it in for every nn.MultiheadAttention of a
  deploy copy (`exporters.quantize.float_copy`), so the emulation, calibration and the exported
  graph all see two Linear layers. Q K^T, the softmax and the product with V stay float.

Supported: the packed projection (kdim = vdim = embed_dim), batch_first either way, 3-D inputs,
attn_mask and key_padding_mask (bool or additive float), is_causal, need_weights (head-averaged or
not). Not supported, a HeroError naming the module: separate kdim/vdim projections, add_bias_kv,
add_zero_attn. Dropout is the identity: deploy copies are in eval mode. Cross-attention (query not
the key tensor) runs `in_proj` on each input and keeps its row block, three times the projection's
arithmetic, so that every use of the weight is still one Linear call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from exporters.device.errors import HeroError


def _unsupported(mha: nn.MultiheadAttention) -> list[str]:
    return [what for what, bad in (("kdim/vdim other than embed_dim", not mha._qkv_same_embed_dim),
                                   ("add_bias_kv", mha.bias_k is not None), ("add_zero_attn", mha.add_zero_attn)) if bad]


def _check(mha: nn.MultiheadAttention, name: str) -> None:
    unsupported = _unsupported(mha)
    if unsupported:
        raise HeroError(f"nn.MultiheadAttention {name or '(the model)'} uses {', '.join(unsupported)}, which "
                        "hero-deploy cannot quantize: build it with the packed projection, or export with bits=None")


def in_projection(mha: nn.MultiheadAttention, name: str = "") -> nn.Linear:
    """An nn.Linear(E, 3E) whose weight and bias ARE `mha`'s in_proj_weight and in_proj_bias (the same
    Parameter objects: an in-place change to one is a change to the other)."""
    _check(mha, name)
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = mha.embed_dim, 3 * mha.embed_dim
    linear.weight = mha.in_proj_weight
    linear.bias = mha.in_proj_bias
    return linear


class DecomposedAttention(nn.Module):
    """nn.MultiheadAttention's eval-mode forward with `in_proj` and `out_proj` as Linear modules
    (sharing the original's Parameters and its out_proj). Same call signature and outputs."""

    def __init__(self, mha: nn.MultiheadAttention, name: str = ""):
        super().__init__()
        self.in_proj = in_projection(mha, name)
        self.out_proj = mha.out_proj
        self.num_heads, self.embed_dim, self.batch_first = mha.num_heads, mha.embed_dim, mha.batch_first

    def _project(self, query, key, value):
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        e = self.embed_dim
        return (self.in_proj(query)[..., :e], self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if t is not None else t for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        n, length, _ = q.shape
        source = k.shape[1]
        h, d = self.num_heads, self.embed_dim // self.num_heads
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))  # (N, h, L or S, d)
        scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))  # (N, h, L, S)
        scores = scores + _additive(attn_mask, scores, n, h)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores, n, 1).reshape(n, 1, 1, source)
        if is_causal and attn_mask is None:
            scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1),
                                        float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).reshape(n, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _additive(mask, scores: torch.Tensor, n: int, h: int):
    """`mask` as a float term added to the scores (a bool True masks out: -inf), shaped to broadcast
    over (N, h, L, S); 0 when there is no mask."""
    if mask is None:
        return 0.0
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
    if mask.dim() == 3:  # (N * h, L, S)
        return mask.reshape(n, h, mask.shape[-2], mask.shape[-1])
    return mask.to(scores.dtype)


def decompose_attention(model: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention of `model` (a deploy copy: modified in place) by its
    `DecomposedAttention`; returns `model` (a bare nn.MultiheadAttention model: its replacement).
    One `in_projection` refuses stays as it is: a float model still exports, a quantized one is
    refused by `exporters.quantize.quantized_layers`."""
    if isinstance(model, nn.MultiheadAttention):
        return model if _unsupported(model) else DecomposedAttention(model).train(model.training)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and not _unsupported(module):
            parent_name, _, child = name.rpartition(".")
            replacement = DecomposedAttention(module, name).train(module.training)
            setattr(model.get_submodule(parent_name), child, replacement)
    return model
