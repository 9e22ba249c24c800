"""Backbones, chosen by name. Every backbone takes ``norm_layer`` (torchvision style)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.registry import Registry

BACKBONES = Registry("backbone")


def build(name: str, num_classes: int, in_channels: int = 3,
          norm_layer: Callable[[int], nn.Module] | None = None) -> nn.Module:
    return BACKBONES.get(name)(num_classes=num_classes, in_channels=in_channels,
                               norm_layer=norm_layer or nn.BatchNorm2d)


class CosineLinear(nn.Module):
    """Cosine classifier: logits = normalize(f) · normalize(w_c), no bias (LDAM-DRW's NormedLinear).

    LDAM scales these logits by s (30 by default), which suits bounded cosine logits; on an
    unbounded linear classifier s = 30 makes the loss explode. Weights start uniform in [−1, 1]
    with each class vector renormalized, as the LDAM-DRW code does.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


HEADS = {"linear": None, "cosine": CosineLinear}


from ltbench.models import cifar_resnet, imagenet_resnet  # noqa: E402,F401  (register the backbones)
from ltbench.models.imagenet_resnet import load_pretrained  # noqa: E402,F401
