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


MAX_TOKENS_PER_RANK = 2**31 - 1
"""A rank's token count must fit the int32 offsets the varlen kernels index with."""
MAX_WORLD_SIZE = 4096
MAX_BLOCKS, MAX_BLOCKS_PER_RANK = 65536, 1024
MAX_SPAN_PAIRS, MAX_BLOCK_SPANS = 2**16, 2**21
"""What the planner places in seconds (docs/planner.md, "Size limits"). A batch holds at most
``min(MAX_BLOCKS, max(world_size, 8) × MAX_BLOCKS_PER_RANK)`` blocks (a sequence of n tokens is
``ceil(n / block_size)`` of them). A sequence spans about ``ceil(n / tokens per rank)`` ranks (at most the
world size), and every rank it spans needs K/V from the earlier ones, so the fcp planner's work grows with
the squared spans (at most ``MAX_SPAN_PAIRS`` summed over sequences) and with blocks × span (at most
``MAX_BLOCK_SPANS``)."""


def check_plan_size(seq_lens: Sequence[int], world_size: int, block_size: int, tokens_per_rank: int,
                    strategy: str = "fcp") -> None:
    """Refuses, before anything is allocated, a batch no machine plans: a rank's tokens beyond the kernels'
    int32 range, or more ranks, blocks or exchange work than the planner handles in seconds (the limits
    above; the exchange limits bind the ``fcp`` placement, the simple strategies place without a search).
    ``tokens_per_rank`` is the batch's resolved per-rank cap; ``seq_lens`` are checked lengths."""
    if world_size > MAX_WORLD_SIZE:
        _fail("world_size", world_size, f"at most {MAX_WORLD_SIZE}, the largest world the planner is sized for")
    if tokens_per_rank > MAX_TOKENS_PER_RANK:
        _fail("tokens per rank", f"{tokens_per_rank} ({sum(seq_lens)} tokens over {world_size} ranks)",
              f"at most {MAX_TOKENS_PER_RANK} (the kernels' int32 token offsets): more ranks or a smaller batch")
    blocks = [-(-n // block_size) for n in seq_lens]
    spans = [min(world_size, -(-n // tokens_per_rank)) for n in seq_lens]
    where = f"({len(seq_lens)} sequences in blocks of {block_size} tokens over {world_size} ranks)"
    limits = (("blocks", sum(blocks), min(MAX_BLOCKS, max(world_size, 8) * MAX_BLOCKS_PER_RANK),
               f"min({MAX_BLOCKS}, max(world_size, 8) × {MAX_BLOCKS_PER_RANK})"),
              ("sum of squared sequence spans (ranks a sequence covers)", sum(s * s for s in spans),
               MAX_SPAN_PAIRS, "MAX_SPAN_PAIRS"),
              ("sum of blocks × span over sequences", sum(b * s for b, s in zip(blocks, spans)), MAX_BLOCK_SPANS,
               "MAX_BLOCK_SPANS"))
    for name, value, limit, rule in limits[:1] if strategy != "fcp" else limits:
        if value > limit:
            _fail(name, f"{value} {where}", f"at most {limit} = {rule}, what the planner places in seconds: "
                                           f"fewer or shorter sequences per batch, or a larger block_size")


def _fail(name: str, got: str, expected: str):
    raise ValueError(f"{name}: got {got}, expected {expected}")
