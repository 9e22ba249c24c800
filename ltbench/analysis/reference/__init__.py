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
(by index and its table/method/dataset) and the key. Reading and checking the files (no pandas) is
:mod:`ltbench.spec.references`, which the DAG build uses to check each experiment's ``reference``.

>>> entries("cbn2022").query("table == 2 and method == 'baseline'").shape[0]
6
"""

from __future__ import annotations

import os

import pandas as pd

from ltbench.errors import ReferenceFileError
from ltbench.spec.references import CELL_KEYS, load, papers, validate

__all__ = ["ReferenceFileError", "load", "entries", "papers", "validate", "ENTRY_COLUMNS", "CELL_KEYS"]

#: Columns of :func:`entries` (``paper`` first, then the entry keys of the YAML files).
ENTRY_COLUMNS = ["paper", "table", "row", "dataset", "ratio", "method", "backbone", "metric", "value", "quoted", "note"]


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
