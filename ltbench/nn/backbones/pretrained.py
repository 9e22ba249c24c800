"""Pretrained initialization from a local file: nothing is fetched from a hub at run time."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def load_pretrained(model: nn.Module, path: str | Path, skip_prefixes: tuple[str, ...] = ("fc.",)) -> nn.Module:
    """Initialize ``model`` from a local state_dict file (e.g. torchvision's ImageNet weights).

    Keys under ``skip_prefixes`` (the classifier, whose class count differs) are not loaded. A
    plain-BN weight or bias of shape (C,) initializes every component of a CBN layer's (M, C)
    affine. Any other key that is missing, unexpected or of another shape is an error listing
    the keys, so a wrong file is caught before training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"train.pretrained: no file {path} (weights are read from a local file, "
            "never downloaded; put e.g. torchvision's resnet152 ImageNet weights there)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and tensor errors alike)
        raise ValueError(f"train.pretrained: {path} is not a loadable state_dict: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    own = model.state_dict()
    load, problems = {}, []
    for key, value in state.items():
        if key.startswith(skip_prefixes):
            continue
        if key not in own:
            problems.append(f"unexpected {key}")
        elif own[key].shape == value.shape:
            load[key] = value
        elif value.dim() == 1 and own[key].dim() == 2 and own[key].shape[1] == value.shape[0]:
            load[key] = value.expand_as(own[key]).clone()  # BN (C,) → every CBN component (M, C)
        else:
            problems.append(f"shape of {key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}")
    norm_specific = ("running_prior", "initialized", "alpha", "alpha_bias", "global_")
    for key in own:
        if (
            key not in state
            and not key.startswith(skip_prefixes)
            and not any(part in key.rsplit(".", 1)[-1] for part in norm_specific)
        ):
            problems.append(f"missing {key}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"train.pretrained: {path} does not match the model: {shown}")
    model.load_state_dict(load, strict=False)
    return model
