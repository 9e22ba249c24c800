"""Test-set evaluation of one cell: per-class correct counts and the many / medium / few accuracies."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn


def evaluate(model: nn.Module, source: Any, num_classes: int, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class count of correct test predictions (int64 tensor on the device).

    ``adjust`` is subtracted from the logits first (post-hoc logit adjustment, τ log π). The model
    runs in eval mode and gets its previous mode back.
    """
    return evaluate_counts(model, source, num_classes, adjust)[0]


@torch.no_grad()
def evaluate_counts(
    model: nn.Module, source: Any, num_classes: int, adjust: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, predicted): per class, the correct test predictions and how many test images were
    predicted as that class (int64 tensors on the device); see :func:`evaluate`."""
    was_training = model.training
    model.eval()
    correct: torch.Tensor | None = None
    predicted: torch.Tensor | None = None
    for x, y in source.test():
        if correct is None or predicted is None:
            correct = torch.zeros(num_classes, dtype=torch.long, device=y.device)
            predicted = torch.zeros(num_classes, dtype=torch.long, device=y.device)
        logits = model(x).float()
        if adjust is not None:
            logits = logits - adjust
        pred = logits.argmax(1)
        correct.index_add_(0, y, (pred == y).long())
        predicted += torch.bincount(pred, minlength=num_classes)
    model.train(was_training)
    if correct is None or predicted is None:
        raise ValueError("evaluate: the test split has no batch")
    return correct, predicted


def collapse_reason(top_share: float | None, top_class: int | None, share: float | None) -> str | None:
    """Why a run's test predictions count as collapsed, or None: its most predicted class ``top_class``
    received ``top_share`` ≥ ``share`` of the test predictions (``train.collapse_share``; None
    disables the check, as does a missing ``top_share``)."""
    if share is None or top_share is None or top_share < share:
        return None
    return (
        f"collapsed: class {top_class} received {100 * top_share:.1f} % of the test predictions "
        f"(>= train.collapse_share = {share:g}); its accuracy is that of a constant classifier, not a result"
    )


def group_accuracy(per_class: np.ndarray, groups: list[str]) -> dict[str, float | None]:
    """Mean accuracy (%) over the classes of each group; None for an empty group."""
    out: dict[str, float | None] = {}
    for g in ("many", "medium", "few"):
        sel = [i for i, gg in enumerate(groups) if gg == g]
        out[g] = float(100.0 * per_class[sel].mean()) if sel else None
    return out
