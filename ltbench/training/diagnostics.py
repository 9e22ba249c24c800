"""Diagnostics of a finished cell: why does a CBN run land where it lands?

Computed once, at the end of training, on the final model and after the reported metrics are fixed,
so they change no result: nothing here draws from a training random stream (the test sample has
its own generator), and every forward runs under ``torch.no_grad`` either in eval mode (no buffer
update) or on a deep copy of the model that is thrown away.

``metrics.json`` gets, for every run, ``stability`` (:func:`stability`: the loss curve's non-finite
steps and the gradient norms, from the per-epoch lines of ``train.jsonl``; a finished run has no
non-finite step, since one makes the epoch's loss non-finite and stops the run as diverged, whose
``diverged.json`` records the epoch's count) and, for a run with CBN layers, ``diagnostics``
(:func:`cbn_diagnostics`):

- per CBN layer (``layers``): the final running priors π_k and the smallest one (``min_prior``; a
  component with π_k ≈ 0 has collapsed), the spread of the component means
  (:meth:`~ltbench.nn.norm.CompoundBatchNorm2d.component_spread`: mean over channels of
  std_k(μ_kc) / sqrt(mean_k σ²_kc + ε)), and ``confident_share``, the fraction of the layer's input
  points (pixels) on the test sample whose largest responsibility under the running mixture exceeds
  :data:`CONFIDENT` (0.9);
- over the layers: ``min_prior`` (the smallest of all), ``mean_spread`` (mean over layers),
  ``confident_share`` (mean over layers);
- ``top1_running`` and ``top1_batch_stats``: balanced top-1 on the same test sample with the
  running mixture (eval mode, what the run reports) and with batch statistics (the model in
  training mode, every normalization layer normalizing each test batch with that batch's own
  statistics, CBN with ``train_stats: batch``; a copy, so no buffer of the run moves). Batches are
  ``train.batch_size`` images, as in training. A large gap exposes a train/test mismatch of the
  running statistics.

A value that could not be measured (an empty test sample) is null.

The test sample is ``train.diag_images`` images drawn uniformly from the test set (0: all of it)
with a private generator seeded :data:`SAMPLE_SEED`; it is the same for every run of a dataset.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ltbench.nn import norm

CONFIDENT = 0.9  # a point is "confidently assigned" when its largest responsibility exceeds this
SAMPLE_SEED = 0


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, on their device (no host synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)


def stability(rows: Iterable[Mapping[str, Any]]) -> dict:
    """The loss curve's stability over the epochs' ``train.jsonl`` rows: non-finite training steps
    (summed), the mean of the per-epoch mean gradient norms, their largest per-step maximum and the
    last epoch's mean."""
    rows = [r for r in rows if "grad_norm_mean" in r]
    if not rows:
        return {"nonfinite_steps": None, "grad_norm_mean": None, "grad_norm_max": None, "grad_norm_last": None}
    return {
        "nonfinite_steps": int(sum(r["nonfinite_steps"] for r in rows)),
        "grad_norm_mean": float(np.mean([r["grad_norm_mean"] for r in rows])),
        "grad_norm_max": float(max(r["grad_norm_max"] for r in rows)),
        "grad_norm_last": float(rows[-1]["grad_norm_mean"]),
    }


def test_sample(source: Any, images: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` from a uniform random sample of about ``images`` test images (every
    image when ``images`` is 0 or at least the test set), the same sample for every run; a last
    batch of fewer than 2 images is dropped (batch statistics need two)."""
    total = len(source.test_y)
    p = 1.0 if images <= 0 or images >= total else images / total
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    xs, ys, have = [], [], 0
    for x, y in source.test():
        keep = (torch.rand(len(y), generator=gen) < p).to(y.device)
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
        while have >= batch_size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:batch_size], y_all[:batch_size]
            xs, ys, have = [x_all[batch_size:]], [y_all[batch_size:]], have - batch_size
    if have >= 2:
        yield torch.cat(xs), torch.cat(ys)


def batch_stats_model(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that normalizes every batch with its own statistics: training mode, CBN
    layers with ``train_stats = "batch"`` and no split path. Its buffers move on every forward; the
    caller's model is untouched."""
    twin = copy.deepcopy(net).train()
    for _, layer in norm.compound_layers(twin):
        layer.train_stats, layer.split_groups = "batch", None
    return twin


class _Confidence:
    """Forward pre-hooks on CBN layers that count the confidently assigned points of their inputs."""

    def __init__(self, layers: list[tuple[str, norm.CompoundBatchNorm2d]], threshold: float):
        self.count = [0] * len(layers)
        self.total = [0] * len(layers)
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i, threshold)) for i, (_, layer) in enumerate(layers)
        ]

    def _hook(self, i: int, threshold: float) -> Callable[[nn.Module, tuple], None]:
        def hook(layer: Any, inputs: tuple) -> None:  # a CBN layer
            c, n = layer.confident_points(inputs[0], threshold)
            self.count[i], self.total[i] = self.count[i] + c, self.total[i] + n

        return hook

    def remove(self) -> list[float]:
        for h in self.handles:
            h.remove()
        return [float(c) / n if n else math.nan for c, n in zip(self.count, self.total, strict=True)]


def _balanced_top1(correct: torch.Tensor, seen: torch.Tensor) -> float:
    present = seen > 0
    return float(100.0 * (correct[present].double() / seen[present].double()).mean()) if present.any() else math.nan


@torch.no_grad()
def _sample_accuracies(
    net: nn.Module,
    layers: list,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    adjust: torch.Tensor | None,
    threshold: float,
) -> tuple[float, float, list[float]]:
    """(top-1 running mixture, top-1 batch statistics, confident share per layer) on the batches."""
    was_training = net.training
    net.eval()
    twin = batch_stats_model(net)
    hooks = _Confidence(layers, threshold)
    correct: dict[str, torch.Tensor] = {}
    seen = None
    try:
        for x, y in batches:
            if seen is None:
                seen = torch.zeros(num_classes, dtype=torch.long, device=y.device)
                correct = {k: torch.zeros_like(seen) for k in ("running", "batch")}
            seen += torch.bincount(y, minlength=num_classes)
            for key, model in (("running", net), ("batch", twin)):
                logits = model(x).float()
                logits = logits - adjust if adjust is not None else logits
                correct[key].index_add_(0, y, (logits.argmax(1) == y).long())
    finally:
        shares = hooks.remove()
        net.train(was_training)
    if seen is None:
        return math.nan, math.nan, shares
    return _balanced_top1(correct["running"], seen), _balanced_top1(correct["batch"], seen), shares


def _finite(v: float) -> float | None:
    """JSON-safe: NaN (no test image reached the measurement) becomes null."""
    return None if math.isnan(v) else float(v)


def cbn_diagnostics(
    net: nn.Module,
    source: Any,
    num_classes: int,
    batch_size: int,
    images: int,
    adjust: torch.Tensor | None = None,
    threshold: float = CONFIDENT,
) -> dict | None:
    """The ``diagnostics`` entry of ``metrics.json`` for ``net`` (the model the run evaluates), or None
    when it has no CBN layer (see the module docstring for every key)."""
    layers = norm.compound_layers(net)
    if not layers:
        return None
    n_images = len(source.test_y) if images <= 0 else min(images, len(source.test_y))
    top1_run, top1_batch, shares = _sample_accuracies(
        net, layers, test_sample(source, images, batch_size), num_classes, adjust, threshold
    )
    rows: list[dict[str, Any]] = []
    for (name, layer), share in zip(layers, shares, strict=True):
        prior = layer.running_prior.detach().float().cpu()
        rows.append(
            {
                "name": name,
                "components": layer.num_components,
                "priors": prior.tolist(),
                "min_prior": float(prior.min()),
                "spread": layer.component_spread(),
                "confident_share": _finite(share),
            }
        )
    return {
        "layers": rows,
        "min_prior": min(r["min_prior"] for r in rows),
        "mean_spread": float(np.mean([r["spread"] for r in rows])),
        "confident_share": _finite(float(np.mean(shares))),
        "confident_threshold": threshold,
        "top1_running": _finite(top1_run),
        "top1_batch_stats": _finite(top1_batch),
        "test_images": n_images,
        "batch_size": batch_size,
    }
