"""Networks that are not in hero-deploy's zoo, as a user's own factory module would define them
(tests name them as factories: `own_models:depthwise_cnn`, `own_models:tiny_attention`)."""

import torch
from torch import nn


class _DepthwiseBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, BatchNorm, SiLU, and a residual add."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x)))))


class DepthwiseCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.Hardswish()
        self.block = _DepthwiseBlock(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.block(self.act(self.bn(self.stem(x))))
        return self.head(self.drop(torch.flatten(self.pool(x), 1)))


def depthwise_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    return DepthwiseCNN(num_classes, in_channels, width)


class TinyAttention(nn.Module):
    """Patch embedding by a strided conv, one pre-norm self-attention block (LayerNorm, Linear q/k/v,
    MatMul, softmax) with a GELU MLP, mean over tokens, linear head."""

    def __init__(self, num_classes: int, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)
        self.scale = dim ** -0.5

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, T, D)
        h = self.norm1(tokens)
        attention = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale, dim=-1)
        tokens = tokens + self.proj(torch.matmul(attention, self.v(h)))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(dim=1))


def tiny_attention(num_classes: int = 10, in_channels: int = 3, dim: int = 16, patch: int = 4) -> nn.Module:
    return TinyAttention(num_classes, in_channels, dim, patch)


def not_a_module(**kwargs):
    return "a string"


NOT_CALLABLE = 3
