"""Checks of settings as the command line gives them: Hydra passes `abc`, `true` or `1e3` (a float) on as typed."""

from __future__ import annotations

import math


def is_whole(value: object) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_typed(value: object) -> str:
    """`value` as the message about it should show it, with a hint where a whole number was written as a float."""
    if isinstance(value, float) and value.is_integer():
        return f"{value!r} (a float: write it as {int(value)})"
    return repr(value)
