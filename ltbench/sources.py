"""Where a training run's images come from.

A source hands the training loop batches of normalized float images for an epoch order of
sample indices, in one or more *views* (``"weak"`` = crop+flip, ``"strong"`` = AutoAugment,
``"none"``), and the test set in batches. :class:`TensorSource` keeps a small dataset (CIFAR,
digits) on the training device as uint8 and augments there, per sample, with no host
synchronisation; sources for large image-folder datasets plug in with the same interface.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ltbench import augment


class TensorSource:
    def __init__(self, data_file, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 padding: int):
        with np.load(data_file) as z:
            self.train_x = torch.from_numpy(z["train_x"]).to(device)
            self.train_y = torch.from_numpy(z["train_y"]).to(device)
            self.test_x = torch.from_numpy(z["test_x"]).to(device)
            self.test_y = torch.from_numpy(z["test_y"]).to(device)
            self.counts = z["counts"].tolist()
        self.device = device
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.train_y)

    @property
    def labels(self) -> torch.Tensor:
        return self.train_y

    def view(self, x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
        if kind == "weak":
            x = augment.random_crop_flip(x, self.padding, gen)
        elif kind == "strong":
            x = augment.random_crop_flip(x, self.padding, gen)
            x = augment.autoaugment(x, gen)
        elif kind != "none":
            raise ValueError(f"unknown view {kind!r}; known: weak, strong, none")
        return augment.normalize(x, self.mean, self.std)

    def epoch(self, order: torch.Tensor, batch_size: int, views: Sequence[str],
              gen: torch.Generator) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Batches of ``order``; a last batch of one sample is dropped (BatchNorm needs two)."""
        n = len(order)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                break
            x = self.train_x[idx]
            yield [self.view(x, v, gen) for v in views], self.train_y[idx]

    def steps(self, n: int, batch_size: int) -> int:
        return n // batch_size + (1 if n % batch_size >= 2 else 0)

    def test(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.test_y), batch_size):
            yield augment.normalize(self.test_x[i:i + batch_size], self.mean, self.std), self.test_y[i:i + batch_size]
