"""The learning-rate schedule: a multiplier per optimizer step for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


def lr_lambda(
    train: Mapping[str, Any], steps_per_epoch: int, epochs: int | None = None, warmup_epochs: float | None = None
) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant.

    ``train`` is the cell's ``train`` settings (``epochs``, ``warmup_epochs``, ``warmup_per``,
    ``schedule``, ``step_milestones``, ``step_factors``); ``epochs`` and ``warmup_epochs`` override
    theirs (a classifier stage has its own length and no warmup). The warmup covers the first
    round(warmup_epochs × steps_per_epoch) steps and ramps every step, (s + 1) / warmup steps, or with
    ``warmup_per: epoch`` once per epoch, (e + 1) / warmup_epochs in epoch e (LDAM-DRW's
    ``adjust_learning_rate``). With ``warmup_start`` s (not null) the ramp instead starts at s × lr and
    rises linearly to the peak at the first step after the warmup: s + (1 − s)·k / n in warmup step k of n
    (or epoch k of n with ``warmup_per: epoch``; Balanced Softmax's ``CosineAnnealingLRWarmup``: 0.05 → 0.1).
    Milestones are fractions of all ``epochs`` (warmup included).
    """
    epochs = train["epochs"] if epochs is None else epochs
    warmup = train["warmup_epochs"] if warmup_epochs is None else warmup_epochs
    total = epochs * steps_per_epoch
    warm = int(round(warmup * steps_per_epoch))
    per_epoch = train["warmup_per"] == "epoch"
    milestones = [int(round(f * total)) for f in train["step_milestones"]]
    factors = train["step_factors"]
    start = train.get("warmup_start")

    def f(step: int) -> float:
        if step < warm and start is not None:
            k, n = (step // steps_per_epoch, warmup) if per_epoch else (step, warm)
            return start + (1.0 - start) * k / n
        if step < warm:
            return min(1.0, (step // steps_per_epoch + 1) / warmup) if per_epoch else (step + 1) / warm
        if train["schedule"] == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if train["schedule"] == "step":
            passed = sum(step >= m for m in milestones)
            return factors[passed - 1] if passed else 1.0
        return 1.0

    return f
