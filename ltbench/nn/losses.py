"""Training losses, chosen by name.

``make(name, counts, **options)`` builds a :class:`Loss` from the per-class training counts
(class 0 first) and the loss's options; it is called as ``loss(logits, targets)`` and returns the
mean over the batch. Every loss also gives the unweighted per-sample values
(:meth:`Loss.per_sample`) and follows the schedule through :meth:`Loss.set_epoch`.

Class re-weighting is shared by all losses through the option ``weighting``:

- ``"none"`` (default): plain mean over the batch.
- ``"cb"``: class-balanced weights w_c = (1−β)/(1−β^{n_c}) (Cui et al. 2019), option ``beta``
  (default 0.9999).
- ``"inverse"``: w_c ∝ 1/n_c.

Both are normalized to sum to K. A weighted loss is Σ_i w_{y_i} l_i / Σ_i w_{y_i}, PyTorch's
convention for ``F.cross_entropy(..., weight=w)`` (and so the LDAM-DRW code's), except ``focal``,
which follows LDAM-DRW's ``FocalLoss(weight=w)``: the weight inside the focal term, mean over N. The weights are a
buffer, so ``.to(device)`` moves them with the module; everything is computed with tensor ops on
the logits' device, without host synchronisation.

Registered losses: ``ce``, ``focal``, ``ldam``, ``balanced_softmax``, ``logit_adjust``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.registry import Factory, Registry

LOSSES: Registry[Factory] = Registry("loss")
WEIGHTINGS = ("none", "cb", "inverse")


def class_weights(counts: torch.Tensor | Sequence[float], kind: str, beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights (float32, on ``counts``' device) of ``kind``, normalized to sum to K.

    ``"none"`` gives ones; ``"cb"`` gives (1−β)/(1−β^{n_c}); ``"inverse"`` gives 1/n_c.
    Every count must be positive for ``"cb"`` and ``"inverse"``.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if kind == "none":
        return torch.ones(n.shape, dtype=torch.float32, device=n.device)
    if kind == "cb":
        w = (1.0 - beta) / (1.0 - beta**n)
    elif kind == "inverse":
        w = 1.0 / n
    else:
        raise ValueError(f"unknown class weighting {kind!r}; known: {', '.join(WEIGHTINGS)}")
    return (w / w.sum() * len(n)).float()


def weighted_mean(values: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Σ w_{y_i} v_i / Σ w_{y_i}; the plain mean when ``weight`` is None."""
    if weight is None:
        return values.mean()
    w = weight[targets]
    return (w * values).sum() / w.sum()


class Loss(nn.Module):
    """Base class: optional class weighting, ``per_sample`` values and a schedule hook.

    Subclasses implement :meth:`per_sample` (unweighted, shape (N,)); ``forward`` reduces it
    with the active class weights (:attr:`active_weight`).
    """

    counts: torch.Tensor  # buffers (declared for the type checker; registered in __init__)
    class_weight: torch.Tensor

    def __init__(self, counts: torch.Tensor, weighting: str = "none", beta: float = 0.9999):
        super().__init__()
        counts = torch.as_tensor(counts, dtype=torch.float32)
        self.weighting = weighting
        self.register_buffer("counts", counts)
        self.register_buffer("class_weight", class_weights(counts, weighting, beta))

    @property
    def active_weight(self) -> torch.Tensor | None:
        """The class weights used by ``forward`` now (None = plain mean)."""
        return None if self.weighting == "none" else self.class_weight

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called at the start of every epoch (0-based); no-op unless a loss follows the schedule."""

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return weighted_mean(self.per_sample(logits, targets), targets, self.active_weight)


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Cross-entropy −log softmax(z)_y."""

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="none")


@LOSSES.register("focal")
class Focal(Loss):
    """Focal loss (1 − p_y)^γ · CE with p_y = softmax(z)_y (Lin et al. 2017), γ = ``gamma`` (default 1).

    As in the LDAM-DRW code (``losses.py``: ``FocalLoss(weight=w)``), where it is written
    (1 − e^{−v})^γ · v with v = CE. With class weights the weight goes *inside*: v_i = w_{y_i} · CE_i,
    and the batch is reduced by the plain mean over N (not Σ w_y, unlike the other losses), so
    class-balanced focal = (1/N) Σ_i (1 − e^{−w_{y_i} CE_i})^γ · w_{y_i} CE_i.
    """

    def __init__(self, counts: torch.Tensor, gamma: float = 1.0, weighting: str = "none", beta: float = 0.9999) -> None:
        super().__init__(counts, weighting, beta)
        self.gamma = float(gamma)

    def _focal(self, ce: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0:
            return ce
        return (1.0 - torch.exp(-ce)).clamp_min(0.0).pow(self.gamma) * ce

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._focal(F.cross_entropy(logits.float(), targets, reduction="none"))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        w = self.active_weight
        return self._focal(ce if w is None else w[targets] * ce).mean()


@LOSSES.register("ldam")
class LDAM(Loss):
    """LDAM (Cao et al. 2019): CE(s · (z − m_y e_y)), margins m_c ∝ n_c^(−1/4) with max(m) = ``max_m``.

    Options: ``max_m`` (0.5), ``s`` (30). The original code uses s with a cosine (normalized)
    classifier; here ``s`` multiplies whatever logits the model gives.

    Deferred re-weighting (DRW), option ``drw`` (default True): uniform weights for epochs
    < int(``drw_epoch_fraction`` · T) (default 0.8, i.e. epoch 160 of 200, 0-based), then
    class weights of kind ``weighting`` (default when ``drw``: ``"cb"`` with ``beta`` 0.9999).
    Without DRW ``weighting`` (default ``"none"``) applies from the first epoch.
    Before the first :meth:`set_epoch` call a DRW loss is in its uniform phase.
    """

    margins: torch.Tensor  # a buffer

    def __init__(
        self,
        counts: torch.Tensor,
        max_m: float = 0.5,
        s: float = 30.0,
        drw: bool = True,
        drw_epoch_fraction: float = 0.8,
        weighting: str | None = None,
        beta: float = 0.9999,
    ) -> None:
        if weighting is None:
            weighting = "cb" if drw else "none"
        super().__init__(counts, weighting, beta)
        m = self.counts.pow(-0.25)
        self.register_buffer("margins", m * (max_m / m.max()))
        self.s = float(s)
        self.drw = bool(drw)
        self.drw_epoch_fraction = float(drw_epoch_fraction)
        self.reweighting = not self.drw

    @property
    def active_weight(self) -> torch.Tensor | None:
        return super().active_weight if self.reweighting else None

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        if self.drw:
            self.reweighting = epoch >= int(self.drw_epoch_fraction * total_epochs)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        margin = torch.zeros_like(logits).scatter_(1, targets[:, None], self.margins[targets][:, None])
        return F.cross_entropy(self.s * (logits - margin), targets, reduction="none")


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(Loss):
    """Balanced Softmax (Ren et al. 2020): CE(z + log n), n the training counts."""

    offset: torch.Tensor  # a buffer

    def __init__(self, counts: torch.Tensor, weighting: str = "none", beta: float = 0.9999) -> None:
        super().__init__(counts, weighting, beta)
        self.register_buffer("offset", self.counts.log())

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offset, targets, reduction="none")


@LOSSES.register("logit_adjust")
class LogitAdjust(Loss):
    """Logit-adjusted loss (Menon et al. 2021): CE(z + τ log π), π = n / Σn, τ = ``tau`` (default 1).

    With τ = 1 it equals Balanced Softmax (the constant log Σn cancels in the softmax).
    """

    offset: torch.Tensor  # a buffer

    def __init__(self, counts: torch.Tensor, tau: float = 1.0, weighting: str = "none", beta: float = 0.9999) -> None:
        super().__init__(counts, weighting, beta)
        self.tau = float(tau)
        self.register_buffer("offset", self.tau * (self.counts / self.counts.sum()).log())

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offset, targets, reduction="none")


def make(name: str, counts: torch.Tensor | Sequence[float], **options: Any) -> Loss:
    """The loss ``name`` for per-class ``counts``; an unknown option raises ``TypeError``."""
    return LOSSES.get(name)(torch.as_tensor(counts, dtype=torch.float32), **options)
