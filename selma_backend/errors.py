"""Errors that teach: every message names the field, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable


class SelmaError(ValueError):
    """A problem the user can fix; the message says what and how."""


def invalid(field: str, value: object, allowed: str | Iterable[object], hint: str = "") -> SelmaError:
    """Build the standard bad-input error.

    >>> str(invalid("steps", -1, "an integer >= 1"))
    "steps: got -1; allowed: an integer >= 1"
    """
    if not isinstance(allowed, str):
        allowed = ", ".join(repr(a) for a in allowed)
    msg = f"{field}: got {value!r}; allowed: {allowed}"
    if hint:
        msg += f". {hint}"
    return SelmaError(msg)


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """Raise :func:`invalid` unless ``value`` is an int (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise invalid(name, value, f"an integer from {lo} to {hi}")


def check_number(name: str, value: object, lo: float, hi: float) -> None:
    """Raise :func:`invalid` unless ``value`` is a finite int or float (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise invalid(name, value, f"a number from {lo} to {hi}")
