"""The names a config may use for each registered part, and every part's options with defaults.

The recipes are resolved and checked from this table when the DAG is built, without importing
torch. The parts themselves are registered in :mod:`ltbench.nn` (norm layers, losses, samplers,
heads, backbones); ``tests/test_catalog.py`` checks that this table equals those registries: the
same names, and options equal to each factory's keyword defaults.

Next to the defaults, :data:`NORM_OPTIONS` and :data:`LOSS_OPTIONS` give each option's type and
range as JSON-schema fragments; :func:`ltbench.spec.config.check_recipe` validates every resolved
recipe against them when the DAG is built and in the CLI, naming the method, the key and the value.
"""

from __future__ import annotations

import math
import re

NORMS: dict[str, dict] = {
    "bn": {"eps": 1e-05, "momentum": 0.1},
    "cbn": {
        "num_components": 4,
        "eps": 1e-05,
        "prior_momentum": 0.1,
        "mean_momentum": 0.1,
        "var_momentum": 0.1,
        "responsibilities": "pixel",
        "train_stats": "batch",
        "init": "first_batch",
        "init_std": 0.1,
        "detach_responsibilities": False,
        "em": True,
        "unbiased_var": True,
    },
    "nbn": {"eps": 1e-05, "momentum": 0.1, "alpha": "shared", "alpha_weight_decay": True},
}

LOSSES: dict[str, dict] = {
    "ce": {"weighting": "none", "beta": 0.9999},
    "balanced_softmax": {"weighting": "none", "beta": 0.9999},
    "focal": {"gamma": 1.0, "weighting": "none", "beta": 0.9999},
    "ldam": {"max_m": 0.5, "s": 30.0, "drw": True, "drw_epoch_fraction": 0.8, "weighting": None, "beta": 0.9999},
    "logit_adjust": {"tau": 1.0, "weighting": "none", "beta": 0.9999},
}

_EPS = {"type": "number", "exclusiveMinimum": 0}
_MOMENTUM = {"type": "number", "minimum": 0, "maximum": 1}
_BOOL = {"type": "boolean"}
MAX_COMPONENTS = 64  # CBN Figure 5 sweeps a handful; 1e9 would try to allocate tens of GB

NORM_OPTIONS: dict[str, dict[str, dict]] = {
    "bn": {"eps": _EPS, "momentum": {"type": ["number", "null"], "minimum": 0, "maximum": 1}},
    "cbn": {
        "num_components": {"type": "integer", "minimum": 1, "maximum": MAX_COMPONENTS},
        "eps": _EPS,
        "prior_momentum": _MOMENTUM,
        "mean_momentum": _MOMENTUM,
        "var_momentum": _MOMENTUM,
        "responsibilities": {"enum": ["pixel", "sample"]},
        "train_stats": {"enum": ["batch", "running"]},
        "init": {"enum": ["first_batch", "random"]},
        "init_std": {"type": "number", "minimum": 0},
        "detach_responsibilities": _BOOL,
        "em": _BOOL,
        "unbiased_var": _BOOL,
    },
    "nbn": {
        "eps": _EPS,
        "momentum": _MOMENTUM,
        "alpha": {"enum": ["shared", "per_layer", "separate"]},
        "alpha_weight_decay": _BOOL,
    },
}

_WEIGHTING = {"enum": ["none", "cb", "inverse"]}
_BETA = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
LOSS_OPTIONS: dict[str, dict[str, dict]] = {
    "ce": {"weighting": _WEIGHTING, "beta": _BETA},
    "balanced_softmax": {"weighting": _WEIGHTING, "beta": _BETA},
    "focal": {"gamma": {"type": "number", "minimum": 0}, "weighting": _WEIGHTING, "beta": _BETA},
    "ldam": {
        "max_m": {"type": "number", "exclusiveMinimum": 0},
        "s": {"type": "number", "exclusiveMinimum": 0},
        "drw": _BOOL,
        "drw_epoch_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "weighting": {"enum": [None, "none", "cb", "inverse"]},
        "beta": _BETA,
    },
    "logit_adjust": {"tau": {"type": "number", "minimum": 0}, "weighting": _WEIGHTING, "beta": _BETA},
}


def options_schema(kind: str, name: str) -> dict:
    """The JSON schema of the ``options`` of norm/loss ``name`` (``kind`` "norm" or "loss")."""
    props = (NORM_OPTIONS if kind == "norm" else LOSS_OPTIONS)[name]
    return {"type": "object", "properties": props, "additionalProperties": False}


SAMPLERS: tuple[str, ...] = ("uniform", "class_balanced", "sqrt", "class_aware")

HEADS: tuple[str, ...] = ("linear", "cosine")

BACKBONES: tuple[str, ...] = (
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet50",
    "resnet152",
    "resnext50_32x4d",
)


def backbone_depth(backbone: str) -> float:
    """The depth of a ResNet-family backbone from its name (``resnet32`` → 32, ``resnext50_32x4d`` → 50),
    ``inf`` for a name without one (sorts after every known depth)."""
    m = re.match(r"res(?:net|next)(\d+)", backbone)
    return float(m.group(1)) if m else math.inf


# kind of part → its names (and options), as methods.check and the error messages use them
PARTS: dict[str, object] = {"norm": NORMS, "loss": LOSSES, "sampler": SAMPLERS, "head": HEADS, "backbone": BACKBONES}
