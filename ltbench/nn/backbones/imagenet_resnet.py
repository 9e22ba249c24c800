"""ImageNet-size backbones from torchvision (ResNet-50, ResNet-152, ResNeXt-50 32×4d).

They are torchvision's own ``ResNet`` with our norm layer injected through ``norm_layer`` and a
``features`` method (the pooled penultimate features) that the decoupled classifier stage uses.
Registered by name in :mod:`ltbench.nn.backbones`, which imports this module (and torchvision, ≈2 s)
only when one of them is built. Pretrained weights: :mod:`ltbench.nn.backbones.pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

NormLayer = Callable[[int], nn.Module]


class ImageNetResNet(ResNet):
    def __init__(
        self,
        layers: list[int],
        num_classes: int,
        in_channels: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        groups: int = 1,
        width_per_group: int = 64,
    ):
        super().__init__(
            Bottleneck,
            layers,
            num_classes=num_classes,
            groups=groups,
            width_per_group=width_per_group,
            norm_layer=norm_layer,
        )
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.num_features = self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
