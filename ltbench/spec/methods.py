"""Method recipes: a method is a named combination of registered parts.

Built-in recipes live in ``methods.yaml`` beside this file; a config's ``methods:`` section adds
recipes or overrides built-in ones key by key. :func:`resolve` fills every part's defaults so a
run records exactly what it used.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import yaml

from ltbench.spec import catalog

# Every recipe key with its default. Keys that encode a detail the papers leave open are
# documented in OPEN_DETAILS (listed in the report with the values each run used).
DEFAULT_RECIPE: dict[str, Any] = {
    "description": "",
    "protocol": "controlled",  # "published": the authors' own recipe (an `M@published` recipe, see for_protocol)
    "source": "",  # repository + file the recipe follows (published recipes)
    "norm": {"name": "bn", "scope": "all", "options": {}},
    "loss": {"name": "ce", "options": {}},
    "head": "linear",
    "sampler": "uniform",
    "augment": "crop_flip",
    "strong_view": {"policy": "torchvision", "cutout": False},
    "views": None,  # None: [weak] for crop_flip, [strong] for autoaugment, [none] for none
    "paths": ["compound"],
    "classify_on": None,  # None: the last view of every path, e.g. ["compound/strong", "split/strong"]
    "consistency": {"weight": 0.0, "pairing": "cross"},
    "decoupled": {
        "enabled": False,
        "fraction": 0.2,
        "classifier": "crt",
        "loss": "ce",
        "sampler": "uniform",
        "reweight": "none",
        "reinit": True,
        "lr": None,
        "tau": 1.0,
        "select_tau": False,
        "tau_grid": [0.0, 2.0, 0.1],
        "backbone_mode": "train",
    },
    "posthoc_tau": None,
    "logit_rectification": False,
    "train": {},
    "dataset_train": {},  # {dataset: train settings} over `train` (published recipes with per-dataset lengths)
    "datasets": None,  # datasets the recipe applies to (None = any)
}

OPEN_DETAILS: dict[str, str] = {
    "recipe.classify_on": "CBN Eq. 20 applies Balanced Softmax to the strong-view prediction; whether the split path "
    "and the weak view also get it is not stated (default: strong view of both paths).",
    "recipe.consistency.pairing": "CBN Eq. 19's exact pairing: "
    "'cross' = −½[cos(z^c_s, sg(z^s_w)) + cos(z^s_s, sg(z^c_w))].",
    "recipe.consistency.weight": "Weight of the consistency loss relative to Balanced Softmax (not stated; default 1).",
    "recipe.paths": "What 'Baseline + SBN' trains: compound and split paths with the compound EM "
    "switched off (em: false).",
    "recipe.decoupled.fraction": "CBN Table 3: 80% of epochs representation, 20% classifier (stated).",
    "recipe.decoupled.reinit": "Whether the classifier is re-initialized at the start of the classifier "
    "stage (cRT: yes).",
    "recipe.decoupled.reweight": "RW in the classifier stage: class-balanced weights (β = 0.9999) by default.",
    "recipe.decoupled.loss": "Loss of the classifier stage (not stated by CBN Table 3; default cross-entropy as in "
    "cRT: the representation's Balanced Softmax on top of RS/RW would correct the imbalance twice).",
    "recipe.head": "Classifier layer: linear, or cosine (LDAM-DRW's NormedLinear, which LDAM's s = 30 assumes).",
    "recipe.decoupled.backbone_mode": "Mode of the frozen backbone in the classifier stage: 'train' (Kang et al.'s "
    "classifier-balancing code keeps every network in train mode: BN normalizes with "
    "the stage's class-balanced batch statistics and re-estimates its running "
    "statistics; default) or 'eval' (running statistics of the representation stage, "
    "unchanged). Not stated by CBN Table 3 or Kang et al.'s paper.",
    "recipe.decoupled.lr": "Classifier-stage learning rate (null = the representation stage's lr), "
    "cosine over the stage.",
    "recipe.norm.options.train_stats": "CBN open detail 1: normalize with batch statistics (as BN does in training) or "
    "the running statistics during training (default batch).",
    "recipe.norm.options.responsibilities": "CBN open detail 2: responsibilities per pixel (as the equations read; "
    "default) or per sample (spatially pooled).",
    "recipe.norm.options.init": "CBN open detail 3: symmetry-breaking component init: first_batch (M distinct points "
    "of the first batch; default) or random (N(0, init_std²) means).",
    "recipe.norm.options.em": "CBN open detail 6: 'Baseline + SBN' = em: false, a plain-BN compound path used at test, "
    "the components only for the split path.",
    "recipe.norm.options.detach_responsibilities": "CBN: whether gradients flow through the E-step responsibilities "
    "(default: yes, as autograd gives them).",
    "recipe.norm.options.alpha": "NBN open detail 2: one α shared by every normalized layer (public code; default), "
    "per layer, or separate α for weight and bias.",
    "recipe.norm.options.alpha_weight_decay": "NBN open detail 3: whether α gets weight decay (public code: yes).",
    "recipe.norm.scope": "Which BN layers are replaced: CBN 'all' (by default reading; open detail 5); NBN "
    "'last_stage' (public code; NBN open detail 1 for the CIFAR ResNet-32).",
    "recipe.logit_rectification": "NBN open detail 4: whether logit rectification (BatchNorm1d without affine on the "
    "logits) is part of the NBN rows (default: no, as the official ResNet-50 / "
    "ResNeXt-50 configs; only their RIDE-ensemble config has it: method nbn+rect).",
    "recipe.norm.options.mean_momentum": "CBN (not stated by the paper): the running statistics (means, and "
    "likewise variances and priors with their momenta) move by the momentum "
    "once per forward pass in training mode, so the full method (compound + "
    "split path × weak + strong view) moves them 4 times per optimizer step, "
    "Baseline + CBN once.",
    "train.weight_decay": "CBN: weight decay not stated (default 2e-4, the LDAM-DRW value).",
    "train.momentum": "CBN: SGD momentum not stated (default 0.9).",
    "train.warmup_epochs": "CBN: warmup not stated (default 5 epochs, the LDAM-DRW convention).",
    "train.warmup_per": "Whether the linear warmup ramps every optimizer step ('step', default) or once per epoch "
    "('epoch': lr × (e+1)/warmup_epochs in epoch e, as LDAM-DRW's adjust_learning_rate).",
    "recipe.decoupled.select_tau": "τ-normalization: τ chosen from tau_grid (0, 0.1, …, 2) by balanced accuracy on a "
    "validation split (Kang et al.), never the test set; tau-norm: yes. The split: the "
    "dataset's own val list, or for CIFAR-style data the held-out images "
    "(datasets.<name>.val_per_class).",
    "recipe.strong_view.policy": "CBN says only 'AutoAugment': torchvision's CIFAR10 policy with fill 0 (default) "
    "or cifar10_policy, the CIFAR10Policy reimplementation most LT code copies "
    "(Balanced Softmax's CIFAR pipeline), fill 128.",
    "recipe.strong_view.cutout": "Cutout(1 hole, 16 px) after AutoAugment, as Balanced Softmax's CIFAR pipeline "
    "(default: off; CBN does not mention it).",
}

VIEWS_OF_AUGMENT = {"crop_flip": ["weak"], "autoaugment": ["strong"], "none": ["none"]}


@cache
def builtin() -> dict[str, dict]:
    text = resources.files(__package__).joinpath("methods.yaml").read_text()
    return yaml.safe_load(text) or {}


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict merge: ``override`` wins, nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def available(extra: Mapping[str, Mapping] | None = None) -> list[str]:
    return sorted(set(builtin()) | set(extra or {}))


def _raw(name: str, extra: Mapping[str, Mapping], chain: tuple[str, ...] = ()) -> dict:
    """A recipe as written, with ``extends`` resolved (the parent first, then this recipe)."""
    if name not in builtin() and name not in extra:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(available(extra))}")
    if name in chain:
        raise ValueError(f"method {name!r}: 'extends' forms a cycle: {' -> '.join(chain + (name,))}")
    own = merge(builtin().get(name, {}), extra.get(name, {}))
    parent = own.pop("extends", None)
    if parent is None:
        return own
    try:
        base = _raw(parent, extra, chain + (name,))
    except KeyError as e:
        raise KeyError(f"method {name!r} extends {parent!r}: {e.args[0]}") from None
    base.pop("description", None)
    return merge(base, own)


PROTOCOLS = ("controlled", "published")
PUBLISHED = "@published"


def for_protocol(name: str, protocol: str, extra: Mapping[str, Mapping] | None = None) -> str:
    """The recipe an experiment of ``protocol`` runs for method ``name``: ``name`` itself under
    ``controlled``; ``name@published`` under ``published`` (a name already ending so is kept).
    Raises ``KeyError`` naming the method when it has no published recipe."""
    if protocol not in PROTOCOLS:
        raise KeyError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "controlled" or name.endswith(PUBLISHED):
        return name
    published = name + PUBLISHED
    if published not in available(extra):
        have = sorted(m[: -len(PUBLISHED)] for m in available(extra) if m.endswith(PUBLISHED))
        raise KeyError(
            f"method {name!r} has no published recipe {published!r} (define it under methods:, or "
            f"use protocol: controlled); methods with one: {', '.join(have)}"
        )
    return published


def recipe(name: str, extra: Mapping[str, Mapping] | None = None) -> dict:
    """The full recipe for ``name``: defaults < built-in recipe (and the one it ``extends``) < the
    config's ``methods[name]``; the norm layer's and loss's options are completed with their
    defaults so that a run records every value it used."""
    extra = extra or {}
    r = merge(DEFAULT_RECIPE, _raw(name, extra))
    if r["views"] is None:
        r["views"] = list(VIEWS_OF_AUGMENT[r["augment"]])
    if r["classify_on"] is None:
        r["classify_on"] = [f"{p}/{r['views'][-1]}" for p in r["paths"]]
    for part, table in (("norm", catalog.NORMS), ("loss", catalog.LOSSES)):
        if r[part]["name"] in table:
            r[part]["options"] = {**table[r[part]["name"]], **r[part]["options"]}
    return r


def step_logits(recipe: Mapping) -> list[str]:
    """The ``"path/view"`` logits one training step computes, in forward order (paths, then views):
    the pairs that get the classification loss (``classify_on``), and every path × view pair when a
    consistency loss is on (CBN's DPL, Eq. 19: 2 paths × 2 views). ``recipe`` is resolved (:func:`recipe`)."""
    wanted = set(recipe["classify_on"])
    if recipe["consistency"]["weight"] > 0:
        wanted |= {f"{p}/{v}" for p in recipe["paths"] for v in recipe["views"]}
    return [f"{p}/{v}" for p in recipe["paths"] for v in recipe["views"] if f"{p}/{v}" in wanted]


def passes(recipe: Mapping) -> int:
    """Forward passes per training step (1 for a plain recipe, 4 for CBN's DPL)."""
    return len(step_logits(recipe))


def check(name: str, r: Mapping) -> None:
    """Raise ``KeyError``/``ValueError`` naming the method and the offending part."""
    for what, names, part in (
        ("norm", catalog.NORMS, r["norm"]["name"]),
        ("loss", catalog.LOSSES, r["loss"]["name"]),
        ("decoupled.loss", catalog.LOSSES, r["decoupled"]["loss"]),
        ("sampler", catalog.SAMPLERS, r["sampler"]),
        ("decoupled.sampler", catalog.SAMPLERS, r["decoupled"]["sampler"]),
        ("head", catalog.HEADS, r["head"]),
    ):
        if part not in names:
            raise KeyError(f"method {name!r}: unknown {what} {part!r}; known: {', '.join(sorted(names))}")
    for what, table in (("norm", catalog.NORMS), ("loss", catalog.LOSSES)):
        known = table[r[what]["name"]]
        for opt in r[what]["options"]:
            if opt not in known:
                raise KeyError(
                    f"method {name!r}: {what} {r[what]['name']!r} has no option {opt!r}; known: {', '.join(known)}"
                )
    if r["decoupled"]["enabled"] and r["head"] != "linear":
        raise ValueError(f"method {name!r}: the decoupled classifier stage needs head: linear, not {r['head']!r}")
    produced = {f"{p}/{v}" for p in r["paths"] for v in r["views"]}
    for k in r["classify_on"]:
        if k not in produced:
            raise ValueError(
                f"method {name!r}: classify_on {k!r} is not one of the path/view pairs it "
                f"trains ({', '.join(sorted(produced))})"
            )
    if "split" in r["paths"] and r["norm"]["name"] != "cbn":
        raise ValueError(f"method {name!r}: paths [.., split] (SBN) needs norm cbn, not {r['norm']['name']!r}")
    if r["consistency"]["weight"] > 0 and (
        set(r["views"]) != {"weak", "strong"} or set(r["paths"]) != {"compound", "split"}
    ):
        raise ValueError(
            f"method {name!r}: consistency.weight > 0 needs views [weak, strong] and paths [compound, split]"
        )
