"""One tiny registry type shared by every extension point (models, features, attacks).

Example:
    >>> from lightning_mia.registry import Registry
    >>> COLORS = Registry("color")
    >>> @COLORS.register("red")
    ... def red(): return "#f00"
    >>> COLORS["red"]()
    '#f00'
    >>> COLORS["blue"]
    Traceback (most recent call last):
    ...
    KeyError: "Unknown color 'blue'. Known colors: red"
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Tuple, Union


class Registry(Mapping[str, Any]):
    """A name -> factory mapping whose lookup error lists the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def __getitem__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise KeyError(f"Unknown {self.kind} {name!r}. Known {self.kind}s: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def build(self, spec: Union[str, Mapping[str, Any]], **defaults: Any) -> Any:
        """Build from ``"name"`` or ``{"name": ..., **options}``; options override ``defaults``."""
        name, options = parse_spec(spec, self.kind)
        factory = self[name]
        return factory(**{**defaults, **options})


def parse_spec(spec: Union[str, Mapping[str, Any]], kind: str = "item") -> Tuple[str, Dict[str, Any]]:
    """Split a ``"name"`` or ``{"name": ..., **options}`` spec into (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"A {kind} given as a mapping needs a 'name' key, got keys {sorted(spec)}")
        options = dict(spec)
        name = options.pop("name")
        if not isinstance(name, str):
            raise ValueError(f"The {kind} name must be a string, got {name!r}")
        return name, options
    raise TypeError(f"A {kind} must be a name or a mapping with a 'name' key, got {type(spec).__name__}")
