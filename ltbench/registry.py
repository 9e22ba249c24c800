"""Name → factory registries (timm's ``@register_model`` idea).

Methods, losses, norm layers, backbones and datasets are added by name with a decorator and
looked up by the names used in config files. An unknown name raises a ``KeyError`` whose
message lists the known names, so a typo in a config is caught with a useful error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Factory = Callable[..., Any]


def choice(what: str, value: Any, allowed: tuple) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming ``what`` and the known values."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(map(str, allowed))}")
    return value


class Registry(Generic[T]):
    """A named collection of factories.

    >>> norms: Registry[Factory] = Registry("norm layer")
    >>> @norms.register("bn")
    ... def make_bn(num_features): ...
    >>> sorted(norms)
    ['bn']
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
