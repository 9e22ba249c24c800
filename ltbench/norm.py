"""Normalization layers, chosen by name.

``make(name, num_features, **options)`` returns an ``nn.Module`` with ``nn.BatchNorm2d``'s call
signature; :func:`factory` turns a config entry into the ``norm_layer`` callable the backbones
take, like torchvision's ``norm_layer`` argument.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch.nn as nn

from ltbench.registry import Registry

NORMS = Registry("norm layer")


@NORMS.register("bn")
def batchnorm(num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    """Plain ``nn.BatchNorm2d``."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


def make(name: str, num_features: int, **options: Any) -> nn.Module:
    return NORMS.get(name)(num_features, **options)


def factory(name: str = "bn", options: Mapping[str, Any] | None = None) -> Callable[[int], nn.Module]:
    """``norm_layer`` callable for a backbone: ``factory("bn")(64)`` builds one layer."""
    NORMS.get(name)  # fail early on an unknown name
    return partial(make, name, **dict(options or {}))
