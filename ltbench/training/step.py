"""One training step of the representation stage: the views × paths it computes and its loss.

The single home of these facts: the trainer, ``ltbench bench`` and (through
:func:`ltbench.spec.methods.step_logits`, which needs no torch) ``ltbench plan`` use them.

A recipe (``methods.yaml``) names the augmented ``views`` of each image (weak / strong), the
forward ``paths`` (compound = the norm layers as they are; split = SBN, CBN Sec. 3.3: batch
statistics per class group), the ``"path/view"`` logits that get the classification loss
(``classify_on``, CBN Eq. 20) and the weight and pairing of the stop-gradient consistency between the
paths (dual-path learning, CBN Eq. 19). The step computes exactly the logits
:func:`~ltbench.spec.methods.step_logits` lists, and its loss is

    L = (1/|classify_on|) Σ_{k ∈ classify_on} criterion(z_k, y) + weight · L_cons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltbench.nn import norm
from ltbench.spec.methods import step_logits


def forward_paths(
    model: nn.Module,
    views: Mapping[str, torch.Tensor],
    paths: Iterable[str],
    wanted: set[str],
    groups: torch.Tensor | None,
    amp: bool,
) -> dict[str, torch.Tensor]:
    """Logits keyed ``"path/view"`` for every wanted pair; the split path runs in SBN mode with the
    samples' class groups ``groups``. bf16 autocast when ``amp``; the logits are float32."""
    out = {}
    for p in paths:
        if p == "split" and groups is None:
            raise ValueError("the split path needs the samples' class groups (groups=None)")
        ctx = norm.split_mode(model, groups) if p == "split" and groups is not None else nullcontext()
        with ctx, torch.autocast(next(iter(views.values())).device.type, dtype=torch.bfloat16, enabled=amp):
            for v, x in views.items():
                if f"{p}/{v}" in wanted:
                    out[f"{p}/{v}"] = model(x).float()
    return out


class PathsForward(nn.Module):
    """Every logit a recipe's step computes in one call (:func:`forward_paths`), so that
    DistributedDataParallel sees one forward per backward even for SBN's and DPL's passes."""

    def __init__(self, model: nn.Module, recipe: Mapping, amp: bool):
        super().__init__()
        self.model, self.paths, self.wanted, self.amp = model, list(recipe["paths"]), set(step_logits(recipe)), amp

    def forward(self, views: Mapping[str, torch.Tensor], groups: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return forward_paths(self.model, views, self.paths, self.wanted, groups, self.amp)


def consistency_loss(logits: Mapping[str, torch.Tensor], pairing: str) -> torch.Tensor:
    """Stop-gradient cosine consistency between the compound and split paths (CBN Eq. 19).

    cross:     −½[cos(z^c_s, sg(z^s_w)) + cos(z^s_s, sg(z^c_w))]  (weak-view predictions are targets)
    same_view: −½[cos(z^c_s, sg(z^s_s)) + cos(z^s_w, sg(z^c_w))]
    """
    c_w, c_s, s_w, s_s = (logits[k] for k in ("compound/weak", "compound/strong", "split/weak", "split/strong"))
    if pairing == "cross":
        pairs = ((c_s, s_w), (s_s, c_w))
    elif pairing == "same_view":
        pairs = ((c_s, s_s), (s_w, c_w))
    else:
        raise ValueError(f"unknown consistency pairing {pairing!r}; known: cross, same_view")
    (a1, b1), (a2, b2) = pairs
    first = F.cosine_similarity(a1, b1.detach(), dim=1).mean()
    return -0.5 * (first + F.cosine_similarity(a2, b2.detach(), dim=1).mean())


def step_loss(
    recipe: Mapping, criterion: nn.Module, logits: Mapping[str, torch.Tensor], y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the logits the step's accuracy is counted on) of one step (module docstring).

    The accuracy logits are those of the first ``classify_on`` pair."""
    on = recipe["classify_on"]
    loss = sum(criterion(logits[k], y) for k in on) / len(on)
    cons = recipe["consistency"]
    if cons["weight"] > 0:
        loss = loss + cons["weight"] * consistency_loss(logits, cons["pairing"])
    return loss, logits[on[0]]
