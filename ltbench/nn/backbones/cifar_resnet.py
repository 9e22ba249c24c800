"""CIFAR ResNets (He et al. 2016, Sec. 4.2) with the option-A shortcut.

3×3 conv to 16 channels, three stages of BasicBlocks with 16/32/64 channels and strides 1/2/2,
global average pooling and a linear head. ResNet-(6n+2) has n blocks per stage: ResNet-32 has
n = 5 (≈0.46M parameters). ResNet-8 (n = 1) is the small model the tests use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn.backbones import BACKBONES

NormLayer = Callable[[int], nn.Module]


class ShortcutA(nn.Module):
    """Option A: subsample spatially by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(stride, planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        stages, in_planes = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, width, stride if j == 0 else 1, norm_layer))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _register(depth: int) -> None:
    n = (depth - 2) // 6

    @BACKBONES.register(f"resnet{depth}")
    def build(num_classes: int, in_channels: int = 3, norm_layer: NormLayer = nn.BatchNorm2d) -> CifarResNet:
        return CifarResNet(n, num_classes, in_channels, norm_layer)

    build.__doc__ = f"CIFAR ResNet-{depth}: {n} BasicBlocks per stage, option-A shortcut."


for _depth in (8, 20, 32, 44, 56, 110):
    _register(_depth)
