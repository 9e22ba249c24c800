"""Reading and checking the papers' reference files (no pandas: the DAG build checks each
experiment's ``reference`` with :func:`check`). The file format, and the tables built from it, are
described in :mod:`ltbench.analysis.reference`, which re-exports this module's functions."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ltbench.errors import ConfigError, ReferenceFileError
from ltbench.spec import safeyaml

#: Keys identifying one cell of results (shared with :mod:`ltbench.analysis.compare`).
CELL_KEYS = ["dataset", "ratio", "method", "backbone", "metric"]

# The packaged files live with the analysis that renders them (ltbench/analysis/reference/); this
# module reads them by path, so that the DAG build checks references without importing that stage.
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "analysis" / "reference"
_SCHEMA_FILE = "schema.yaml"


def _files() -> Path:
    return REFERENCE_DIR


def papers() -> list[str]:
    """Identifiers of the papers with a reference file in this package, sorted."""
    return sorted(
        p.name[: -len(".yaml")] for p in _files().iterdir() if p.name.endswith(".yaml") and p.name != _SCHEMA_FILE
    )


def _schema() -> dict:
    return yaml.safe_load((_files() / _SCHEMA_FILE).read_text(encoding="utf-8"))


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


def _read(paper: str | os.PathLike) -> tuple[str, str]:
    """(source, text) of a packaged paper id or a .yaml path."""
    name = os.fspath(paper)
    if name in papers():
        return f"{name}.yaml", (_files() / f"{name}.yaml").read_text(encoding="utf-8")
    if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        try:
            with open(name, encoding="utf-8") as fh:
                return name, fh.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ReferenceFileError(f"{name}: cannot be read as UTF-8 text ({err})") from None
    raise KeyError(f"unknown paper {name!r}: known papers are {papers()} (or pass a path to a .yaml file)")


@functools.lru_cache(maxsize=16)
def _parsed(source: str, text: str) -> Any:
    """The parsed and validated file; one parse per distinct text (an aggregate asks for each paper once
    per experiment and claim list). Errors are raised, never cached."""
    try:
        data = safeyaml.load(text)
    except yaml.YAMLError as err:
        raise ReferenceFileError(f"{source}: not valid YAML: {err}") from err
    validate(data, source)
    return data


def load(paper: str | os.PathLike) -> dict:
    """Load and validate a paper's reference file.

    ``paper`` is a packaged paper id (see :func:`papers`) or the path of a YAML file in the same format
    (e.g. a user's copy of ``nbn2025.yaml`` with the numbers filled in). Returns the parsed mapping (a
    copy of its own: the file is read every call, parsed once per distinct content). Raises
    :class:`ReferenceFileError` (a ``ValueError``) naming the file and the offending entry/key, or
    ``KeyError`` for an unknown paper id.
    """
    source, text = _read(paper)
    data = copy.deepcopy(_parsed(source, text))
    packaged_id = os.fspath(paper)
    if source == f"{packaged_id}.yaml" and data["paper"] != packaged_id:
        raise ReferenceFileError(f"{source}: 'paper' is {data['paper']!r}, expected {packaged_id!r}")
    return data


def table_label(table: Any) -> str | None:
    """A table given as 2, 2.0, "2" or None -> "2" / None (tables are compared as strings)."""
    if table is None or (isinstance(table, float) and table != table):
        return None
    return str(int(table)) if isinstance(table, (int, float)) else str(table).strip()


def check(ref: Mapping, where: str) -> None:
    """An experiment's ``reference: {paper, table}``: a packaged paper id or a reference file that
    loads and validates, and a table the file has entries for. Raises :class:`ConfigError` naming
    ``where`` (the config key), the paper and the table."""
    try:
        data = load(ref["paper"])
    except KeyError as e:
        raise ConfigError(f"config key {where}.paper: {e.args[0]}") from None
    except ReferenceFileError as e:
        raise ConfigError(f"config key {where}.paper: {e}") from None
    label = table_label(ref.get("table"))
    tables = {t for e in data["entries"] if (t := table_label(e["table"])) is not None}
    if label is not None and label not in tables:
        raise ConfigError(
            f"config key {where}.table: reference {ref['paper']!r} has no table {ref['table']!r}; "
            f"its tables: {', '.join(sorted(tables, key=lambda t: (len(t), t)))}"
        )
