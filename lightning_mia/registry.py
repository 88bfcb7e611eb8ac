"""One registry type for every extension point (models, features, attacks, OOD sources) and the ``Spec`` that
names one entry with its options.

A spec is written by users as ``"name"`` or ``{"name": ..., "tag": ..., **options}`` (YAML or Python); it is
resolved ONCE into a :class:`Spec` (known name, safe unique tag, options split off) and passed down as such.

Example:
    >>> COLORS = Registry("color")
    >>> @COLORS.register("red")
    ... def red(shade="bright"): return f"{shade} #f00"
    >>> COLORS["red"]()
    'bright #f00'
    >>> COLORS.resolve({"name": "red", "tag": "warm", "shade": "dark"})
    Spec(name='red', tag='warm', options={'shade': 'dark'})
    >>> COLORS.build(COLORS.resolve("red"))
    'bright #f00'
    >>> COLORS["blue"]
    Traceback (most recent call last):
    ...
    KeyError: "Unknown color 'blue'. Known colors: red"
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

#: Tags name result columns, TensorBoard tags, predictions-file keys and figure files: keep them to characters
#: that are safe in all of those (no '/', no '..', no markup).
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

SpecLike = Union[str, Mapping[str, Any], "Spec"]


@dataclass(frozen=True)
class Spec:
    """A resolved registry entry: its registered ``name``, the ``tag`` its results carry, and its ``options``."""

    name: str
    tag: str
    options: Dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # options may hold lists: hash by identity of the (name, tag) pair
        return hash((self.name, self.tag))

    def to_dict(self) -> Dict[str, Any]:
        """The user-facing form ``{"name", "tag", **options}`` (round-trips through :meth:`Registry.resolve`)."""
        return {"name": self.name, "tag": self.tag, **self.options}


def check_tag(tag: Any, kind: str = "item") -> str:
    """Raise a ValueError unless ``tag`` is a safe tag (letters, digits, ``_ . + -``; at most 64 characters)."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or ".." in tag:
        raise ValueError(f"The {kind} tag {tag!r} is not allowed: use 1-64 letters, digits or '_ . + -', "
                         "starting with a letter or digit (tags become file names and TensorBoard tags)")
    return tag


def parse_spec(spec: SpecLike, kind: str = "item") -> Tuple[str, Dict[str, Any]]:
    """Split a ``"name"`` or ``{"name": ..., **options}`` spec into (name, options); options may include ``tag``."""
    if isinstance(spec, Spec):
        return spec.name, dict(spec.options)
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

    def resolve(self, spec: SpecLike) -> Spec:
        """One :class:`Spec`: the name checked against the registry, the tag (default: the name) checked."""
        if isinstance(spec, Spec):
            self[spec.name]
            return spec
        name, options = parse_spec(spec, self.kind)
        self[name]  # KeyError listing the known names
        tag = check_tag(str(options.pop("tag", name)), self.kind)
        return Spec(name, tag, options)

    def resolve_all(self, specs: Union[SpecLike, Sequence[SpecLike]], allow_empty: bool = False) -> List[Spec]:
        """Resolve a list of specs (or a single one); tags must be unique."""
        if isinstance(specs, (str, Mapping, Spec)):
            specs = [specs]
        out: List[Spec] = []
        for spec in specs:
            s = self.resolve(spec)
            if any(o.tag == s.tag for o in out):
                raise ValueError(f"Two {self.kind}s share the tag {s.tag!r}: give one a distinct 'tag'")
            out.append(s)
        if not out and not allow_empty:
            raise ValueError(f"At least one {self.kind} is needed")
        return out

    def build(self, spec: SpecLike, **defaults: Any) -> Any:
        """Build from a :class:`Spec`, ``"name"`` or ``{"name": ..., **options}``; options override ``defaults``.

        A ``tag`` key is a result name, not a factory option: it is dropped here.
        """
        name, options = parse_spec(spec, self.kind)
        options.pop("tag", None)
        return self[name](**{**defaults, **options})
