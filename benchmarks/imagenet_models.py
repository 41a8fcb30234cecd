"""ResNet18 and MobileNetV2 in their ImageNet layout (3x224x224 input, 1000 classes), our own
definitions, for timing inference at the sizes users deploy. torchvision is not imported; the
parameter counts match its models (11,689,512 and 3,504,872 at 1000 classes).

Weights are random, so the BatchNorms get statistics of their own (`settle_batchnorm`): random
affine parameters, then running statistics gathered in train mode on random images. Folding then
changes every weight and bias, as it does for a trained network.

    model = settle_batchnorm(build("mobilenetv2"), image_size=224)
"""

from __future__ import annotations

import torch
from torch import nn

from hero_train.models import BasicBlock

NUM_CLASSES = 1000
IMAGE_SIZE = 224


def conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: type[nn.Module] | None = None) -> list[nn.Module]:
    """Conv (same padding, no bias) + BatchNorm [+ activation]: the unit both networks are made of."""
    layers = [nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_planes)]
    return layers + ([activation()] if activation else [])


class _PooledHead(nn.Module):
    """`features`, global average pooling, flatten, [dropout,] one linear classifier."""

    def __init__(self, features: list[nn.Module], channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.flatten(self.pool(self.features(x)))))


class ResNet18(_PooledHead):
    """ResNet-18 for ImageNet (He et al. 2016, Table 1): 7x7/2 conv, 3x3/2 max pool, four stages of
    two BasicBlocks (64, 128, 256, 512; stride 2 from the second stage, 1x1 conv+BN projection where
    the shape changes: hero_train.models.BasicBlock), global average pool, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        layers = [*conv_bn(3, 64, 7, 2, activation=nn.ReLU), nn.MaxPool2d(3, 2, 1)]
        in_planes = 64
        for stage, planes in enumerate((64, 128, 256, 512)):
            for block in range(2):
                layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and block == 0 else 1))
                in_planes = planes
        super().__init__(layers, in_planes, num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1x1 expansion by t (none when t is 1),
    3x3 depthwise with stride s, 1x1 linear projection; the input is added back when s is 1 and
    the channel count is unchanged."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        expand = conv_bn(in_planes, hidden, 1, activation=nn.ReLU6) if expansion != 1 else []
        self.residual = nn.Sequential(*expand, *conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
                                      *conv_bn(hidden, out_planes, 1))
        self.adds_input = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return x + out if self.adds_input else out


# (t, c, n, s) of Sandler et al. 2018, Table 2: expansion, output channels, blocks, first block's stride.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))


class MobileNetV2(_PooledHead):
    """MobileNetV2 for ImageNet (Sandler et al. 2018, Table 2; width 1.0): 3x3/2 stem of 32
    channels, the inverted-residual stages, 1x1 conv to 1280, pool, dropout 0.2, fc. ReLU6 throughout."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        layers = conv_bn(3, 32, 3, 2, activation=nn.ReLU6)
        in_planes = 32
        for expansion, out_planes, count, stride in MOBILENETV2_STAGES:
            for block in range(count):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, stride if block == 0 else 1))
                in_planes = out_planes
        layers += conv_bn(in_planes, 1280, 1, activation=nn.ReLU6)
        super().__init__(layers, 1280, num_classes, dropout=0.2)


MODELS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def build(name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A randomly initialised model from MODELS (PyTorch's default init under `seed`), train mode."""
    torch.manual_seed(seed)
    return MODELS[name](num_classes)


def settle_batchnorm(model: nn.Module, image_size: int = IMAGE_SIZE, batches: int = 2, batch_size: int = 8,
                     seed: int = 0) -> nn.Module:
    """Give every BatchNorm of `model` non-trivial statistics, in place, and return it in eval mode:
    weight ~ U(0.5, 1.5) and bias ~ N(0, 0.1) per channel, then the running mean and variance
    averaged (momentum None: a cumulative average) over `batches` train-mode forward passes of
    standard-normal 3 x image_size x image_size images. Each BatchNorm's statistics are those of
    its actual input, so the eval-mode network keeps activations at a sane scale through its depth."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        for _ in range(batches):
            model(torch.randn(batch_size, 3, image_size, image_size, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()
