"""Batched data augmentation on uint8 image tensors of shape (N, C, H, W), on any device.

Every sample draws its own random parameters (crop offset, flip, ...), unlike torchvision's
batched transforms which apply one draw to the whole batch. Randomness comes from an explicit
``torch.Generator`` so that runs are reproducible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                     flip: bool = True) -> torch.Tensor:
    """Per-sample ``RandomCrop(H, padding, fill=0)`` followed by ``RandomHorizontalFlip()``."""
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (N, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (N, 1, W)
        x = x[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, scaled to [0, 1] then standardized per channel."""
    return (x.float().div_(255.0) - mean[:, None, None]) / std[:, None, None]
