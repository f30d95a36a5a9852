"""Errors that teach: every message names the field, the value and what is allowed."""

from __future__ import annotations

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
