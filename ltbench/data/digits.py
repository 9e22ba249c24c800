"""digits-lt: scikit-learn's bundled handwritten digits (8×8, 1,797 images), long-tailed.

Real data with no download, for the demo and the end-to-end tests. A fixed balanced test split
(50 images per class, chosen with ``RandomState(0)``) is held out; the rest is the balanced
training pool (≥ 124 per class) from which the long-tailed subset (``n_max`` = 120) is drawn
exactly like CIFAR-LT. Pixel values 0..16 are scaled to 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltbench.data import Arrays, DatasetSpec, register

TEST_PER_CLASS = 50


def load(data_dir: Path, options: dict) -> Arrays:
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes a second to import

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.where(y == c)[0]
        test_mask[rng.permutation(idx)[:TEST_PER_CLASS]] = True
    return images[~test_mask], y[~test_mask], images[test_mask], y[test_mask]


SPEC = register(
    DatasetSpec(
        name="digits-lt",
        num_classes=10,
        n_max=120,
        image_size=8,
        channels=1,
        mean=(0.3053,),
        std=(0.3759,),
        padding=1,
        many_threshold=50,
        few_threshold=20,
        load=load,
    )
)
