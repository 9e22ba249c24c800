"""Epoch samplers, chosen by name.

A sampler takes the training labels (a LongTensor on the training device) and a
``torch.Generator`` on that device and returns the ``len(labels)`` sample indices of one epoch,
drawn on ``labels.device`` with that generator only: the same generator state gives the same
epoch, and there is no host synchronisation.

Registered samplers (Kang et al. 2020, "Decoupling representation and classifier", Sec. 3:
class j is drawn with probability p_j = n_j^q / Σ_k n_k^q, then an instance of it uniformly):

- ``uniform``: instance-balanced (q = 1), a random permutation (each image once per epoch).
- ``class_balanced``: q = 0, every class equally likely, then a uniform instance of that class;
  draws with replacement (cRT's sampler).
- ``sqrt``: q = ½, class ∝ sqrt(n_c), then a uniform instance; draws with replacement.

Classes without training images are never drawn.
"""
from __future__ import annotations

from typing import Callable

import torch

from ltbench.registry import Registry

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SAMPLERS = Registry("sampler")


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """n_{y_i} for every sample i (the size of its class), from a sort: no host synchronisation."""
    ordered = torch.sort(labels).values
    return (torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels))


def class_power(labels: torch.Tensor, generator: torch.Generator, q: float) -> torch.Tensor:
    """``len(labels)`` draws with replacement: class ∝ n_c^q, then a uniform instance of it.

    Both steps together give instance i the probability n_{y_i}^q / Σ_c n_c^q · 1/n_{y_i}, so the
    indices are drawn in one step by inverting the cumulative sum of the weights n_{y_i}^(q−1)
    (float64) at uniform points.
    """
    weights = class_sizes(labels).double().pow(q - 1.0)
    cdf = weights.cumsum(0)
    u = torch.rand(len(labels), generator=generator, device=labels.device, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(labels) - 1)


@SAMPLERS.register("uniform")
def uniform(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Instance-balanced: every image once per epoch, in a random order (``torch.randperm``)."""
    return torch.randperm(len(labels), generator=generator, device=labels.device)


@SAMPLERS.register("class_balanced")
def class_balanced(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Class-balanced (cRT, Kang et al. 2020): a uniform class, then a uniform instance of it."""
    return class_power(labels, generator, 0.0)


@SAMPLERS.register("sqrt")
def sqrt(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Square-root sampling (Mahajan et al. 2018; Kang et al. 2020): class ∝ sqrt(n_c), then a uniform instance."""
    return class_power(labels, generator, 0.5)
