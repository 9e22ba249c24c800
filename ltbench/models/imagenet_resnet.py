"""ImageNet-size backbones from torchvision (ResNet-50, ResNet-152, ResNeXt-50 32×4d).

They are torchvision's own ``ResNet`` with our norm layer injected through ``norm_layer`` and a
``features`` method (the pooled penultimate features) that the decoupled classifier stage uses.
Pretrained weights are never fetched at run time: :func:`load_pretrained` reads a local file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from ltbench.models import BACKBONES

NormLayer = Callable[[int], nn.Module]


class ImageNetResNet(ResNet):
    def __init__(self, layers: list[int], num_classes: int, in_channels: int = 3,
                 norm_layer: NormLayer = nn.BatchNorm2d, groups: int = 1, width_per_group: int = 64):
        super().__init__(Bottleneck, layers, num_classes=num_classes, groups=groups,
                         width_per_group=width_per_group, norm_layer=norm_layer)
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


_ARCHS = {
    "resnet50": ([3, 4, 6, 3], 1, 64),
    "resnet152": ([3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": ([3, 4, 6, 3], 32, 4),
}


def _register(name: str, layers: list[int], groups: int, width: int) -> None:
    @BACKBONES.register(name)
    def build(num_classes: int, in_channels: int = 3, norm_layer: NormLayer = nn.BatchNorm2d) -> ImageNetResNet:
        return ImageNetResNet(layers, num_classes, in_channels, norm_layer, groups, width)

    build.__doc__ = f"torchvision {name} (Bottleneck blocks {layers}, groups {groups}, width {width})."


for _name, _args in _ARCHS.items():
    _register(_name, *_args)


def load_pretrained(model: nn.Module, path: str | Path, skip_prefixes: tuple[str, ...] = ("fc.",)) -> nn.Module:
    """Initialize ``model`` from a local state_dict file (e.g. torchvision's ImageNet weights).

    Keys under ``skip_prefixes`` (the classifier, whose class count differs) are not loaded. A
    plain-BN weight or bias of shape (C,) initializes every component of a CBN layer's (M, C)
    affine. Any other key that is missing, unexpected or of another shape is an error listing
    the keys, so a wrong file is caught before training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train.pretrained: no file {path} (weights are read from a local file, "
                                "never downloaded; put e.g. torchvision's resnet152 ImageNet weights there)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and tensor errors alike)
        raise ValueError(f"train.pretrained: {path} is not a loadable state_dict: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    own = model.state_dict()
    load, problems = {}, []
    for key, value in state.items():
        if key.startswith(skip_prefixes):
            continue
        if key not in own:
            problems.append(f"unexpected {key}")
        elif own[key].shape == value.shape:
            load[key] = value
        elif value.dim() == 1 and own[key].dim() == 2 and own[key].shape[1] == value.shape[0]:
            load[key] = value.expand_as(own[key]).clone()  # BN (C,) → every CBN component (M, C)
        else:
            problems.append(f"shape of {key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}")
    norm_specific = ("running_prior", "initialized", "alpha", "alpha_bias", "global_")
    for key in own:
        if key not in state and not key.startswith(skip_prefixes) \
                and not any(part in key.rsplit(".", 1)[-1] for part in norm_specific):
            problems.append(f"missing {key}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"train.pretrained: {path} does not match the model: {shown}")
    model.load_state_dict(load, strict=False)
    return model
