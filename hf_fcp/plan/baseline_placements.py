"""The simple placements fcp is compared with, sharing its output type (per rank, a list of ``(seq, start,
end)`` spans in local order): zigzag (``ring``), contiguous shards (``allgather``), whole sequences
(``packing``) and MagiAttention's chunk dispatch (:func:`place_dispatch`). :func:`zigzag`,
:func:`contiguous` and the dispatch also serve the simulator's fixed-group baselines.
"""

from __future__ import annotations

import heapq

import numpy as np

from .spans import Span, pairs_per_list, span_cost

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


def assign_to_groups(lens, groups: int, capacity: int, by_cost: bool = False) -> list[list[int]]:
    """Whole sequences to ``groups`` data-parallel groups, largest first: to the group with most token room
    (token balance), or (``by_cost``) to the group with the least attention cost among those with room."""
    lens = np.asarray(lens, np.int64)
    pairs = span_cost(0, lens)
    order = np.lexsort((np.arange(len(lens)), -(pairs if by_cost else lens.astype(np.float64)))).tolist()
    out: list[list[int]] = [[] for _ in range(groups)]
    if not by_cost:  # the group with the fewest tokens (ties: the lowest index), from a heap
        heap = [(0, g) for g in range(groups)]
        for s, n in zip(order, lens[order].tolist()):
            used, g = heap[0]
            out[g].append(s)
            heapq.heapreplace(heap, (used + n, g))
        return out
    tok, cost = np.zeros(groups, np.int64), np.zeros(groups)
    for s in order:
        fits = tok + lens[s] <= capacity
        g = int(np.argmin(np.where(fits, cost, np.inf))) if fits.any() else int(np.argmin(tok))
        out[g].append(s)
        tok[g] += lens[s]
        cost[g] += pairs[s]
    return out


def chunked(docs: list[tuple[int, int]], size: int) -> list[list[Span]]:
    """The concatenation of ``docs`` ((seq, length) pairs) cut every ``size`` tokens; each chunk as its
    per-document spans."""
    out: list[list[Span]] = [[]]
    room = size
    for s, n in docs:
        a = 0
        while a < n:
            b = min(n, a + room)
            out[-1].append((s, a, b))
            room -= b - a
            a = b
            if room == 0:
                out.append([])
                room = size
    return [ch for ch in out if ch]


def dispatch(lens, groups: list[tuple[list[int], list[int]]], chunk: int, world: int,
             cap: int | None = None) -> list[list[Span]]:
    """MagiAttention's dispatch: per ``(ranks, sequences)`` group, the sequences concatenated, cut into
    ``chunk``-token chunks, largest causal area first to the least-loaded rank of the group among those
    with fewer than their equal share of chunks. With ``cap``, only to ranks with room for the chunk
    (tokens per rank); the chunks a group cannot hold go to other groups (:func:`_spill`)."""
    spans: list[list[Span]] = [[] for _ in range(world)]
    load, tokens, count, spill = [0.0] * world, [0] * world, [0] * world, []
    room = float("inf") if cap is None else cap
    for ranks, seqs in groups:
        chunks = chunked([(s, int(lens[s])) for s in seqs], chunk)
        area = pairs_per_list(chunks).tolist()
        per_rank = -(-len(chunks) // len(ranks))
        heap = [(0.0, r) for r in ranks]
        for i in sorted(range(len(chunks)), key=lambda i: (-area[i], i)):
            n, full = sum(b - a for _, a, b in chunks[i]), []
            while heap and tokens[heap[0][1]] + n > room:
                full.append(heapq.heappop(heap))  # no room for this chunk (a smaller one may fit)
            if not heap:
                spill.append(chunks[i])
            else:
                load_r, r = heapq.heappop(heap)
                spans[r].extend(chunks[i])
                count[r], load[r], tokens[r] = count[r] + 1, load_r + area[i], tokens[r] + n
                if count[r] < per_rank:
                    heapq.heappush(heap, (load[r], r))
            for x in full:
                heapq.heappush(heap, x)
    if spill:
        load_a, tokens_a = np.asarray(load), np.asarray(tokens, np.int64)
        for ch in spill:
            _spill(spans, load_a, tokens_a, ch, cap)
    return [merge_sorted(x) for x in spans]


def _spill(spans: list[list[Span]], load: np.ndarray, tokens: np.ndarray, chunk: list[Span], cap: int) -> None:
    """``chunk`` to the least-loaded rank with room for it, else cut over the ranks with most room."""
    n = sum(b - a for _, a, b in chunk)
    room = cap - tokens
    if (room >= n).any():
        r = int(np.argmin(np.where(room >= n, load, np.inf)))
        spans[r].extend(chunk)
        load[r] += sum(span_cost(a, b) for _, a, b in chunk)
        tokens[r] += n
        return
    for r in np.argsort(-room, kind="stable").tolist():
        while chunk and tokens[r] < cap:
            s, a, b = chunk[0]
            take = min(b - a, cap - int(tokens[r]))
            spans[r].append((s, a, a + take))
            load[r] += span_cost(a, a + take)
            tokens[r] += take
            chunk = [(s, a + take, b)] + chunk[1:] if take < b - a else chunk[1:]
        if not chunk:
            return
    raise ValueError(f"dispatch: the batch holds more than {len(spans)} ranks x cap={cap} tokens")


def place_dispatch(lens, world: int, chunk: int, cap: int, group: int | None = None,
                   capped: bool = False) -> list[list[Span]]:
    """:func:`dispatch` over groups of ``group`` consecutive ranks (None: one group of all ranks), the
    sequences assigned to the groups by tokens (:func:`assign_to_groups`; ``cap``: tokens per rank);
    ``capped``: no rank over ``cap`` (:func:`dispatch`'s ``cap``)."""
    c = group or world
    one = [sorted(range(len(lens)), key=lambda s: (-lens[s], s))]  # assign_to_groups' order, one group
    seqs = assign_to_groups(lens, world // c, c * cap) if c < world else one
    groups = [(list(range(g * c, (g + 1) * c)), x) for g, x in enumerate(seqs)]
    return dispatch(lens, groups, chunk, world, cap if capped else None)
