"""Argument checks shared by the whole package: one message format, naming the argument and value.

Every check returns the (converted) value, so constructors read ``self.n = check_int("n", n)``.
Messages look like ``"`group_size` should be an integer >= 1, got 0"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["check_choice", "check_float", "check_int", "check_weights"]

T = TypeVar("T")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` should be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    maximum_strict: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds.

    Args:
        name: argument name, for the message.
        value: the value to check.
        minimum: lower bound (``None``: none).
        strict: the lower bound is exclusive (``value > minimum``).
        maximum: upper bound (``None``: none).
        maximum_strict: the upper bound is exclusive.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if maximum_strict else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if maximum_strict else '<='} {maximum}")
        what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"`{name}` should be {what}, got {value!r}")
    return float(value)


def check_choice(name: str, value: T, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"`{name}` should be one of {options}, got {value!r}")
    return value


def check_weights(name: str, value: Sequence[float], k: int, names: Sequence[str]) -> list[float]:
    """``K`` finite, non-negative weights, not all zero (one per reward, in ``names`` order)."""
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(
            f"`{name}` should have one entry per reward (K = {k}: {list(names)}), "
            f"got {len(values)}: {values}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"`{name}` should be finite, non-negative and not all zero, got {values}")
    return values
