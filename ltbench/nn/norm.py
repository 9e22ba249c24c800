"""Normalization layers, chosen by name, and the model surgery that installs them.

``make(name, num_features, **options)`` returns an ``nn.Module`` with ``nn.BatchNorm2d``'s call
signature; :func:`factory` turns a config entry into the ``norm_layer`` callable the backbones
take, like torchvision's ``norm_layer`` argument. Registered layers:

``bn``
    Plain ``nn.BatchNorm2d``.
``cbn``
    :class:`~ltbench.nn.cbn.CompoundBatchNorm2d`, Compound Batch Normalization (Cheng et al., ACM MM
    2022): a mixture of M Gaussians over the C channels, fitted by moving-average EM, one affine per
    component (compound path), plus the class-group split normalization SBN (split path, see
    :func:`split_mode`). It lives in :mod:`ltbench.nn.cbn` (layer, SBN) and :mod:`ltbench.nn.cbn_ops`
    (its custom operators and their C kernels); its names are re-exported here.
``nbn``
    :class:`NormalizedBatchNorm2d`, Normalizing Batch Normalization (Bao et al., 2025):
    BatchNorm2d whose weight and bias are used as unit vectors times a learned scalar magnitude.

Model-level helpers: :func:`apply` (replace a model's BatchNorm2d layers in a scope),
:func:`param_groups` (SGD groups, NBN magnitudes optionally without weight decay),
:func:`rectify_logits` (NBN's logit rectification), :func:`class_groups` and :func:`split_mode`
(CBN's split path), :func:`compound_layers` and :func:`implementation` (CBN's, re-exported).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn.cbn import CompoundBatchNorm2d, class_groups, compound_layers, implementation, split_mode
from ltbench.registry import Factory, Registry, choice

__all__ = [
    "ALPHA_MODES",
    "NORMS",
    "SCOPES",
    "CompoundBatchNorm2d",
    "NormalizedBatchNorm2d",
    "apply",
    "batchnorm",
    "class_groups",
    "compound_layers",
    "factory",
    "implementation",
    "make",
    "param_groups",
    "rectify_logits",
    "split_mode",
]

NORMS: Registry[Factory] = Registry("norm layer")

SCOPES = ("all", "last_stage", "last_stage_all")
ALPHA_MODES = ("shared", "per_layer", "separate")


# --------------------------------------------------------------------------------------------
# NBN
# --------------------------------------------------------------------------------------------


class NormalizedBatchNorm2d(nn.BatchNorm2d):
    """Normalizing Batch Normalization (Bao et al. 2025, public code).

    ``nn.BatchNorm2d`` (batch statistics in training, running statistics in eval) whose affine is
    used as w = α_w · γ / (‖γ‖₂ + 1e-6) and b = α_b · β / (‖β‖₂ + 1e-6), the norms over the C
    channels. The magnitude parameters start at 1.0.

    Args:
        num_features, eps, momentum: as ``nn.BatchNorm2d``.
        alpha: how magnitudes are shared. The layer itself always owns its parameter ``alpha``
            (used for weight and bias) or, for ``"separate"``, ``alpha`` (weight) and
            ``alpha_bias`` (bias). :func:`apply` with ``"shared"`` then makes all layers it
            installs use one ``alpha`` Parameter; ``"per_layer"`` keeps one per layer.
        alpha_weight_decay: whether the magnitudes get weight decay (read by :func:`param_groups`).
    """

    # nn.BatchNorm2d types these as optional (momentum None: cumulative average; no running statistics);
    # this layer always has a numeric momentum and tracks running statistics (see forward)
    momentum: float
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        alpha: str = "shared",
        alpha_weight_decay: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.alpha_mode = choice("alpha", alpha, ALPHA_MODES)
        self.alpha_weight_decay = alpha_weight_decay
        self.alpha = nn.Parameter(torch.ones(()))
        self.alpha_bias = nn.Parameter(torch.ones(())) if alpha == "separate" else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha_mode}, alpha_weight_decay={self.alpha_weight_decay}"

    def alpha_parameters(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha_bias is None else [self.alpha, self.alpha_bias]

    def effective_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b), the weight and bias BatchNorm applies."""
        alpha_b = self.alpha if self.alpha_bias is None else self.alpha_bias
        w = self.alpha * self.weight / (torch.linalg.vector_norm(self.weight) + 1e-6)
        b = alpha_b * self.bias / (torch.linalg.vector_norm(self.bias) + 1e-6)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        w, b = self.effective_affine()
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training, self.momentum, self.eps)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@NORMS.register("bn")
def batchnorm(num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    """Plain ``nn.BatchNorm2d``."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


NORMS.register("cbn")(CompoundBatchNorm2d)
NORMS.register("nbn")(NormalizedBatchNorm2d)


def make(name: str, num_features: int, **options: Any) -> nn.Module:
    """One layer of the registered kind ``name`` for ``num_features`` channels."""
    return NORMS.get(name)(num_features, **options)


def factory(name: str = "bn", options: Mapping[str, Any] | None = None) -> Callable[[int], nn.Module]:
    """``norm_layer`` callable for a backbone: ``factory("bn")(64)`` builds one layer."""
    NORMS.get(name)  # fail early on an unknown name
    return partial(make, name, **dict(options or {}))


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------


def _is_bn(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d  # layers installed by `apply` (NBN included) are left alone


def _last_stage(model: nn.Module) -> nn.Module:
    for attr in ("layer4", "layer3"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return getattr(model, attr)
    raise ValueError(f"{type(model).__name__} has neither layer4 nor layer3: no last stage to normalize")


def _in_scope(model: nn.Module, scope: str) -> list[nn.Module]:
    """The BatchNorm2d modules of ``model`` that ``scope`` selects (see :func:`apply`)."""
    choice("norm scope", scope, SCOPES)
    if scope == "all":
        return [m for m in model.modules() if _is_bn(m)]
    stage = _last_stage(model)
    if scope == "last_stage_all":
        return [m for m in stage.modules() if _is_bn(m)]
    chosen = []
    for block in stage.children():
        own = [m for m in block.children() if _is_bn(m)]
        chosen += own[-1:]
        shortcut = getattr(block, "downsample", None)
        if isinstance(shortcut, nn.Module):
            chosen += [m for m in shortcut.modules() if _is_bn(m)]
    return chosen


def apply(model: nn.Module, name: str, scope: str = "all", **options: Any) -> nn.Module:
    """Replace the ``nn.BatchNorm2d`` layers of ``model`` in ``scope`` by ``make(name, C, **options)``.

    Scopes: ``"all"``: every BatchNorm2d. ``"last_stage"`` (NBN's public code): in the last stage
    (``model.layer4`` if present, else ``model.layer3`` as in the CIFAR ResNets) the last BN of
    each residual block (``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck) and the BNs of a
    ``downsample`` shortcut. ``"last_stage_all"``: every BN of the last stage. Only modules whose
    type is exactly ``nn.BatchNorm2d`` are replaced; the new layers go to the device of the ones
    they replace. NBN layers installed with ``alpha="shared"`` (the default) all use one ``alpha``
    Parameter. Works in place and returns ``model``.
    """
    NORMS.get(name)  # unknown name: KeyError before anything changes
    targets = {id(m) for m in _in_scope(model, scope)}
    installed: list[nn.Module] = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in targets and isinstance(child, nn.BatchNorm2d):  # the targets are BatchNorm2d
                layer = make(name, child.num_features, **options).to(device=child.weight.device)
                setattr(parent, child_name, layer)
                installed.append(layer)
    shared = [m for m in installed if isinstance(m, NormalizedBatchNorm2d) and m.alpha_mode == "shared"]
    for layer in shared[1:]:
        layer.alpha = shared[0].alpha
    return model


def _alpha_parameters(model: nn.Module, alpha_weight_decay: bool | None) -> list[nn.Parameter]:
    """NBN magnitudes that get no weight decay (each once)."""
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, NormalizedBatchNorm2d):
            decay = m.alpha_weight_decay if alpha_weight_decay is None else alpha_weight_decay
            if not decay:
                found.update((id(p), p) for p in m.alpha_parameters())
    return list(found.values())


def param_groups(model: nn.Module, weight_decay: float, alpha_weight_decay: bool | None = True) -> list[dict]:
    """SGD parameter groups: every parameter once, with ``weight_decay`` except the NBN magnitudes
    when ``alpha_weight_decay`` is False (those form a group with weight decay 0).

    ``alpha_weight_decay=None`` uses each NBN layer's own ``alpha_weight_decay`` flag.
    """
    no_decay = {id(p) for p in _alpha_parameters(model, alpha_weight_decay)}
    params = list(model.parameters())  # shared parameters appear once
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def rectify_logits(model: nn.Module) -> nn.Module:
    """NBN's logit rectification: ``model.fc`` becomes ``Sequential(fc, BatchNorm1d(K, affine=False))``.

    The original Linear stays as ``model.fc[0]``. In place; returns ``model``.
    """
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"rectify_logits expects model.fc to be nn.Linear, got {type(fc).__name__}")
    bn = nn.BatchNorm1d(fc.out_features, affine=False).to(device=fc.weight.device)
    model.fc = nn.Sequential(fc, bn)
    return model
