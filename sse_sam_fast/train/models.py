"""Small models used by the CLI, the tests and the benchmarks.

ResNet-32 is the CIFAR ResNet of He et al. (2016) with identity shortcuts that
zero-pad channels ("option A"), the network used by the long-tail literature
(LDAM-DRW, ImbSAM, SSE-SAM). ``norm`` swaps BatchNorm for GroupNorm so the same
architecture can serve as a model whose per-sample losses are independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_features: int = 64, num_classes: int = 10, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class Cnn1d(nn.Module):
    """The convolutional baseline of MNIST-1D (Greydanus, "Scaling down deep learning",
    2020): three 1-D convolutions with ``channels`` channels (kernel 5, then 3 and 3,
    each stride 2 and padding 1, ReLU after each) and a linear classifier over the
    flattened features. A length-40 signal becomes 25 x 5 features (5.3k parameters
    at 10 classes); no normalisation layer, so per-sample losses are independent
    and the split schedule is exact for it."""

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 25):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        out = length
        for kernel in (5, 3, 3):
            out = (out + 2 - kernel) // 2 + 1
        if out < 1:
            raise ValueError(f"length must be >= 3 for three stride-2 convolutions, got {length}")
        self.fc = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x.unsqueeze(1)).flatten(1))


def cnn1d(in_features: int = 40, num_classes: int = 10) -> Cnn1d:
    """:class:`Cnn1d` for signals of ``in_features`` samples (MNIST-1D: 40)."""
    return Cnn1d(in_features, num_classes)


def small_bn_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 8) -> nn.Module:
    """A two-conv BatchNorm network: cheap enough for parity tests, and its
    per-sample losses depend on the whole batch through the batch statistics."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # groups of 4 channels: CIFAR ResNet widths (16, 32, 64) all divide evenly
        return nn.GroupNorm(channels // 4, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', got {kind!r}")


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_layer(norm, planes)
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            # option A: subsample spatially, zero-pad the new channels (no parameters)
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, num_classes: int = 100, norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = _norm_layer(norm, 16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, norm))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet32(num_classes: int = 100, norm: str = "bn") -> CifarResNet:
    """ResNet-32 for 32x32 inputs (0.47M parameters at 100 classes)."""
    return CifarResNet(5, num_classes, norm)


class _WideBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet34Cifar(nn.Module):
    """ResNet-34 (stages of 3, 4, 6, 3 blocks, 64-512 channels) adapted to 32x32
    inputs: a 3x3 stride-1 stem and no max-pool (21.3M parameters at 100 classes)."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(_WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet34(num_classes: int = 100) -> ResNet34Cifar:
    return ResNet34Cifar(num_classes)


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class SmallViT(nn.Module):
    """A small Vision Transformer for 32x32 inputs (4x4 patches, LayerNorm, mean
    pooling): its per-sample losses are independent, so the split schedule is
    exact for it."""

    def __init__(self, num_classes: int = 100, dim: int = 96, depth: int = 4, heads: int = 3, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (32 // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(tokens)).mean(1))


def small_vit(num_classes: int = 100) -> SmallViT:
    return SmallViT(num_classes)


def resnet32_gn(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with GroupNorm: per-sample losses independent of the batch."""
    return resnet32(num_classes, norm="gn")


# The image models (3x32x32 inputs): name -> constructor(num_classes). With the MLP
# they make the --model choices (sse_sam_fast.train.registry.MODELS); bench times these.
MODELS = {"resnet32": resnet32, "resnet32-gn": resnet32_gn, "vit": small_vit, "resnet34": resnet34}
