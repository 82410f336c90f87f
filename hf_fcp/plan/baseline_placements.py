"""The simple placements fcp is compared with, sharing its output type (per rank, a list of ``(seq, start,
end)`` spans in local order): zigzag (``ring``), contiguous shards (``allgather``) and whole sequences
(``packing``). :func:`zigzag` and :func:`contiguous` also serve the simulator's fixed-group baselines.
"""

from __future__ import annotations

import heapq

import numpy as np

from .spans import Span

Piece = tuple[int, int, int]  # (rank, start, end)


def merge_sorted(spans: list[Span]) -> list[Span]:
    """Sort spans by (seq, start) and merge touching ranges of the same sequence."""
    merged: list[Span] = []
    for s, a, b in sorted(spans):
        if merged and merged[-1][0] == s and merged[-1][2] == a:
            merged[-1] = (s, merged[-1][1], b)
        else:
            merged.append((s, a, b))
    return merged


def _chunks(start: int, end: int, chunk_rank: list[int], order: list[int], extra_from: int) -> list[Piece]:
    """Tokens ``[start, end)`` in ``len(chunk_rank)`` near-equal chunks, chunk i on ``chunk_rank[i]``; the
    remainder tokens go one each to the chunks ``order[extra_from], order[extra_from + 1], ...`` (cyclic)."""
    parts = len(chunk_rank)
    q, rem = divmod(end - start, parts)
    sizes = np.full(parts, q, dtype=np.int64)
    sizes[np.asarray(order, np.int64)[(extra_from + np.arange(rem)) % parts]] += 1
    bounds = (start + np.concatenate([[0], np.cumsum(sizes)])).tolist()
    return [(chunk_rank[i], bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def zigzag(start: int, end: int, ranks: list[int], extra_from: int = 0) -> list[Piece]:
    """Megatron/TE zigzag of tokens ``[start, end)`` over ``ranks``: 2c near-equal chunks, chunks i and
    2c−1−i on ``ranks[i]``. Remainder tokens go first to each rank's first chunk, then to its second, from
    position ``extra_from`` of that order on (rotate it per sequence so no rank collects every remainder)."""
    c = len(ranks)
    chunk_rank = list(ranks) + list(ranks)[::-1]
    order = list(range(c)) + [2 * c - 1 - i for i in range(c)]
    return _chunks(start, end, chunk_rank, order, extra_from)


def contiguous(start: int, end: int, ranks: list[int], extra_from: int = 0) -> list[Piece]:
    """Tokens ``[start, end)`` in ``len(ranks)`` contiguous near-equal shards, shard i on ``ranks[i]``."""
    return _chunks(start, end, list(ranks), list(range(len(ranks))), extra_from)


def _every_sequence(lens, world: int, split) -> list[list[Span]]:
    """Every sequence split over all ranks by ``split``; the remainder rotation continues across sequences,
    so over the batch every rank gets the same number of extra tokens, plus or minus one."""
    ranks = list(range(world))
    parts = 2 * world if split is zigzag else world
    out: list[list[Span]] = [[] for _ in range(world)]
    pointer = 0
    for s, length in enumerate(lens):
        for r, a, b in split(0, length, ranks, pointer):
            out[r].append((s, a, b))
        pointer = (pointer + length % parts) % parts
    return [sorted(spans) for spans in out]


def place_ring(lens, world: int, cap: int) -> list[list[Span]]:
    """Megatron/TE zigzag: every sequence in 2W chunks; rank r holds chunks r and 2W-1-r."""
    return _every_sequence(lens, world, zigzag)


def place_allgather(lens, world: int, cap: int) -> list[list[Span]]:
    """Llama-3 style: every sequence in W contiguous chunks, chunk r on rank r (KV all-gathered)."""
    return _every_sequence(lens, world, contiguous)


def place_packing(lens, world: int, cap: int) -> list[list[Span]]:
    """Whole sequences per rank (no context parallelism), longest first onto the least-filled rank."""
    tok = [(0, r) for r in range(world)]
    out: list[list[Span]] = [[] for _ in range(world)]
    for s in sorted(range(len(lens)), key=lambda i: (-lens[i], i)):
        if lens[s] > cap:
            raise ValueError(f"strategy 'packing' keeps sequences whole, but sequence {s} has {lens[s]} tokens, "
                             f"more than tokens_per_rank={cap}; use strategy 'fcp' or raise tokens_per_rank")
        used, r = heapq.heappop(tok)
        if used + lens[s] > cap:
            raise ValueError(f"strategy 'packing' could not fit sequence {s} ({lens[s]} tokens) on any rank "
                             f"under tokens_per_rank={cap}; whole-sequence packing needs slack: use 'fcp'")
        out[r].append((s, 0, lens[s]))
        heapq.heappush(tok, (used + lens[s], r))
    return [sorted(spans) for spans in out]
