"""Argument checks shared by the public constructors: one wording for "must be an
integer" and "must be a finite number" across the library."""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An integer, and not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None) -> int:
    """`value` as an int; TypeError unless it is an integer, ValueError below `minimum`."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_number(name: str, value) -> float:
    """`value` as a float; TypeError unless it is a number, ValueError for nan or inf."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    return float(value)
