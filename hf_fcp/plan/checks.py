"""The one set of argument checks every layer uses (settings, collator, sampler, plugin, simulator, CLI).

Each raises ``ValueError`` with a message that names the setting, the value received and what is allowed:
``"<name>: got X, expected Y"``. They run before any process group exists.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an int if it is an integer ≥ ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        got = f"{value!r}" if isinstance(value, numbers.Number) else f"{value!r} ({type(value).__name__})"
        kind = {1: "a positive integer (>= 1)", 0: "a non-negative integer (>= 0)"}.get(minimum,
                                                                                       f"an integer >= {minimum}")
        return _fail(name, got, kind + (" or None" if optional else ""))
    return int(value)


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = True,
                 optional: bool = False, unit: str = "") -> float | None:
    """``value`` as a float if it is a finite real number in ``(low, high]`` (``[low, high]`` when not
    ``low_open``), or None when ``optional``; ``unit`` names what it counts in the message."""
    if value is None and optional:
        return None
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        if math.isfinite(high):
            kind = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low == 0:
            kind = "a positive finite number" if low_open else "a non-negative finite number"
        else:
            kind = f"a finite number {'>' if low_open else '>='} {low:g}"
        return _fail(name, repr(value), kind + (f" of {unit}" if unit else ""))
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    if isinstance(value, bool) or value not in allowed:
        return _fail(name, repr(value), f"one of {list(allowed)}")
    return value


def check_seq_lens(seq_lens: Sequence[Any]) -> tuple[int, ...]:
    """A global batch of sequence lengths: a non-empty sequence of integers ≥ 1, as a tuple of ints."""
    if isinstance(seq_lens, (str, bytes)) or not hasattr(seq_lens, "__len__"):
        _fail("seq_lens", type(seq_lens).__name__, "a list of positive integers")
    if len(seq_lens) == 0:
        _fail("seq_lens", "an empty list", "at least one sequence of length >= 1")
    out = []
    for i, length in enumerate(seq_lens):
        if hasattr(length, "item") and getattr(length, "ndim", 0) == 0:
            length = length.item()
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
            _fail(f"seq_lens[{i}]", repr(length), "a positive integer (empty sequences carry no tokens)")
        out.append(int(length))
    return tuple(out)


def _fail(name: str, got: str, expected: str):
    raise ValueError(f"{name}: got {got}, expected {expected}")
