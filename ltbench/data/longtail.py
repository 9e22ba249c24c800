"""The long-tailed subset construction of LDAM-DRW (Cao et al. 2019), used by most CIFAR-LT work.

Per-class counts follow an exponential ("exp") or a two-level ("step") profile with imbalance
ratio ρ = n_max / n_min; images are chosen by shuffling each class's indices with one NumPy
RNG seeded once (the *subset* seed, kept separate from the training seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROFILES = ("exp", "step")


def longtail_counts(num_classes: int, n_max: int, ratio: float, profile: str = "exp") -> list[int]:
    """Per-class training counts, class 0 (the head) first.

    exp:  n_c = int(n_max · (1/ρ)^(c/(K−1)))
    step: the first ⌊K/2⌋ classes keep n_max, the rest get int(n_max/ρ).
    """
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * (1.0 / ratio) ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max / ratio)] * (num_classes - half)
    raise ValueError(f"unknown long-tail profile {profile!r}; known: {', '.join(PROFILES)}")


def longtail_indices(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset, grouped by class in class order.

    ``np.random.seed(seed)`` once, then for each class c in order: the indices of class c in the
    original order, shuffled with ``np.random.shuffle``, first ``counts[c]`` kept — exactly the
    LDAM-DRW ``IMBALANCECIFAR10.gen_imbalanced_data`` construction (which uses the global NumPy
    RNG; we use a private ``RandomState`` with the same stream so callers' RNG state is untouched).
    """
    labels = np.asarray(targets)
    rng = np.random.RandomState(seed)
    picked = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, {n} requested")
        rng.shuffle(idx)
        picked.append(idx[:n])
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def class_groups(counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """'many' (> ``many`` training images), 'few' (< ``few``) or 'medium' for each class."""
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def format_ratio(ratio: float | str) -> str:
    """Ratios as they appear in paths and tables: 100 not 100.0, 12.5 stays (a wildcard's "100.0" too)."""
    r = float(ratio)
    return str(int(r)) if r.is_integer() else repr(r)
