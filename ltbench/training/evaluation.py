"""Test-set evaluation of one cell: per-class correct counts and the many / medium / few accuracies."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


@torch.no_grad()
def evaluate(model: nn.Module, source, num_classes: int, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class count of correct test predictions (int64 tensor on the device).

    ``adjust`` is subtracted from the logits first (post-hoc logit adjustment, τ log π). The model
    runs in eval mode and gets its previous mode back.
    """
    was_training = model.training
    model.eval()
    correct = None
    for x, y in source.test():
        if correct is None:
            correct = torch.zeros(num_classes, dtype=torch.long, device=y.device)
        logits = model(x).float()
        if adjust is not None:
            logits = logits - adjust
        correct.index_add_(0, y, (logits.argmax(1) == y).long())
    model.train(was_training)
    return correct


def group_accuracy(per_class: np.ndarray, groups: list[str]) -> dict[str, float | None]:
    """Mean accuracy (%) over the classes of each group; None for an empty group."""
    out: dict[str, float | None] = {}
    for g in ("many", "medium", "few"):
        sel = [i for i, gg in enumerate(groups) if gg == g]
        out[g] = float(100.0 * per_class[sel].mean()) if sel else None
    return out
