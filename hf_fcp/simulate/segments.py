"""What each rank computes and sends, extracted from a plan as flat numpy arrays (vectorised: plans at
256 ranks hold tens of thousands of spans).

Segments (:class:`Segments`, :class:`Spans`, the local and p2p stage segments) are described once, in
:mod:`hf_fcp.plan.segments`, where the planner prices them too; this module adds the messages (a
**message** moves ``tokens`` K/V rows from ``src`` to ``dst``) and the all-gather and ring schedules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..plan.fcp_plan import FCPPlan
from ..plan.segments import (  # noqa: F401  (Segments, Spans, local_segments: re-exported for the engine)
    RemoteSegments,
    Segments,
    Spans,
    local_segments,
    local_split_segments,
    make_segments,
    pieces_of,
)
from ..plan.spans import span_cost


@dataclass(kw_only=True)
class Messages:
    """Flat arrays (n,) of messages of one exchange."""

    src: np.ndarray
    dst: np.ndarray
    tokens: np.ndarray


def prefix_segments(sp: Spans) -> Segments:
    """Slot 0, all K/V present (all-gather): each span against its whole causal prefix."""
    n = sp.b - sp.a
    return make_segments(sp.rank, 0, n, sp.b, span_cost(sp.a, sp.b))


def p2p_segments(plan: FCPPlan, sp: Spans) -> tuple[Segments, list[Messages]]:
    """Slot 1 + stage: the split sequences' held spans against the pieces of their sequence that arrived
    in that stage, and the fused sequences' runs after position 0 against all their keys, in the slot of
    the last stage they need (:class:`hf_fcp.plan.segments.RemoteSegments`, as the planner prices them).
    Also the messages of every stage (forward direction)."""
    num_stages = len(plan.stages)
    p = pieces_of(plan)
    src, dst, stage, c, d = p[:, 0], p[:, 1], plan.stage_of(p[:, 2]), p[:, 4], p[:, 5]
    msgs = [_aggregate(src[stage == st], dst[stage == st], (d - c)[stage == st], plan.world_size)
            for st in range(num_stages)]
    return RemoteSegments(sp, p).segments(stage, num_stages, plan.overlap), msgs


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
        return make_segments(sp.rank[e], i, q, k, q * k)

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
