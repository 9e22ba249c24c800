"""Backbones, chosen by name. Every backbone takes ``norm_layer`` (torchvision style)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ltbench.registry import Registry

BACKBONES = Registry("backbone")


def build(name: str, num_classes: int, in_channels: int = 3,
          norm_layer: Callable[[int], nn.Module] | None = None) -> nn.Module:
    return BACKBONES.get(name)(num_classes=num_classes, in_channels=in_channels,
                               norm_layer=norm_layer or nn.BatchNorm2d)


from ltbench.models import cifar_resnet  # noqa: E402,F401  (registers the CIFAR ResNets)
