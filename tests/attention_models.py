"""Small transformer classifiers, one per attention pattern, for the export tests: attention written
out with Linear layers (TinyViT), nn.MultiheadAttention with a class token and position embedding
(ViTLike), and Swin's window attention through F.linear (SwinLike). Input (3, 8, 8), 3 classes."""

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Single-head scaled dot-product attention written out: q.k^T and attn.v are MatMuls
    between activations, not weights."""

    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim**-0.5

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out(torch.matmul(attn, v))


class TinyViT(nn.Module):
    """Patch embedding by a strided conv, pre-norm attention and GELU MLP on (B, T, D) tokens,
    mean over tokens, Linear head."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class ViTLike(nn.Module):
    """torchvision's vit_b_16 in miniature: patch embedding by a strided conv, a class token and a
    position embedding (float Parameters, not weights), pre-norm nn.MultiheadAttention (its in_proj
    a bare Parameter, its out_proj read by F.multi_head_attention_forward), a GELU MLP, LayerNorm,
    and the head on the class token."""

    def __init__(self, dim=16, tokens=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.5)
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class WindowAttention(nn.Module):
    """Swin's shifted-window attention as torchvision writes it: the qkv and proj weights are passed
    to F.linear outside their Linear modules, and a learned bias is added to the scores."""

    def __init__(self, dim=12, window=2, heads=2):
        super().__init__()
        self.dim, self.window, self.heads = dim, window, heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.5)

    def forward(self, x):  # (B, H, W, C) with H = W = 2 windows
        b, w, c, h = x.shape[0], self.window, self.dim, self.heads
        x = x.reshape(b, 2, w, 2, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, w * w, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b * 4, w * w, 3, h, c // h).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(torch.matmul(qkv[0], qkv[1].transpose(-2, -1)) * (c // h) ** -0.5 + self.bias, dim=-1)
        out = F.linear(torch.matmul(attn, qkv[2]).transpose(1, 2).reshape(b * 4, w * w, c), self.proj.weight,
                       self.proj.bias)
        return out.reshape(b, 2, 2, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * w, 2 * w, c)


class SwinLike(nn.Module):
    """Patch embedding to (B, H, W, C), pre-norm window attention and MLP blocks, mean pooling, head."""

    def __init__(self, dim=12):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean((1, 2)))
