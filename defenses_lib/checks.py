"""Argument checks shared by the library: each error names the argument and what was expected."""

from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError("<name> must be one of <choices>, got <value>")`` unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= ``minimum`` (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, low: float = 0.0, strict: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number >= ``low`` (> with ``strict``)."""
    import math

    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
