"""Backbones, chosen by name. Every backbone takes ``norm_layer`` (torchvision style)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.registry import Factory, Registry

BACKBONES: Registry[Factory] = Registry("backbone")


def build(
    name: str, num_classes: int, in_channels: int = 3, norm_layer: Callable[[int], nn.Module] | None = None
) -> nn.Module:
    return BACKBONES.get(name)(
        num_classes=num_classes, in_channels=in_channels, norm_layer=norm_layer or nn.BatchNorm2d
    )


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


# torchvision's ImageNet ResNets (Bottleneck blocks, groups, width per group); their module is
# imported on the first build, so that CIFAR-size runs do not pay torchvision's import time.
IMAGENET_ARCHS = {
    "resnet50": ([3, 4, 6, 3], 1, 64),
    "resnet152": ([3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": ([3, 4, 6, 3], 32, 4),
}


def _register_imagenet(name: str, layers: list[int], groups: int, width: int) -> None:
    @BACKBONES.register(name)
    def build(
        num_classes: int, in_channels: int = 3, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    ) -> nn.Module:
        from ltbench.nn.backbones.imagenet_resnet import ImageNetResNet  # lazy: torchvision, ImageNet sizes only

        return ImageNetResNet(layers, num_classes, in_channels, norm_layer, groups, width)

    build.__doc__ = f"torchvision {name} (Bottleneck blocks {layers}, groups {groups}, width {width})."


for _name, _args in IMAGENET_ARCHS.items():
    _register_imagenet(_name, *_args)

from ltbench.nn.backbones import cifar_resnet  # noqa: E402,F401  (register the CIFAR backbones)
from ltbench.nn.backbones.pretrained import load_pretrained  # noqa: E402,F401
