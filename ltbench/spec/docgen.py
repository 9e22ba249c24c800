"""Markdown generated from the code's own sources for the documentation site (docs/hooks.py).

The configuration reference comes from ``schemas/config.schema.yaml`` (every key with its type,
range, default and description) and the methods catalogue from ``methods.yaml`` and
:data:`ltbench.spec.methods.OPEN_DETAILS`, so neither is ever copied by hand. Torch-free, like the
rest of ``ltbench.spec``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

import yaml

from ltbench.spec import catalog, methods

# $defs documented in a section of their own; a key that refers to one links there instead of repeating it.
SECTIONS: dict[str, tuple[str, str]] = {
    "train": ("train", "Training settings (`train`)"),
    "train_override": ("train", "Training settings (`train`)"),
    "experiment": ("experiments.<name>", "Experiments (`experiments.<name>`)"),
    "dataset": ("datasets.<name>", "Datasets (`datasets.<name>`)"),
    "recipe": ("methods.<name>", "Method recipes (`methods.<name>`)"),
    "resource": ("resources.train", "Job resources (`resources.train`, `resources.default`)"),
}
RANGE_KEYS = (
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("minItems", "at least {} items"),
    ("maxItems", "at most {} items"),
    ("minLength", "at least {} characters"),
    ("pattern", "matches `{}`"),
)


def load_schema() -> dict:
    """The workflow configuration's JSON schema, as shipped in the package."""
    text = resources.files("ltbench.spec").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _def_name(node: Mapping) -> str | None:
    ref = node.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref.startswith("#/$defs/") else None


def resolve(schema: Mapping, node: Mapping) -> dict:
    """``node`` with its ``$ref`` chain inlined; the referring node's own keys win."""
    out = dict(node)
    while (name := _def_name(out)) is not None:
        del out["$ref"]
        out = {**schema["$defs"][name], **out}
    return out


def schema_keys(schema: Mapping, node: Mapping | None = None, prefix: str = "") -> Iterator[tuple[str, dict, str]]:
    """Every configuration key as ``(dotted path, resolved node, section)``, depth first; ``<name>``
    stands for a user-chosen mapping key and ``[]`` for a list item. A $def of :data:`SECTIONS` is
    walked once, under its own section's prefix (:func:`sections`): a key that refers to one is
    yielded with that $def's name as ``section`` (else ``""``) and not walked into."""
    node = resolve(schema, schema if node is None else node)
    for key, sub in (node.get("properties") or {}).items():
        path, section = f"{prefix}{key}", _def_name(sub) or ""
        yield path, resolve(schema, sub), section if section in SECTIONS else ""
        if section not in SECTIONS:
            yield from _children(schema, sub, path)
    extra = node.get("additionalProperties")
    if isinstance(extra, Mapping) and "properties" in resolve(schema, extra) and _def_name(extra) not in SECTIONS:
        yield from schema_keys(schema, extra, f"{prefix}<name>.")


def _alternatives(node: Mapping) -> list[Mapping]:
    """The schemas a value may match besides ``node`` itself: ``oneOf`` / ``anyOf`` members and the
    ``then`` / ``else`` of a conditional (e.g. a list of seeds or a mapping of a sequential design)."""
    return [*node.get("oneOf", []), *node.get("anyOf", []), *(node[k] for k in ("then", "else") if k in node)]


def _children(schema: Mapping, sub: Mapping, path: str) -> Iterator[tuple[str, dict, str]]:
    node = resolve(schema, sub)
    yield from schema_keys(schema, node, f"{path}.")
    items = node.get("items")
    if isinstance(items, Mapping) and "properties" in resolve(schema, items):
        yield from schema_keys(schema, items, f"{path}[].")
    for alt in _alternatives(node):
        if "properties" in resolve(schema, alt):
            yield from schema_keys(schema, alt, f"{path}.")


def sections(schema: Mapping) -> list[tuple[str, list[tuple[str, dict, str]]]]:
    """``(title, keys)`` per section: the top level, then each $def of :data:`SECTIONS` once."""
    out = [("Top level", list(schema_keys(schema)))]
    for name, (prefix, title) in SECTIONS.items():
        if all(title != t for t, _ in out):
            out.append((title, list(schema_keys(schema, schema["$defs"][name], f"{prefix}."))))
    return out


def _link(section: str) -> str:
    prefix, title = SECTIONS[section]
    return f"[{prefix}](#{anchor(title)})"


def _type(schema: Mapping, node: Mapping, section: str = "") -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if _alternatives(node) and "type" not in node:
        return " or ".join(_type(schema, resolve(schema, n)) for n in _alternatives(node))
    kind = node.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    text = " or ".join("mapping" if k == "object" else k for k in kinds)
    if "not" in node and node.get("type") == "string":
        text = "path"
    extra = node.get("additionalProperties")
    if isinstance(extra, Mapping) and _def_name(extra) in SECTIONS:
        text += " of name → " + _link(_def_name(extra) or "")
    if section:
        text += ", see " + _link(section)
    return text


def _range(node: Mapping) -> str:
    parts = [fmt.format(node[k]) for k, fmt in RANGE_KEYS if k in node]
    parts = ["not empty" if p == "at least 1 characters" else p for p in parts]
    if node.get("uniqueItems"):
        parts.append("no repeats")
    if "not" in node:
        parts.append("no shell metacharacters, quotes, braces or control characters")
    items = node.get("items")
    if isinstance(items, Mapping) and "enum" in items:
        parts.append("items: " + ", ".join(f"`{v}`" for v in items["enum"]))
    return "; ".join(parts)


def anchor(title: str) -> str:
    """The id MkDocs' toc extension gives a heading (lower case, punctuation dropped, spaces → -)."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return "-".join(keep.split())


def _cell(text: Any) -> str:
    """``text`` on one line for a Markdown table cell: outside `code spans`, ``|`` escaped and
    ``<``/``>`` as entities (so ``<name>`` is text, not an HTML tag); code spans are left as they are."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def config_reference(schema: Mapping | None = None) -> str:
    """The configuration reference as Markdown: one table per section, one row per key."""
    schema = schema or load_schema()
    lines = [_cell(schema.get("description", "")), ""]
    for title, keys in sections(schema):
        lines += [f"## {title}", "", "| key | type | default | range | description |", "|---|---|---|---|---|"]
        for path, node, section in keys:
            default = f"`{json.dumps(node['default'], ensure_ascii=False)}`" if "default" in node else ""
            row = (f"`{path}`", _type(schema, node, section), default, _range(node), node.get("description", ""))
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def combines(name: str) -> list[str]:
    """What recipe ``name`` sets beyond the plain recipe (cross-entropy, BatchNorm, crop + flip):
    ``key=value`` for every resolved setting that differs, norm and loss options only where they
    differ from that part's defaults (ltbench/spec/catalog.py)."""
    r, plain = methods.recipe(name), methods.recipe("plain", {"plain": {}})
    for part, table in (("norm", catalog.NORMS), ("loss", catalog.LOSSES)):
        opts = {k: v for k, v in r[part]["options"].items() if table[r[part]["name"]].get(k) != v}
        r = {**r, part: {**r[part], "options": opts}}
        plain = {**plain, part: {**plain[part], "options": {}}}
    if not r["decoupled"]["enabled"]:
        r = {**r, "decoupled": plain["decoupled"]}
    skip = ("description", "source", "protocol")
    flat, base = _flat(r), _flat(plain)
    return [f"{k}={_value(v)}" for k, v in flat.items() if base.get(k, object()) != v and not k.startswith(skip)]


def open_detail_default(key: str) -> Any:
    """The default of an OPEN_DETAILS key: ``recipe.*`` from DEFAULT_RECIPE (norm/loss options from
    the part that has them, ltbench/spec/catalog.py), ``train.*`` from the schema."""
    head, _, rest = key.partition(".")
    if head == "train":
        return load_schema()["$defs"]["train"]["properties"][rest].get("default")
    parts = rest.split(".")
    if parts[0] in ("norm", "loss") and parts[1:2] == ["options"]:
        table = catalog.NORMS if parts[0] == "norm" else catalog.LOSSES
        return {part: opts[parts[2]] for part, opts in table.items() if parts[2] in opts}
    node: Any = methods.DEFAULT_RECIPE
    for p in parts:
        node = node[p]
    return node


def _recipe_row(name: str, r: Mapping) -> str:
    source = r["source"] or ""
    what = ", ".join(f"`{c}`" for c in combines(name)) or "the plain recipe"
    return "| " + " | ".join(_cell(c) for c in (f"`{name}`", r["description"], what, source)) + " |"


def methods_catalogue() -> str:
    """The methods catalogue as Markdown: every built-in recipe (what it combines, its source),
    every open detail with its default, and each norm and loss with its options."""
    lines = []
    for protocol, title in (("controlled", "Built-in recipes"), ("published", "Published recipes (`M@published`)")):
        lines += [f"## {title}", "", "| method | what | combines | source |", "|---|---|---|---|"]
        for name in methods.builtin():
            r = methods.recipe(name)
            if r["protocol"] == protocol:
                lines.append(_recipe_row(name, r))
        lines.append("")
    lines += [
        "## Open details",
        "",
        "Each detail a paper leaves open is a named key. *default* is its value in a recipe that does not set it "
        "(`DEFAULT_RECIPE`, or the default of the norm layer or loss that has the option); the recipes above that "
        "set it show it under *combines*.",
        "",
        "| key | default | what the papers leave open |",
        "|---|---|---|",
    ]
    for key, text in methods.OPEN_DETAILS.items():
        default = f"`{_value(open_detail_default(key))}`"
        lines.append("| " + " | ".join(_cell(c) for c in (f"`{key}`", default, text)) + " |")
    return "\n".join(lines + ["", *_parts_tables()])


def _parts_tables() -> list[str]:
    lines = ["## Norm layers and losses", "", "| part | option | default | type and range |", "|---|---|---|---|"]
    for kind, defaults, schemas in (
        ("norm", catalog.NORMS, catalog.NORM_OPTIONS),
        ("loss", catalog.LOSSES, catalog.LOSS_OPTIONS),
    ):
        for name, opts in defaults.items():
            for opt, default in opts.items():
                spec = schemas[name][opt]
                row = (f"{kind} `{name}`", f"`{opt}`", f"`{_value(default)}`", f"{_type({}, spec)} {_range(spec)}")
                lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines += ["", "Samplers: " + ", ".join(f"`{s}`" for s in catalog.SAMPLERS) + "."]
    lines += ["Heads: " + ", ".join(f"`{h}`" for h in catalog.HEADS) + "."]
    lines += ["Backbones: " + ", ".join(f"`{b}`" for b in catalog.BACKBONES) + "."]
    return lines
