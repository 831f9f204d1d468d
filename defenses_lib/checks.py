"""Argument checks shared by the library: each error names the argument and what was expected."""

from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError("<name> must be one of <choices>, got <value>")`` unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
