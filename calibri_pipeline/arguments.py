"""Checks of arguments that every layer makes the same way (one message wherever they fail)."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` when it is an int >= 1 (or None where ``allow_none``); a ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value
