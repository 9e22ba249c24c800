"""Load and validate a workflow config, and expand it into training cells.

Validation has two layers: the JSON schema (``schemas/config.schema.yaml``: types, ranges,
unknown keys) and name checks against the registries (datasets, methods, backbones). Every
error is a :class:`ConfigError` whose message names the offending key and value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ltbench import data
from ltbench.errors import ConfigError
from ltbench.spec import catalog, methods, references, safeyaml, seeds

# JSON schema's "integer" admits 4.0; a count or a seed must be a real int (and never a bool).
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)


@cache
def schema() -> dict:
    return yaml.safe_load(resources.files(__package__).joinpath("schemas/config.schema.yaml").read_text())


def _defaults(obj_schema: Mapping) -> dict:
    root = schema()
    if "$ref" in obj_schema:
        obj_schema = root["$defs"][obj_schema["$ref"].split("/")[-1]]
    return {k: copy.deepcopy(v["default"]) for k, v in obj_schema.get("properties", {}).items() if "default" in v}


def train_defaults() -> dict:
    return _defaults(schema()["$defs"]["train"])


def _key(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _message(e: jsonschema.ValidationError) -> str:
    """jsonschema's message, or the schema's own ``x-error`` text (also from an ``anyOf`` branch)."""
    for err in (e, *e.context):
        if isinstance(err.schema, Mapping) and "x-error" in err.schema:
            return f"{e.instance!r} {err.schema['x-error']}"
    return e.message


def schema_errors(instance: Any, sub: str | Mapping | None = None) -> list[tuple[str, str]]:
    """(key path, message) of every violation of the config schema, or of its definition
    ``sub`` (a ``$defs`` name) or of the schema fragment ``sub``; non-finite numbers included."""
    root = schema()
    target = (
        root
        if sub is None
        else {"$defs": root["$defs"], "$ref": f"#/$defs/{sub}"}
        if isinstance(sub, str)
        else {"$defs": root["$defs"], **sub}
    )
    errors = sorted(_Validator(target).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    out = [(_key(e.absolute_path), _message(e)) for e in errors]
    return out + [(k, f"{v!r} is not a finite number") for k, v in _non_finite(instance)]


def _non_finite(obj: Any, path: tuple = ()) -> Iterator[tuple[str, float]]:
    if isinstance(obj, float) and not math.isfinite(obj):
        yield _key(path), obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _non_finite(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _non_finite(v, (*path, i))


def validate(config: Mapping[str, Any]) -> dict:
    """Validate ``config`` and return a copy with every default filled in."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    errors = schema_errors(config)
    if errors:
        lines = [f"config key {k}: {msg}" for k, msg in errors[:10]]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    cfg = {**_defaults(schema()), **copy.deepcopy(dict(config))}
    cfg["train"] = {**train_defaults(), **cfg.get("train", {})}
    for name, opts in list(cfg["datasets"].items()):
        cfg["datasets"][name] = {**_defaults(schema()["$defs"]["dataset"]), **opts}
    state = None
    for ename, exp in cfg["experiments"].items():
        exp.setdefault("seeds", [0, 1, 2])
        if isinstance(exp["seeds"], Mapping):  # a sequential design: the grid file gives each cell's seeds
            state = seeds.read_state(cfg) if state is None else state
            exp["sequential"] = seeds.expand(ename, exp["seeds"], state, str(seeds.state_path(cfg)))
            exp["seeds"] = list(range(max([exp["sequential"]["initial"], *exp["sequential"]["cells"].values()])))
        exp.setdefault("protocol", "controlled")
        try:  # published: each method runs its `<method>@published` recipe (cells and tables carry that name)
            exp["methods"] = [methods.for_protocol(m, exp["protocol"], cfg.get("methods")) for m in exp["methods"]]
        except KeyError as e:
            raise ConfigError(
                f"config key experiments.{ename}.methods (protocol {exp['protocol']}): {e.args[0]}"
            ) from None
    _check_names(cfg)
    return cfg


def _check_names(cfg: Mapping) -> None:
    extra = cfg["methods"]
    for name in cfg["datasets"]:
        if name not in data.DATASETS:
            raise ConfigError(
                f"config key datasets.{name}: unknown dataset {name!r}; known: {', '.join(data.DATASETS)}"
            )
    for m in extra:
        try:
            check_recipe(m, methods.recipe(m, extra))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config key methods.{m}: {e.args[0]}") from None
    for ename, exp in cfg["experiments"].items():
        for key, known in (
            ("datasets", list(data.DATASETS)),
            ("methods", methods.available(extra)),
            ("backbones", list(catalog.BACKBONES)),
        ):
            for i, v in enumerate(exp[key]):
                if v not in known:
                    raise ConfigError(
                        f"config key experiments.{ename}.{key}[{i}]: unknown "
                        f"{key[:-1]} {v!r}; known: {', '.join(known)}"
                    )
        try:
            for d in exp["datasets"]:
                for m in exp["methods"]:
                    check_spec(cell_spec(cfg, d, m, exp["backbones"][0]))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config key experiments.{ename}.methods: {e.args[0]}") from None
        if exp.get("reference"):
            references.check(exp["reference"], f"experiments.{ename}.reference")
        for d in exp["datasets"]:
            for i, r in enumerate(exp["ratios"]):
                try:
                    check_ratio(d, r, cfg["datasets"].get(d, {}).get("profile", "exp"))
                except ConfigError as e:
                    raise ConfigError(f"config key experiments.{ename}.ratios[{i}]: {e}") from None


def check_recipe(name: str, r: Mapping) -> None:
    """Names (``methods.check``), then the type and range of every recipe key and of every
    norm/loss option (:data:`catalog.NORM_OPTIONS`, :data:`catalog.LOSS_OPTIONS`). Raises
    ``KeyError``/``ConfigError`` naming the method, the key and the value."""
    methods.check(name, r)
    for key, msg in schema_errors(dict(r), "recipe"):
        raise ConfigError(f"method {name!r}: recipe key {key}: {msg}")
    for part in ("norm", "loss"):
        pname = r[part]["name"]
        for key, msg in schema_errors(r[part]["options"], catalog.options_schema(part, pname)):
            raise ConfigError(f"method {name!r}: {part} {pname!r} option {key}: {msg}")


SPEC_KEYS = ("dataset", "dataset_options", "method", "recipe", "backbone", "train")


def parse_spec(obj: Any, where: str) -> dict:
    """A resolved cell spec given as JSON (``train --spec``): a mapping with :data:`SPEC_KEYS`."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: a cell spec must be a JSON object, not {type(obj).__name__}")
    if missing := [k for k in SPEC_KEYS if k not in obj]:
        raise ConfigError(f"{where}: not a cell spec; it lacks the key(s) {', '.join(missing)}")
    if not all(isinstance(obj[k], Mapping) for k in ("dataset_options", "recipe", "train")):
        raise ConfigError(f"{where}: not a cell spec; dataset_options, recipe and train must be objects")
    return dict(obj)


def _check_warmup(m: str, train: Mapping) -> None:
    """The linear warmup must end before training does, or the run never reaches ``train.lr``."""
    w, e = train["warmup_epochs"], train["epochs"]
    if w >= e:
        raise ConfigError(
            f"method {m!r}: train.warmup_epochs {w:g} is not below train.epochs {e}: "
            "the learning rate would never reach train.lr"
        )


def check_spec(spec: Mapping) -> None:
    """A cell's resolved settings: the merged ``train`` block against the schema, and the keys
    that depend on it (the decoupled stages must both get epochs; the warmup ends before training
    does)."""
    m, train, dt = spec["method"], spec["train"], spec["recipe"]["decoupled"]
    check_recipe(m, spec["recipe"])
    where = spec["recipe"]["datasets"]
    if where is not None and spec["dataset"] not in where:
        raise ConfigError(
            f"method {m!r} applies only to {', '.join(where)} (recipe key datasets), not to {spec['dataset']!r}"
        )
    for key, msg in schema_errors(dict(train), "train"):
        raise ConfigError(
            f"method {m!r} on {spec['dataset']}: train.{key}: {msg}"
            if key != "(top level)"
            else f"method {m!r} on {spec['dataset']}: train: {msg}"
        )
    if dt["enabled"] and dt["classifier"] != "tau_norm":
        head = int(round(dt["fraction"] * train["epochs"]))  # as the trainer splits the epochs
        for stage, n in (("classifier", head), ("representation", train["epochs"] - head)):
            if n < 1:
                raise ConfigError(
                    f"method {m!r}: decoupled.fraction {dt['fraction']} leaves no {stage} "
                    f"epoch of train.epochs {train['epochs']}"
                )
    _check_warmup(m, train)


def check_ratio(dataset: str, ratio: float, profile: str = "exp") -> None:
    """A finite ratio ≥ 1 that leaves every class of ``dataset`` at least one training image."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio < 1:
        raise ConfigError(f"imbalance ratio must be a finite number >= 1, got {ratio!r}")
    spec = data.get(dataset)
    if getattr(spec, "image_lists", False):
        return  # counts come from the training list (prepare checks its ratio)
    counts = data.longtail_counts(spec.num_classes, spec.n_max, ratio, profile)
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        raise ConfigError(
            f"imbalance ratio {ratio:g} leaves {len(empty)} class(es) of {dataset} without "
            f"training images (first: class {empty[0]}; the head class has {spec.n_max}); "
            f"use a ratio of at most {spec.n_max}"
        )


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """:func:`ltbench.spec.safeyaml.load` of a file (no duplicate keys, bounded aliases); every
    problem is a :class:`ConfigError` naming the file, and a syntax error the line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return safeyaml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{what} {path}{where}: not valid YAML ({problem})") from None


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    path = Path(path)
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys, not a {type(raw).__name__}")
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
    """The union of all experiments' cells (each once), sorted; or one experiment's cells. A sequential
    experiment's cell has the seeds the grid file gives it (:func:`ltbench.spec.seeds.cell_seeds`)."""
    out = set()
    for ename, exp in cfg["experiments"].items():
        if experiment is not None and ename != experiment:
            continue
        for d in exp["datasets"]:
            for r in exp["ratios"]:
                for m in exp["methods"]:
                    for b in exp["backbones"]:
                        ratio = data.format_ratio(r)
                        for s in seeds.cell_seeds(exp, seeds.cell_key(d, ratio, m, b)):
                            out.add(Cell(d, ratio, m, b, int(s)))
    return sorted(out)


def cell_spec(cfg: Mapping, dataset: str, method: str, backbone: str) -> dict:
    """Everything a training run needs besides ratio and seed: resolved recipe and settings.

    Training settings merge as: schema defaults < config ``train`` < ``datasets[d].train`` <
    the method recipe's ``train`` < the recipe's ``dataset_train[d]``.
    """
    dopts = {**_defaults(schema()["$defs"]["dataset"]), **cfg["datasets"].get(dataset, {})}
    dspec = data.get(dataset)
    r = methods.recipe(method, cfg["methods"])
    train = {**cfg["train"], **dopts.pop("train", {}), **r.get("train", {}), **r["dataset_train"].get(dataset, {})}
    dopts.setdefault("many_threshold", dspec.many_threshold)
    dopts.setdefault("few_threshold", dspec.few_threshold)
    return {
        "dataset": dataset,
        "dataset_options": dopts,
        "method": method,
        "recipe": r,
        "backbone": backbone,
        "train": train,
    }


def figure_kinds(exp: Mapping) -> tuple[str, ...]:
    """The figures an experiment asks for: its ``figure`` (one name or a list) as a tuple, () for none."""
    kinds = exp.get("figure") or ()
    return (kinds,) if isinstance(kinds, str) else tuple(kinds)


def iter_knobs(spec: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten a spec into ``("train.lr", 0.1)`` pairs (for tidy tables and the report)."""
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            yield from iter_knobs(v, key + ".")
        else:
            yield key, v
