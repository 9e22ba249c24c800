"""Training losses, chosen by name.

A loss factory takes the per-class training counts (a 1-D tensor, class 0 first) plus its options
and returns a :class:`Loss`, called as ``loss(logits, targets)``. Losses whose behaviour follows
the schedule (LDAM-DRW re-weighting) override :meth:`Loss.set_epoch`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.registry import Registry

LOSSES = Registry("loss")


class Loss(nn.Module):
    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called at the start of every epoch (0-based)."""


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Plain cross-entropy."""

    def __init__(self, counts: torch.Tensor):
        super().__init__()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


def make(name: str, counts: torch.Tensor, **options: Any) -> Loss:
    return LOSSES.get(name)(torch.as_tensor(counts, dtype=torch.float32), **options)
