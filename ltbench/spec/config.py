"""Load and validate a workflow config, and expand it into training cells.

Validation has two layers: the JSON schema (``schemas/config.schema.yaml``: types, ranges,
unknown keys) and name checks against the registries (datasets, methods, backbones). Every
error is a :class:`ConfigError` whose message names the offending key and value.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema
import yaml

from ltbench import data
from ltbench.errors import ConfigError
from ltbench.spec import catalog, methods




@lru_cache(maxsize=None)
def schema() -> dict:
    return yaml.safe_load(resources.files(__package__).joinpath("schemas/config.schema.yaml").read_text())


def _defaults(obj_schema: Mapping) -> dict:
    root = schema()
    if "$ref" in obj_schema:
        obj_schema = root["$defs"][obj_schema["$ref"].split("/")[-1]]
    return {k: copy.deepcopy(v["default"]) for k, v in obj_schema.get("properties", {}).items() if "default" in v}


def train_defaults() -> dict:
    return _defaults(schema()["$defs"]["train"])


def _key(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate(config: Mapping[str, Any]) -> dict:
    """Validate ``config`` and return a copy with every default filled in."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(config),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"config key {_key(e.absolute_path)}: {e.message}" for e in errors[:10]]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    cfg = {**_defaults(schema()), **copy.deepcopy(dict(config))}
    cfg["train"] = {**train_defaults(), **cfg.get("train", {})}
    for name, opts in list(cfg["datasets"].items()):
        cfg["datasets"][name] = {**_defaults(schema()["$defs"]["dataset"]), **opts}
    for ename, exp in cfg["experiments"].items():
        exp.setdefault("seeds", [0, 1, 2])
        exp.setdefault("protocol", "controlled")
        try:  # published: each method runs its `<method>@published` recipe (cells and tables carry that name)
            exp["methods"] = [methods.for_protocol(m, exp["protocol"], cfg.get("methods")) for m in exp["methods"]]
        except KeyError as e:
            raise ConfigError(f"config key experiments.{ename}.methods (protocol {exp['protocol']}): "
                              f"{e.args[0]}") from None
    _check_names(cfg)
    return cfg


def _check_names(cfg: Mapping) -> None:
    extra = cfg["methods"]
    for name in cfg["datasets"]:
        if name not in data.DATASETS:
            raise ConfigError(f"config key datasets.{name}: unknown dataset {name!r}; "
                              f"known: {', '.join(data.DATASETS)}")
    for m, r in extra.items():
        try:
            methods.check(m, methods.recipe(m, extra))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config key methods.{m}: {e.args[0]}") from None
    for ename, exp in cfg["experiments"].items():
        for key, known in (("datasets", list(data.DATASETS)), ("methods", methods.available(extra)),
                           ("backbones", list(catalog.BACKBONES))):
            for i, v in enumerate(exp[key]):
                if v not in known:
                    raise ConfigError(f"config key experiments.{ename}.{key}[{i}]: unknown "
                                      f"{key[:-1]} {v!r}; known: {', '.join(known)}")
        for m in exp["methods"]:
            try:
                methods.check(m, methods.recipe(m, extra))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"config key experiments.{ename}.methods: {e.args[0]}") from None


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    try:
        return validate(methods.merge(raw or {}, overrides or {}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True, order=True)
class Cell:
    dataset: str
    ratio: str
    method: str
    backbone: str
    seed: int

    @property
    def path(self) -> str:
        """Relative directory of the cell's outputs under ``<results_dir>/runs``."""
        return f"{self.dataset}/r{self.ratio}/{self.method}/{self.backbone}/s{self.seed}"


def cells(cfg: Mapping, experiment: str | None = None) -> list[Cell]:
    """The union of all experiments' cells (each once), sorted; or one experiment's cells."""
    out = set()
    for ename, exp in cfg["experiments"].items():
        if experiment is not None and ename != experiment:
            continue
        for d in exp["datasets"]:
            for r in exp["ratios"]:
                for m in exp["methods"]:
                    for b in exp["backbones"]:
                        for s in exp["seeds"]:
                            out.add(Cell(d, data.format_ratio(r), m, b, int(s)))
    return sorted(out)


def cell_spec(cfg: Mapping, dataset: str, method: str, backbone: str) -> dict:
    """Everything a training run needs besides ratio and seed: resolved recipe and settings.

    Training settings merge as: schema defaults < config ``train`` < ``datasets[d].train`` <
    the method recipe's ``train``.
    """
    dopts = {**_defaults(schema()["$defs"]["dataset"]), **cfg["datasets"].get(dataset, {})}
    dspec = data.get(dataset)
    r = methods.recipe(method, cfg["methods"])
    train = {**cfg["train"], **dopts.pop("train", {}), **r.get("train", {})}
    dopts.setdefault("many_threshold", dspec.many_threshold)
    dopts.setdefault("few_threshold", dspec.few_threshold)
    return {"dataset": dataset, "dataset_options": dopts, "method": method, "recipe": r,
            "backbone": backbone, "train": train}


def iter_knobs(spec: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten a spec into ``("train.lr", 0.1)`` pairs (for tidy tables and the report)."""
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            yield from iter_knobs(v, key + ".")
        else:
            yield key, v
