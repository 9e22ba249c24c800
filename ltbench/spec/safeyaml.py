"""``yaml.safe_load`` for files a user writes (configs, reference files), with two refusals.

- A key given twice in one mapping (a second ``train:`` block) is an error naming the key and
  both lines; plain YAML keeps the last one silently. Keys merged in with ``<<: *anchor`` may
  still be overridden, as YAML intends.
- Aliases may not expand to more than :data:`MAX_NODES` values: a file of nested aliases (a
  "billion laughs") loads as a small shared graph, but everything that walks it (validation,
  copies, JSON) would take exponential time. A recursive alias is refused too.

Both raise ``yaml.constructor.ConstructorError`` with the line and column, like a syntax error.
"""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

# Values (scalars, lists, mappings) after expanding every alias; config/config.yaml has about 330.
MAX_NODES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    mark = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader names it below
                    continue
                if mark is not key_node.start_mark:
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key!r}: first on line {mark.line + 1}, again on line "
                        f"{key_node.start_mark.line + 1}",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node) -> int:
    """How many values ``root`` stands for once every alias is expanded (shared nodes counted
    once per reference), computed without expanding; a node that contains itself is refused."""
    size: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            open_.discard(id(node))
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise ConstructorError(None, None, "a recursive alias (a value that contains itself)", node.start_mark)
        open_.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in open_:
                raise ConstructorError(None, None, "a recursive alias (a value that contains itself)", c.start_mark)
            if id(c) not in size:
                stack.append((c, False))
    return size[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(stream: str | bytes | IO) -> Any:
    """``yaml.safe_load(stream)`` with the refusals of the module docstring."""
    loader = _Loader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if (n := expanded_size(node)) > MAX_NODES:
            raise ConstructorError(
                None,
                None,
                f"its aliases expand to {n:,} values, more than {MAX_NODES:,} (nested aliases: a 'billion laughs'?)",
                node.start_mark,
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()
