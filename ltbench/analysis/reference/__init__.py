"""Reference numbers reported by the papers ltbench reproduces.

Each paper has one YAML file in this package (``cbn2022.yaml``, ``nbn2025.yaml``) with

- ``paper``: the identifier (equal to the file name without ``.yaml``),
- ``metadata``: title, authors, venue, year, arXiv id, url, code,
- ``setup`` (free form): datasets, backbones, recipe facts,
- ``qualitative_claims``: claims without recoverable numbers (e.g. only shown in a figure),
- ``claims``: claimed gains ``{id, table, description, method, over, backbone, cells, metric?, note?}``
  (``table: null``: the entries may come from any table),
- ``entries``: a flat list, one per reported number:
  ``{table, row?, dataset, ratio, method, backbone, metric, value, quoted, note?}``.
  ``value: null`` means "not reported" (e.g. a '–' cell, or a number not available to us).

Every file is validated against ``schema.yaml`` (JSON Schema written in YAML) when loaded. A file that
does not conform raises :class:`ReferenceFileError`, whose message names the file, the offending entry
(by index and its table/method/dataset) and the key.

>>> entries("cbn2022").query("table == 2 and method == 'baseline'").shape[0]
6
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

import jsonschema
import pandas as pd
import yaml

from ltbench.errors import ReferenceFileError

__all__ = ["ReferenceFileError", "load", "entries", "papers", "validate", "ENTRY_COLUMNS", "CELL_KEYS"]

#: Columns of :func:`entries` (``paper`` first, then the entry keys of the YAML files).
ENTRY_COLUMNS = ["paper", "table", "row", "dataset", "ratio", "method", "backbone", "metric", "value", "quoted", "note"]
#: Keys identifying one cell of results (shared with :mod:`ltbench.analysis.compare`).
CELL_KEYS = ["dataset", "ratio", "method", "backbone", "metric"]

_PACKAGE = __name__
_SCHEMA_FILE = "schema.yaml"


def _files() -> Any:
    return resources.files(_PACKAGE)


def papers() -> list[str]:
    """Identifiers of the papers with a reference file in this package, sorted."""
    return sorted(
        p.name[: -len(".yaml")] for p in _files().iterdir() if p.name.endswith(".yaml") and p.name != _SCHEMA_FILE
    )


def _schema() -> dict:
    return yaml.safe_load(_files().joinpath(_SCHEMA_FILE).read_text(encoding="utf-8"))


def _describe(data: Any, path: list) -> str:
    """Human description of the location ``path`` inside a loaded file (e.g. an entry's key fields)."""
    if not path:
        return "top level"
    where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
    if len(path) >= 2 and path[0] in ("entries", "claims") and isinstance(path[1], int):
        try:
            item = data[path[0]][path[1]]
        except (KeyError, IndexError, TypeError):
            item = None
        if isinstance(item, dict):
            ident = ", ".join(
                f"{k}={item[k]!r}" for k in ("id", "table", "row", "method", "dataset", "ratio", "metric") if k in item
            )
            where = f"{where} ({ident})"
    return where


def validate(data: Any, source: str = "<data>") -> None:
    """Check a loaded reference file; raise :class:`ReferenceFileError` naming ``source``.

    Checks the JSON schema, then that no two entries share (table, dataset, ratio, method, backbone,
    metric) and that every claim's ``method`` and ``over`` have an entry in the claim's table for each of
    its cells (so the paper's claimed gain can be derived; a claim with ``table: null`` may use an entry of
    any table).
    """
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(
        validator.iter_errors(data),
        key=lambda e: [(0, p, "") if isinstance(p, int) else (1, 0, p) for p in e.absolute_path],
    )
    if errors:
        # A missing or unexpected key is named in the message; any other key ends the path.
        lines = [f"  {_describe(data, list(err.absolute_path))}: {err.message}" for err in errors[:10]]
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ReferenceFileError(f"{source}: {len(errors)} schema error(s):\n" + "\n".join(lines) + more)

    seen: dict[tuple, int] = {}
    for i, e in enumerate(data["entries"]):
        key = (e["table"],) + tuple(e[k] for k in CELL_KEYS)
        if key in seen:
            raise ReferenceFileError(
                f"{source}: {_describe(data, ['entries', i])} duplicates entries[{seen[key]}] "
                "(same table, dataset, ratio, method, backbone, metric)"
            )
        seen[key] = i
    any_table = {key[1:] for key in seen}
    for i, c in enumerate(data.get("claims", [])):
        for m in (c["method"], c["over"]):
            for cell in c["cells"]:
                key = (cell["dataset"], cell["ratio"], m, c["backbone"], c.get("metric", "top1"))
                if (key not in any_table) if c["table"] is None else ((c["table"],) + key not in seen):
                    raise ReferenceFileError(
                        f"{source}: {_describe(data, ['claims', i])}: no entry for method {m!r} on "
                        f"{cell['dataset']} ratio {cell['ratio']} ({c['backbone']}, {c.get('metric', 'top1')}) "
                        f"in table {c['table']!r}"
                    )


def _read(paper: str | os.PathLike) -> tuple[Any, str]:
    name = os.fspath(paper)
    if name in papers():
        source, text = f"{name}.yaml", _files().joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    elif name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        with open(name, encoding="utf-8") as fh:
            source, text = name, fh.read()
    else:
        raise KeyError(f"unknown paper {name!r}: known papers are {papers()} (or pass a path to a .yaml file)")
    try:
        return yaml.safe_load(text), source
    except yaml.YAMLError as err:
        raise ReferenceFileError(f"{source}: not valid YAML: {err}") from err


def load(paper: str | os.PathLike) -> dict:
    """Load and validate a paper's reference file.

    ``paper`` is a packaged paper id (see :func:`papers`) or the path of a YAML file in the same format
    (e.g. a user's copy of ``nbn2025.yaml`` with the numbers filled in). Returns the parsed mapping.
    Raises :class:`ReferenceFileError` (a ``ValueError``) naming the file and the offending entry/key,
    or ``KeyError`` for an unknown paper id.
    """
    data, source = _read(paper)
    validate(data, source)
    packaged_id = os.fspath(paper)
    if source == f"{packaged_id}.yaml" and data["paper"] != packaged_id:
        raise ReferenceFileError(f"{source}: 'paper' is {data['paper']!r}, expected {packaged_id!r}")
    return data


def entries(paper: str | os.PathLike) -> pd.DataFrame:
    """One row per reference entry of ``paper`` (id or path), columns :data:`ENTRY_COLUMNS`.

    ``value`` is float with NaN where the paper reports nothing (null in the file); ``row`` and ``note``
    are missing where absent; ``table`` is a nullable integer.
    """
    data = load(paper)
    df = pd.DataFrame(
        [{**{k: None for k in ENTRY_COLUMNS}, **e, "paper": data["paper"]} for e in data["entries"]],
        columns=ENTRY_COLUMNS,
    )
    return df.astype(
        {"table": "Int64", "ratio": "int64", "value": "float64", "quoted": "bool", "row": "str", "note": "str"}
    )
