"""Communication rounds: which K/V each rank needs from whom, coloured into congestion-free rounds.

A rank holding query tokens of sequence ``s`` up to position ``e`` needs the K/V of ``s``'s tokens
``[0, e)``; those it does not hold come from their owners. Every (owner, receiver) pair becomes ONE
message carrying all the spans the receiver needs from that owner, so each KV token reaches each rank at
most once. Messages are edges of a bipartite graph (senders × receivers); a proper edge colouring with Δ
colours (Kőnig: Δ = the largest number of messages any rank sends or receives) gives Δ congestion-free
rounds, found with alternating-path recolouring. Pure functions of the placement.

:func:`needed_pieces` and :func:`colour_rounds` state the rule on dicts of spans; the planner builds every
plan's exchange with :func:`coloured`, the same messages from arrays (:func:`needed_rows`), which a test
holds equal to them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from .fcp_plan import Transfer
from .spans import Span, lex_order, ranges


def _spans_by_seq(spans: list[list[Span]]) -> dict[int, list[tuple[int, int, int]]]:
    """seq -> its spans over all ranks as (start, end, rank), sorted by start."""
    by_seq: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for r, rank_spans in enumerate(spans):
        for s, a, b in rank_spans:
            by_seq[s].append((a, b, r))
    for lst in by_seq.values():
        lst.sort()
    return by_seq


def needed_pieces(spans) -> dict[tuple[int, int], list[Span]]:
    """(src, dst) -> spans src holds that dst needs (causal prefix of dst's last held token, not held)."""
    pairs: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for s, lst in sorted(_spans_by_seq(spans).items()):
        if len({r for _, _, r in lst}) < 2:
            continue
        last_end: dict[int, int] = {}
        for a, b, r in lst:
            last_end[r] = b
        for dst, e in sorted(last_end.items()):
            for a, b, src in lst:
                if a >= e:
                    break
                if src != dst:  # a < e and disjoint from dst's spans, so the whole span is needed
                    pairs[(src, dst)].append((s, a, b))
    return pairs


def windowed_pieces(spans, window: int) -> dict[tuple[int, int], list[Span]]:
    """(src, dst) -> the parts of src's spans that dst needs for a layer with a sliding ``window`` (keys):
    for each of dst's runs ``[a, b)`` the positions ``[max(0, a - window + 1), a)`` it does not hold."""
    pairs: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for s, lst in sorted(_spans_by_seq(spans).items()):
        if len({r for _, _, r in lst}) < 2:
            continue
        for dst in sorted({r for _, _, r in lst}):
            need = _merge([(max(0, a - window + 1), a) for a, _, r in lst if r == dst and a > 0])
            for a, b, src in lst:
                if src == dst:
                    continue
                for lo, hi in need:
                    c, d = max(a, lo), min(b, hi)
                    if c < d:
                        pairs[(src, dst)].append((s, c, d))
    return pairs


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        elif hi > lo:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def colour_rounds(pairs, order=None) -> tuple[tuple[Transfer, ...], int]:
    """Proper edge colouring of the bipartite message graph (senders × receivers) with Δ colours
    (:func:`colour_edges`), as messages sorted by (round, sender). Edges go in the (deterministic) order of
    ``pairs``, or of ``order`` (the same edges in another order)."""
    edges = list(pairs if order is None else order)
    if not edges:
        return (), 0
    src, dst = [u for u, _ in edges], [v for _, v in edges]
    colour, delta = colour_edges(src, dst)
    order_ = sorted(range(len(edges)), key=lambda i: (colour[i], src[i]))  # by round, then sender
    return tuple(Transfer(src[i], dst[i], colour[i], tuple(pairs[edges[i]])) for i in order_), delta


def coloured(spans) -> tuple[tuple[Transfer, ...], int, np.ndarray, np.ndarray]:
    """``colour_rounds(needed_pieces(spans))`` from arrays, with what a plan of those messages would compute
    again: (messages, Δ, its :func:`.segments.pieces_of`, its ``FCPPlan.message_array``). The messages are
    :class:`Deferred`: made into objects when the plan is used (:func:`_transfers`)."""
    return colour_columns(needed_columns(spans), spans)


def colour_columns(columns, spans, first_round: int = 0) -> tuple[tuple[Transfer, ...], int, np.ndarray, np.ndarray]:
    """:func:`coloured` of the pieces ``columns`` (:func:`needed_columns`' six: ``src, dst, seq, start,
    end`` and the index of the piece's span in ``spans`` flattened), one message per (src, dst), in rounds
    from ``first_round`` on."""
    src_p, dst_p, seq_p, a_p, b_p, span_p = columns
    if not len(src_p):
        return (), 0, np.zeros((0, 6), np.int64), np.zeros((0, 4), np.int64)
    world = len(spans)
    key, first, at = np.unique(src_p * world + dst_p, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # messages in the order their first piece comes
    edge = np.empty(len(order), np.int64)
    edge[order] = np.arange(len(order))
    edge = edge[at.reshape(-1)]  # message of each piece
    del at, first
    src, dst = key[order] // world, key[order] % world
    colour, delta = colour_edges(src.tolist(), dst.tolist())
    colour = np.asarray(colour, np.int64) + first_round
    sent = lex_order(src, colour)  # by round, then sender
    count = np.bincount(edge, minlength=len(order))
    pick = np.argsort(edge, kind="stable")  # pieces by message, in their order
    pick = pick[ranges((np.cumsum(count) - count)[sent], count[sent])]
    pieces = np.empty((len(pick), 6), np.int64)
    for k, column in enumerate((src_p, dst_p, None, seq_p, a_p, b_p)):
        pieces[:, k] = colour[edge[pick]] if column is None else column[pick]
    tokens = np.bincount(edge, weights=b_p - a_p, minlength=len(order)).astype(np.int64)
    messages = np.column_stack([src[sent], dst[sent], tokens[sent], colour[sent]])
    count, ends = count[sent], np.cumsum(count[sent])
    flat = [t if type(t) is tuple else tuple(t) for x in spans for t in x]
    columns = flat, src[sent], dst[sent], colour[sent], count, ends, span_p[pick]
    return Deferred(len(sent), lambda: _transfers(*columns)), delta, pieces, messages


def _transfers(flat, src, dst, colour, count, ends, span_of) -> tuple[Transfer, ...]:
    """:func:`coloured`'s messages as :class:`Transfer` s: message i sends ``count[i]`` pieces (those up to
    ``ends[i]`` of ``span_of``, indices into ``flat``, the placement's spans rank by rank) from ``src[i]`` to
    ``dst[i]`` in ``colour[i]``. A message's pieces are its sender's span tuples themselves (no copies: at
    W=1024 there are millions)."""
    transfers = []
    for lo in range(0, len(src), _BATCH):  # the pieces of _BATCH messages at a time as Python objects
        hi = min(lo + _BATCH, len(src))
        first_piece = int(ends[lo] - count[lo])
        got = list(map(flat.__getitem__, span_of[first_piece:int(ends[hi - 1])].tolist()))
        transfers += [Transfer(u, v, c, tuple(got[e - n - first_piece:e - first_piece])) for u, v, c, n, e in
                      zip(*(x[lo:hi].tolist() for x in (src, dst, colour, count, ends)))]
    return tuple(transfers)


class Deferred(Sequence):
    """A plan's messages, made into :class:`Transfer` objects on first use (``build()``; ``n`` of them):
    the planner prices many candidate plans by their arrays and keeps one. Reads, compares, hashes and
    pickles as the tuple it stands for."""

    def __init__(self, n: int, build):
        self._n, self._build, self._items = n, build, None

    def _all(self) -> tuple[Transfer, ...]:
        if self._items is None:
            self._items, self._build = self._build(), None
        return self._items

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other) -> bool:
        return isinstance(other, (tuple, Deferred)) and self._all() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._all())

    def __reduce__(self):
        return tuple, (self._all(),)

    def __repr__(self) -> str:
        return repr(self._all())


_BATCH = 1 << 16
"""Messages whose pieces :func:`coloured` turns into Python objects at once (bounds its peak memory)."""


def needed_rows(spans) -> np.ndarray:
    """:func:`needed_pieces` as int64 rows ``(src, dst, seq, start, end)``, vectorised, in the order it finds
    them: by sequence, then receiver, then start (so a message's pieces come in the order it lists them,
    and messages first appear in its order)."""
    return np.column_stack(needed_columns(spans)[:5]) if any(spans) else np.zeros((0, 5), np.int64)


def needed_columns(spans) -> tuple[np.ndarray, ...]:
    """:func:`needed_rows` as six int64 columns: ``src, dst, seq, start, end`` and the index of each piece's
    span in ``spans`` flattened (rank by rank)."""
    rows = [(s, a, b, r) for r, x in enumerate(spans) for s, a, b in x]
    if not rows:
        return tuple(np.zeros(0, np.int64) for _ in range(6))
    seq, a, b, rank = np.asarray(rows, np.int64).T
    order = lex_order(a, seq)
    seq, a, b, rank = seq[order], a[order], b[order], rank[order]
    hold = lex_order(b, rank, seq)  # holders (seq, rank) in order, the end of each one's last run
    last = np.ones(len(hold), bool)
    last[:-1] = (seq[hold][1:] != seq[hold][:-1]) | (rank[hold][1:] != rank[hold][:-1])
    h_seq, h_rank, h_end = seq[hold][last], rank[hold][last], b[hold][last]
    shared = np.bincount(h_seq)[h_seq] > 1  # sequences held by two ranks or more
    h_seq, h_rank, h_end = h_seq[shared], h_rank[shared], h_end[shared]
    top = int(b.max()) + 1
    lo = np.searchsorted(seq, h_seq)  # each holder's sequence's first run
    count = np.searchsorted(seq * top + a, h_seq * top + h_end) - lo  # its runs that start before the end
    h = np.repeat(np.arange(len(h_seq)), count)
    j = ranges(lo, count)
    keep = rank[j] != h_rank[h]
    h, j = h[keep], j[keep]
    return rank[j], h_rank[h], seq[j], a[j], b[j], order[j]


def colour_edges(src: list[int], dst: list[int]) -> tuple[list[int], int]:
    """(colour of each edge ``src[i] -> dst[i]``, Δ): a proper colouring of the bipartite message graph
    with Δ colours (module doc). Each edge, in order, takes the lowest colour free at both ends when one
    below Δ exists (almost always); otherwise Kőnig's alternating-path swap frees one (the colour -> edge
    tables that needs are built on the first such swap only)."""
    n = 1 + max(max(src), max(dst))
    used_src, used_dst = [0] * n, [0] * n  # bitmask of colours in use at each sender / receiver
    delta = max(max(Counter(src).values()), max(Counter(dst).values()))
    colour = [0] * len(src)
    tables = None  # (sender · Δ + colour -> edge, receiver · Δ + colour -> edge), once a swap is needed
    for i, (u, v) in enumerate(zip(src, dst)):
        both = used_src[u] | used_dst[v]
        a = (~both & (both + 1)).bit_length() - 1
        if a >= delta:
            if tables is None:
                tables = ([-1] * (n * delta), [-1] * (n * delta))
                for j in range(i):
                    tables[0][src[j] * delta + colour[j]] = tables[1][dst[j] * delta + colour[j]] = j
            a = _lowest_zero_bit(used_src[u])
            b = _lowest_zero_bit(used_dst[v])
            if a != b and tables[1][v * delta + a] >= 0:
                _flip_path(v, a, b, delta, tables, src, dst, used_src, used_dst, colour)
        if tables is not None:
            tables[0][u * delta + a] = tables[1][v * delta + a] = i
        used_src[u] |= 1 << a
        used_dst[v] |= 1 << a
        colour[i] = a
    return colour, delta


def _lowest_zero_bit(mask: int) -> int:
    return (~mask & (mask + 1)).bit_length() - 1


def _flip_path(v: int, a: int, b: int, delta: int, tables, src, dst, used_src, used_dst, colour) -> None:
    """Swap colours a and b along the alternating path that starts at receiver ``v`` with colour ``a``
    (a is free at the new edge's sender, b free at ``v``; afterwards a is free at ``v``)."""
    at_src, at_dst = tables
    path = []  # edges of the path: colour a at its receivers, b at its senders, alternately
    node, at_receiver = v, True
    while True:
        i = at_dst[node * delta + a]  # from a receiver, by its a edge
        if i < 0:
            break
        path.append(i)
        node = src[i]
        i = at_src[node * delta + b]  # from a sender, by its b edge
        if i < 0:
            at_receiver = False
            break
        path.append(i)
        node = dst[i]
    with_a, with_b = path[0::2], path[1::2]
    for i in with_a:
        at_src[src[i] * delta + a] = at_dst[dst[i] * delta + a] = -1
    for i in with_b:
        at_src[src[i] * delta + b] = at_dst[dst[i] * delta + b] = -1
    for i in with_a:
        at_src[src[i] * delta + b] = at_dst[dst[i] * delta + b] = i
        colour[i] = b
    for i in with_b:
        at_src[src[i] * delta + a] = at_dst[dst[i] * delta + a] = i
        colour[i] = a
    # Inner nodes keep both colours; the two end points of the path each trade one for the other (v had b
    # free and loses a; the far end lacked the colour the path would have continued with).
    both = (1 << a) | (1 << b)
    used_dst[v] ^= both
    if at_receiver:
        used_dst[node] ^= both
    else:
        used_src[node] ^= both
