"""The names a config may use for each registered part, and every part's options with defaults.

The recipes are resolved and checked from this table when the DAG is built, without importing
torch. The parts themselves are registered in :mod:`ltbench.nn` (norm layers, losses, samplers,
heads, backbones); ``tests/test_catalog.py`` checks that this table equals those registries: the
same names, and options equal to each factory's keyword defaults.
"""
from __future__ import annotations

NORMS: dict[str, dict] = {
    "bn": {"eps": 1e-05, "momentum": 0.1},
    "cbn": {"num_components": 4, "eps": 1e-05, "prior_momentum": 0.1, "mean_momentum": 0.1,
            "var_momentum": 0.1, "responsibilities": "pixel", "train_stats": "batch", "init": "first_batch",
            "init_std": 0.1, "detach_responsibilities": False, "em": True, "unbiased_var": True},
    "nbn": {"eps": 1e-05, "momentum": 0.1, "alpha": "shared", "alpha_weight_decay": True},
}

LOSSES: dict[str, dict] = {
    "ce": {"weighting": "none", "beta": 0.9999},
    "balanced_softmax": {"weighting": "none", "beta": 0.9999},
    "focal": {"gamma": 1.0, "weighting": "none", "beta": 0.9999},
    "ldam": {"max_m": 0.5, "s": 30.0, "drw": True, "drw_epoch_fraction": 0.8, "weighting": None, "beta": 0.9999},
    "logit_adjust": {"tau": 1.0, "weighting": "none", "beta": 0.9999},
}

SAMPLERS: tuple[str, ...] = ("uniform", "class_balanced", "sqrt", "class_aware")

HEADS: tuple[str, ...] = ("linear", "cosine")

BACKBONES: tuple[str, ...] = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                              "resnet50", "resnet152", "resnext50_32x4d")

# kind of part → its names (and options), as methods.check and the error messages use them
PARTS: dict[str, object] = {"norm": NORMS, "loss": LOSSES, "sampler": SAMPLERS, "head": HEADS,
                            "backbone": BACKBONES}
