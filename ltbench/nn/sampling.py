"""Epoch samplers, chosen by name.

A sampler takes the training labels (a LongTensor on the training device) and a
``torch.Generator`` on that device and returns the sample indices of one epoch (``len(labels)``
of them, except ``class_aware``: :func:`epoch_length`), drawn on ``labels.device`` with that
generator only: the same generator state gives the same epoch, and there is no host
synchronisation (``class_aware``: one, for its epoch length).

Registered samplers (Kang et al. 2020, "Decoupling representation and classifier", Sec. 3:
class j is drawn with probability p_j = n_j^q / Σ_k n_k^q, then an instance of it uniformly):

- ``uniform``: instance-balanced (q = 1), a random permutation (each image once per epoch).
- ``class_balanced``: q = 0, every class equally likely, then a uniform instance of that class;
  draws with replacement (cRT's sampler).
- ``sqrt``: q = ½, class ∝ sqrt(n_c), then a uniform instance; draws with replacement.
- ``class_aware``: Kang et al.'s ``ClassAwareSampler`` (classifier-balancing,
  ``data/ClassAwareSampler.py``, ``num_samples_cls: 4`` in every ``config/*/cls_*.yaml``): the classes
  are visited in a random cycle (a new permutation of the classes each cycle); each visit takes
  ``SAMPLES_PER_CLASS_VISIT`` = 4 consecutive images from that class's own random cycle (a new
  permutation of the class's images each time it is used up, so no image repeats within a class
  before every other one of the class came); an epoch is max_c n_c × (number of classes) images.
  Unlike the original, whose cycles continue across epochs, every epoch starts new cycles.

Classes without training images are never drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ltbench.registry import Factory, Registry

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SAMPLERS: Registry[Factory] = Registry("sampler")


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """n_{y_i} for every sample i (the size of its class), from a sort: no host synchronisation."""
    ordered = torch.sort(labels).values
    return torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)


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


SAMPLES_PER_CLASS_VISIT = 4  # Kang et al.'s num_samples_cls in every classifier-stage config


def epoch_length(name: str, labels: torch.Tensor) -> int:
    """Samples per epoch of sampler ``name``: ``len(labels)``, or max_c n_c × classes for ``class_aware``."""
    if name != "class_aware":
        return len(labels)
    counts = torch.bincount(labels)
    return int(counts.max()) * int((counts > 0).sum())


def _cycle_positions(n: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """(K, length): element of each row's cycle at every position; row c cycles through random
    permutations of range(n[c]), a new one each time the previous is used up."""
    K, dev = len(n), n.device
    width = length + int(n.max())  # every block a position < length falls into is complete
    p = torch.arange(width, device=dev).expand(K, width)
    block = torch.div(p, n[:, None], rounding_mode="floor")
    complete = (block + 1) * n[:, None] <= width
    key = torch.where(complete, block.double(), float(width)) + torch.rand(
        (K, width), generator=generator, device=dev, dtype=torch.float64
    )
    rank = torch.empty_like(p)
    rank.scatter_(1, key.argsort(dim=1), p.clone())  # position of each column in the sorted order
    return (rank - block * n[:, None])[:, :length]


@SAMPLERS.register("class_aware")
def class_aware(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Kang et al.'s ClassAwareSampler (module docstring): class cycle, 4 images per visit."""
    present = torch.bincount(labels).nonzero().squeeze(1)
    n = torch.bincount(labels)[present]
    total = int(n.max()) * len(present)
    per = SAMPLES_PER_CLASS_VISIT
    visits = -(-total // per)
    cycles = -(-visits // len(present))
    keys = torch.rand((cycles, len(present)), generator=generator, device=labels.device)
    visit_class = keys.argsort(dim=1).reshape(-1)[:visits]  # index into present
    # the j-th visit of a class reads positions per·j … per·j + per − 1 of the class's own cycle
    onehot = torch.nn.functional.one_hot(visit_class, len(present))
    visit_rank = (onehot.cumsum(0) - 1).gather(1, visit_class[:, None]).squeeze(1)
    slot = torch.arange(per, device=labels.device)
    cls = visit_class[:, None].expand(visits, per).reshape(-1)[:total]
    pos = (visit_rank[:, None] * per + slot).reshape(-1)[:total]
    elem = _cycle_positions(n, int(pos.max()) + 1, generator)[cls, pos]
    by_class = torch.argsort(labels, stable=True)
    start = torch.cumsum(n, 0) - n
    return by_class[start[cls] + elem]
