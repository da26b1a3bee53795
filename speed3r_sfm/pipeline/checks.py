"""Checks of option dataclasses at construction: a clear error naming the field, not a failure later."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _number(options: object, name: str) -> float:
    """The field as a finite real number (numpy scalars too; not a bool, NaN or infinity)."""
    value = getattr(options, name)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{type(options).__name__}.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{type(options).__name__}.{name} must be finite, got {value!r}")
    return value


def require_at_least(options: object, **minimums: float) -> None:
    """Raise unless each field named in ``minimums`` is a number at least that large."""
    for name, low in minimums.items():
        value = _number(options, name)
        if value < low:
            raise ValueError(f"{type(options).__name__}.{name} must be at least {low}, got {value!r}")


def require_positive(options: object, *names: str) -> None:
    """Raise unless each named field is a number above zero."""
    for name in names:
        value = _number(options, name)
        if value <= 0:
            raise ValueError(f"{type(options).__name__}.{name} must be positive, got {value!r}")


def require_between(options: object, **ranges: tuple[float, float]) -> None:
    """Raise unless each field named in ``ranges`` is a number within (low, high), both included."""
    for name, (low, high) in ranges.items():
        value = _number(options, name)
        if not low <= value <= high:
            raise ValueError(f"{type(options).__name__}.{name} must lie in [{low}, {high}], got {value!r}")


def require_integer(options: object, **minimums: int) -> None:
    """Raise unless each field named in ``minimums`` is an integer (numpy integers too; not a bool or a
    float such as 2.0) at least that large."""
    for name, low in minimums.items():
        value = getattr(options, name)
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{type(options).__name__}.{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{type(options).__name__}.{name} must be at least {low}, got {value!r}")


def require_bool(options: object, *names: str) -> None:
    """Raise unless each named field is a bool (numpy bools too): a string "false" would count as true."""
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{type(options).__name__}.{name} must be True or False, got {value!r}")
