"""The one rule for every number an operator, a config file or a policy file supplies: a real, finite number within
its range. NaN compares false with everything and infinity passes every `<=`, so each reached the control store
once through a bare range check; every check goes through here instead."""

from __future__ import annotations

import math


def problem(value: object, low: float, high: float, *, above_low: bool = False) -> str | None:
    """Why `value` is not a finite number in [low, high] (or (low, high] when `above_low`); None when it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"is {value}, must be a finite number"
    if value < low or value > high or (above_low and value == low):
        left = "(" if above_low else "["
        return f"is {_show(value)}, must be in {left}{_show(low)}, {_show(high)}]"
    return None


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"
