"""Argument checks shared by every constructor: each raises a ValueError that names the argument and, for
choices, the allowed values (as Lightning's own callbacks do).

Example:
    >>> check_int("repeats", 3, 1)
    3
    >>> check_choice("balance", "none", ("undersample", "none"))
    'none'
    >>> check_int("repeats", True, 1)
    Traceback (most recent call last):
    ...
    ValueError: repeats must be an integer >= 1, got True
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    """An integer >= ``minimum`` (bools and floats rejected); ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (no 0/1, no strings)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> Any:
    """A positive (or non-negative) finite number / integer."""
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite {kind} {bound}, got {value!r}")
    return value


def as_float(x: Any) -> float:
    """``float(x)``, or NaN for ``None``, ``''`` and anything that is not a number (history cells, JSON nulls)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def is_finite(x: Any) -> bool:
    """True for a real, finite number (NaN, inf, ``None`` and text are not)."""
    return math.isfinite(as_float(x))


def coerce_config(cls: Any, value: Any, what: str, example: str) -> Any:
    """``None``, an instance of the dataclass ``cls``, or a mapping of its fields (YAML, checkpoints) -> an instance
    or ``None``; unknown keys are refused naming the allowed ones."""
    import dataclasses
    from collections.abc import Mapping

    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {what} option(s) {unknown}; allowed: {allowed}")
        return cls(**dict(value))
    raise ValueError(f"{what} must be None, a {cls.__name__} or a mapping like {example}, got {type(value).__name__}")
