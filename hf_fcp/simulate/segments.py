"""What each rank computes and sends, extracted from a plan as flat numpy arrays (vectorised: plans at
256 ranks hold tens of thousands of spans).

A **segment** is one attention kernel segment: ``q`` queries of one sequence against ``k`` keys, with
``pairs`` visible (query, key) pairs, run by ``rank`` in time ``slot`` (0: work on local K/V; ``1 + i``:
p2p stage i; ring step i). A **message** moves ``tokens`` K/V rows from ``src`` to ``dst``.

Invariant (tested): over all segments of a plan, ``pairs`` sums to the causal pairs of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..plan.fcp_plan import FCPPlan
from ..plan.spans import ranges, span_cost


@dataclass(kw_only=True)
class Segments:
    """Flat arrays (n,) of attention segments."""

    rank: np.ndarray
    """int64: rank that runs the segment."""
    slot: np.ndarray
    """int64: 0 = local K/V; p2p: 1 + stage; ring: the step."""
    q: np.ndarray
    """float64: query tokens."""
    k: np.ndarray
    """float64: key tokens."""
    pairs: np.ndarray
    """float64: visible (query, key) pairs."""

    @staticmethod
    def concat(parts: list["Segments"]) -> "Segments":
        fields = ("rank", "slot", "q", "k", "pairs")
        return Segments(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


@dataclass(kw_only=True)
class Messages:
    """Flat arrays (n,) of messages of one exchange."""

    src: np.ndarray
    dst: np.ndarray
    tokens: np.ndarray


@dataclass(kw_only=True)
class Spans:
    """Every rank's spans flat, sorted by (rank, seq, start); ``key = rank * num_seqs + seq``."""

    rank: np.ndarray
    seq: np.ndarray
    a: np.ndarray
    b: np.ndarray
    key: np.ndarray
    num_seqs: int
    fused: np.ndarray
    """bool: the span's sequence runs fused on its rank (``plan.fused``)."""

    @staticmethod
    def of(plan: FCPPlan) -> "Spans":
        """Every rank's held runs (touching spans of a sequence merged, as the rank views do)."""
        rows = [(r, s, a, b) for r, spans in enumerate(plan.rank_spans) for s, a, b in spans]
        arr = np.asarray(rows, np.int64).reshape(-1, 4)
        arr = arr[np.lexsort((arr[:, 2], arr[:, 1], arr[:, 0]))]
        n = len(plan.seq_lens)
        key = arr[:, 0] * n + arr[:, 1]
        new = np.concatenate([[True], (key[1:] != key[:-1]) | (arr[1:, 2] != arr[:-1, 3])])[:len(arr)]
        first, last = np.flatnonzero(new), np.flatnonzero(np.append(new[1:], True))
        arr, key = np.column_stack([arr[first, :3], arr[last, 3]]), key[first]
        fused_keys = np.asarray([r * n + s for r, seqs in enumerate(plan.fused) for s in seqs], np.int64)
        return Spans(rank=arr[:, 0], seq=arr[:, 1], a=arr[:, 2], b=arr[:, 3], key=key, num_seqs=n,
                     fused=np.isin(key, fused_keys))

    def match(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (i, j) with ``key[i] == self.key[j]`` (self.key is sorted)."""
        lo = np.searchsorted(self.key, key, "left")
        cnt = np.searchsorted(self.key, key, "right") - lo
        return np.repeat(np.arange(len(key)), cnt), ranges(lo, cnt)


def _segs(rank, slot, q, k, pairs) -> Segments:
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    slot = np.broadcast_to(np.asarray(slot, np.int64), np.shape(rank)).copy()
    return Segments(rank=np.asarray(rank, np.int64), slot=slot,
                    q=f(q), k=f(k), pairs=f(pairs))


def local_segments(sp: Spans) -> Segments:
    """Slot 0 (``tasks.local_tasks``): one causal segment per held sequence run split — the rank's spans of
    the sequence, joined in position order, are both queries and keys; pairs = each span against the rank's
    own earlier spans of its sequence plus itself — and a causal square per run starting at 0 of the
    sequences run fused."""
    split = local_split_segments(_subset(sp, ~sp.fused))
    first = sp.fused & (sp.a == 0)
    n = (sp.b - sp.a)[first]
    return Segments.concat([split, _segs(sp.rank[first], 0, n, n, span_cost(0, n))])


def _subset(sp: Spans, keep: np.ndarray) -> Spans:
    return Spans(rank=sp.rank[keep], seq=sp.seq[keep], a=sp.a[keep], b=sp.b[keep], key=sp.key[keep],
                 num_seqs=sp.num_seqs, fused=sp.fused[keep])


def local_split_segments(sp: Spans) -> Segments:
    """One causal segment per held sequence over its spans joined (every sequence run split)."""
    n = sp.b - sp.a
    cum = np.cumsum(n)
    first = np.concatenate([[True], sp.key[1:] != sp.key[:-1]])[:len(n)]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(n)), 0))
    earlier = cum - n - (cum[group_start] - n[group_start])  # own tokens of the sequence before this span
    pairs = earlier * n + n * (n + 1) / 2
    g = np.cumsum(first) - 1  # segment index per span (spans are sorted by key)
    rank = sp.rank[first]
    held = np.bincount(g, weights=n, minlength=len(rank))
    return _segs(rank, 0, held, held, np.bincount(g, weights=pairs, minlength=len(rank)))


def prefix_segments(sp: Spans) -> Segments:
    """Slot 0, all K/V present (all-gather): each span against its whole causal prefix."""
    n = sp.b - sp.a
    return _segs(sp.rank, 0, n, sp.b, span_cost(sp.a, sp.b))


def p2p_segments(plan: FCPPlan, sp: Spans) -> tuple[Segments, list[Messages]]:
    """Slot 1 + stage: the split sequences' held spans against the pieces of their sequence that arrived
    in that stage, and the fused sequences' runs after position 0 against all their keys, in the slot of
    the last stage they need (``tasks.remote_tasks`` / ``tasks.fused_tasks``). Also the messages of every
    stage (forward direction)."""
    per = plan.settings.rounds_per_stage
    num_stages = len(plan.stages)
    rows = [(t.src, t.dst, t.round // per, s, a, b) for t in plan.transfers for s, a, b in t.pieces]
    p = np.asarray(rows, np.int64).reshape(-1, 6)
    src, dst, stage, seq, c, d = p.T
    msgs = [_aggregate(src[stage == st], dst[stage == st], (d - c)[stage == st], plan.world_size)
            for st in range(num_stages)]
    fused = _fused_remote(sp, dst * sp.num_seqs + seq, stage, d)
    if not plan.overlap:  # the rank views run every fused segment once the last stage arrived
        fused.slot[:] = num_stages
    return Segments.concat([_split_remote(sp, dst, stage, seq, c, d, num_stages), fused]), msgs


def _fused_remote(sp: Spans, piece_key, stage, d) -> Segments:
    """Fused runs with a > 0: q = b - a queries against all b keys, causal, in slot 1 + the last stage of
    the pieces before them (pieces of a (rank, seq) sorted by end: a prefix of them precedes the run)."""
    runs = np.flatnonzero(sp.fused & (sp.a > 0))
    order = np.lexsort((d, piece_key))
    pk, pd = piece_key[order], d[order]
    big = np.int64(stage.max(initial=0) + 1)
    last = np.maximum.accumulate(pk * big + stage[order]) - pk * big  # running max stage within a key group
    at = np.searchsorted(pk * (int(pd.max(initial=0)) + 1) + pd,
                         sp.key[runs] * (int(pd.max(initial=0)) + 1) + sp.a[runs], "right") - 1
    q = sp.b[runs] - sp.a[runs]
    return _segs(sp.rank[runs], 1 + last[at], q, sp.b[runs], span_cost(sp.a[runs], sp.b[runs]))


def _split_remote(sp: Spans, dst, stage, seq, c, d, num_stages: int) -> Segments:
    i, j = sp.match(dst * sp.num_seqs + seq)
    keep = (sp.a[j] >= d[i]) & ~sp.fused[j]
    i, j = i[keep], j[keep]
    group = j * max(num_stages, 1) + stage[i]  # one segment per (held span, stage)
    uniq, inv = np.unique(group, return_inverse=True)
    k = np.bincount(inv, weights=(d - c)[i], minlength=len(uniq))
    j_of, stage_of = uniq // max(num_stages, 1), uniq % max(num_stages, 1)
    q = sp.b[j_of] - sp.a[j_of]
    # Consecutive held spans of a sequence that see the same pieces of a stage share one segment
    # (``views._remote_tasks``); within a (rank, seq, stage) the keys seen only grow with the span's
    # start, so equal key counts mean equal key sets.
    seg_key = np.stack([sp.key[j_of], stage_of, k.astype(np.int64)])
    _, first_idx, g = np.unique(seg_key, axis=1, return_index=True, return_inverse=True)
    g = g.reshape(-1)
    q = np.bincount(g, weights=q, minlength=len(first_idx))
    k = k[first_idx]
    return _segs(sp.rank[j_of][first_idx], 1 + stage_of[first_idx], q, k, q * k)


@dataclass(kw_only=True)
class RingSchedule:
    """Per step i: the segments against the K/V block held at step i (``step_segments(i)``, built on
    demand: at CP 256 all steps together hold hundreds of millions of segments) and the messages bringing
    the next block; ``final`` returns each dK/dV accumulator to its owner after the last backward step."""

    nsteps: int
    step_segments: Callable[[int], Segments]
    steps: list[Messages]
    final: Messages

    @property
    def segments(self) -> Segments:
        """Every step's segments at once (small cases and tests only: memory grows as steps × spans)."""
        return Segments.concat([self.step_segments(i) for i in range(self.nsteps)])


def ring_schedule(plan: FCPPlan, sp: Spans, cp_size: int) -> RingSchedule:
    """Ring steps: with ``cp_size > 1`` one ring per fixed group of consecutive ranks carrying all the
    source's K/V (TE); else one ring per sequence over its holders in rank order (ByteScale-style)."""
    if cp_size > 1:
        src_at, tok_at, succ_tok, nsteps = _group_ring(plan, sp, cp_size)
    else:
        src_at, tok_at, succ_tok, nsteps = _seq_rings(plan, sp)

    def step_segments(i: int) -> Segments:
        if i == 0:
            return local_split_segments(sp)  # ring attention runs every sequence split
        ent, src = src_at(i)
        jj_i, jj = sp.match(src * sp.num_seqs + sp.seq[ent])
        e = ent[jj_i]
        keep = sp.b[jj] <= sp.a[e]
        e, jj = e[keep], jj[keep]
        q, k = sp.b[e] - sp.a[e], sp.b[jj] - sp.a[jj]
        return _segs(sp.rank[e], i, q, k, q * k)

    return RingSchedule(nsteps=nsteps, step_segments=step_segments, steps=[tok_at(i) for i in range(nsteps - 1)],
                        final=succ_tok())


def _aggregate(src, dst, tokens, world) -> Messages:
    keep = np.asarray(tokens) > 0
    src, dst, tokens = np.asarray(src)[keep], np.asarray(dst)[keep], np.asarray(tokens, np.float64)[keep]
    pair, inv = np.unique(src * world + dst, return_inverse=True)
    return Messages(src=pair // world, dst=pair % world, tokens=np.bincount(inv, weights=tokens, minlength=len(pair)))


def _group_ring(plan: FCPPlan, sp: Spans, c: int):
    w = plan.world_size
    held = np.bincount(sp.rank, weights=sp.b - sp.a, minlength=w)
    ranks = np.arange(w)
    at = lambda shift: (ranks // c) * c + (ranks % c + shift) % c  # noqa: E731  group neighbour
    src_at = lambda i: (np.arange(len(sp.rank)), at(-i)[sp.rank])  # noqa: E731
    tok_at = lambda i: _aggregate(at(-1), ranks, held[at(-i - 1)], w)  # noqa: E731  block for step i+1
    final = lambda: _aggregate(ranks, at(1), held[at(1)], w)  # noqa: E731
    return src_at, tok_at, final, c if len(sp.rank) and c > 1 else 1


def _seq_rings(plan: FCPPlan, sp: Spans):
    """Per (rank, seq) entry: its position among the sequence's holders and their count."""
    w, n = plan.world_size, sp.num_seqs
    ukey = np.unique(sp.key)  # one entry per (rank, seq), sorted by (rank, seq)
    urank, useq = ukey // n, ukey % n
    tok = np.bincount(np.searchsorted(ukey, sp.key), weights=sp.b - sp.a, minlength=len(ukey))
    order = np.lexsort((urank, useq))  # entries by (seq, rank): holders of each seq in rank order
    g = np.bincount(useq, minlength=n)
    start = np.concatenate([[0], np.cumsum(g)])[:-1]
    pos = np.empty(len(ukey), np.int64)
    pos[order] = np.arange(len(ukey)) - start[useq[order]]
    gs = g[useq]
    holder = lambda e, shift: order[start[useq[e]] + (pos[e] + shift) % gs[e]]  # noqa: E731  entry index

    def src_at(i):
        span_entry = np.searchsorted(ukey, sp.key)
        ent = np.nonzero(gs[span_entry] > i)[0]
        return ent, urank[holder(span_entry[ent], -i)]

    def tok_at(i):
        e = np.nonzero(gs > i + 1)[0]
        return _aggregate(urank[holder(e, -1)], urank[e], tok[holder(e, -i - 1)], w)

    def final():
        e = np.nonzero(gs > 1)[0]
        return _aggregate(urank[e], urank[holder(e, 1)], tok[holder(e, 1)], w)

    return src_at, tok_at, final, int(g.max(initial=1))
