"""Method recipes: a method is a named combination of registered parts.

Built-in recipes live in ``methods.yaml`` beside this file; a config's ``methods:`` section adds
recipes or overrides built-in ones key by key. :func:`resolve` fills every part's defaults so a
run records exactly what it used.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

import yaml

DEFAULT_RECIPE: dict[str, Any] = {
    "description": "",
    "norm": {"name": "bn", "scope": "all", "options": {}},
    "loss": {"name": "ce", "options": {}},
    "sampler": "uniform",
    "augment": "crop_flip",
    "train": {},
}


@lru_cache(maxsize=None)
def builtin() -> dict[str, dict]:
    text = resources.files("ltbench").joinpath("methods.yaml").read_text()
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


def recipe(name: str, extra: Mapping[str, Mapping] | None = None) -> dict:
    """The full recipe for ``name``: defaults < built-in recipe < config's ``methods[name]``."""
    extra = extra or {}
    if name not in builtin() and name not in extra:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(available(extra))}")
    r = merge(DEFAULT_RECIPE, builtin().get(name, {}))
    return merge(r, extra.get(name, {}))


def check(name: str, r: Mapping) -> None:
    """Raise ``KeyError``/``ValueError`` naming the method and the part if a part is unknown."""
    from ltbench import losses, norm

    for what, registry, part in (("norm", norm.NORMS, r["norm"]["name"]),
                                 ("loss", losses.LOSSES, r["loss"]["name"])):
        if part not in registry:
            raise KeyError(f"method {name!r}: unknown {what} {part!r}; known: {', '.join(registry)}")
