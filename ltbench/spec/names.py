"""Display names of datasets, methods and backbones as the papers write them (the report's tables and
figures, and the claims of the aggregate's ``findings.csv``). No heavy imports: every stage may use it."""

from __future__ import annotations

import re

DATASET_NAMES = {
    "cifar10": "CIFAR-10-LT",
    "cifar100": "CIFAR-100-LT",
    "digits-lt": "digits-LT",
    "fashion-mnist": "Fashion-MNIST-LT",
    "imagenet-lt": "ImageNet-LT",
    "places-lt": "Places-LT",
    "inat2018": "iNaturalist 2018",
}
# Display names of the methods the reference files name in lowercase (the papers' spelling).
METHOD_NAMES = {
    "mislas": "MiSLAS",
    "lade": "LADE",
    "ace": "ACE",
    "dro-lt": "DRO-LT",
    "paco": "PaCo",
    "dive": "DiVE",
    "ssd": "SSD",
    "ib+focal": "IB + Focal",
    "vs": "VS",
    "tcm": "TCM",
    "disalign": "DisAlign",
    "gistnet": "GistNet",
    "ce": "Cross-entropy",
    "focal": "Focal",
    "cb-focal": "CB-Focal",
    "ldam-drw": "LDAM-DRW",
    "balanced-softmax": "Balanced Softmax",
    "la": "Logit adjustment (loss)",
    "la-posthoc": "Logit adjustment (post hoc)",
    "crt": "cRT",
    "tau-norm": "τ-norm",
    "lws": "LWS",
    "nbn": "NBN",
}
_TOKENS = {
    "baseline": "Baseline",
    "cbn": "CBN",
    "sbn": "SBN",
    "dpl": "DPL",
    "dt": "DT",
    "rw": "RW",
    "rs": "RS",
    "bn": "BN",
    "nbn": "NBN",
    "ce": "CE",
}


def method_name(method: str) -> str:
    """'baseline+cbn+sbn' -> 'Baseline + CBN + SBN'; known names as in papers; others as given."""
    if method in METHOD_NAMES:
        return METHOD_NAMES[method]
    parts = method.split("+")
    if all(p in _TOKENS for p in parts):
        return " + ".join(_TOKENS[p] for p in parts)
    return method


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def backbone_name(backbone: str) -> str:
    """'resnet32' -> 'ResNet-32'; other names as given."""
    m = re.fullmatch(r"resnet(\d+)", backbone)
    return f"ResNet-{m.group(1)}" if m else backbone
