"""Which congestion-free colouring of the exchange an fcp plan runs, chosen by its modelled layer time.

Any proper colouring of the message graph moves the same K/V in the same number of rounds, but not at the
same time: a stage's exchange waits for both ends of every message in it, a rank's exchanges run in
stream order, a fused run waits for the last stage that brings its keys, and in the backward an owner
waits for the last of its dK/dV. Measured in the simulator, the colouring alone moves one layer's time by
±2% on 8 ranks. So for small worlds the planner colours the messages in a few deterministic orders and
keeps the colouring whose :mod:`.timeline` — the engine's overlapped schedule, in kernel-work units (the
rank views' segments priced by the kernel model, a message's time its tokens × ``link_cost``) — ends
first; the first order (the message graph's own) wins ties, so the choice is a pure function of the plan.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from . import timeline
from .cost import KernelCost, segment_parts
from .execution import held_runs
from .fcp_plan import FCPPlan
from .rounds import colour_rounds

ORDERS = 8
"""Colourings tried: the message graph's order, reversed, by size both ways, and seeded shuffles."""
MARGIN = 1e-6
"""A colouring replaces the incumbent only if it is this much faster (relative): a near tie is not left to
float rounding, which could differ between the ranks' machines (they must agree on the plan)."""


def layer_time(plan: FCPPlan, kernel: KernelCost) -> float:
    """Modelled forward + backward time of one full-attention layer of an overlapped plan (slowest rank
    of each pass), in kernel-work units (:mod:`.timeline`)."""
    cf, cb = slot_work(plan, kernel)
    per = plan.settings.rounds_per_stage
    msgs = [[] for _ in range(cf.shape[1] - 1)]
    for t in plan.transfers:
        msgs[t.round // per].append((t.src, t.dst, sum(b - a for _, a, b in t.pieces)))
    arrays = [tuple(np.asarray(x, dtype) for x, dtype in zip(zip(*m), (np.int64, np.int64, np.float64)))
              if m else (np.zeros(0, np.int64),) * 2 + (np.zeros(0),) for m in msgs]
    cost = plan.settings.link_cost

    def exchange(avail, k, back):
        src, dst, tokens = arrays[k]
        return timeline.exchange(avail, dst if back else src, src if back else dst, tokens * cost, 0.0)

    fwd, bwd, _, _ = timeline.overlapped(cf, cb, exchange, 1.0 - plan.settings.overlap_slowdown, len(msgs))
    return float(fwd.max() + bwd.max())


def slot_work(plan: FCPPlan, kernel: KernelCost) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) work (W, 1 + stages) per rank of its local work and of each stage's work, as
    the rank views run the plan (:mod:`.tasks`: fused runs in the stage of their last piece, split
    sequences' remote segments per stage, consecutive runs that see the same pieces in one segment)."""
    per, nstages = plan.settings.rounds_per_stage, len(plan.stages)
    arrived: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (rank, seq) -> (start, end, stage)
    for t in plan.transfers:
        for s, a, b in t.pieces:
            arrived.setdefault((t.dst, s), []).append((a, b, t.round // per))
    cf, cb = np.zeros((plan.world_size, 1 + nstages)), np.zeros((plan.world_size, 1 + nstages))

    def add(r: int, slot: int, q: int, k: int, causal: bool) -> None:
        f, b = segment_parts(q, k, causal, kernel)
        cf[r, slot] += f
        cb[r, slot] += b

    for r, spans in enumerate(plan.rank_spans):
        fused = plan.fused_on(r)
        for s, runs in held_runs(spans).items():
            got = arrived.get((r, s), [])
            if s in fused:
                for a, b in runs:
                    add(r, 1 + max((st for _, d, st in got if d <= a), default=-1), b - a, b, True)
                continue
            held = sum(b - a for a, b in runs)
            add(r, 0, held, held, True)
            for st in {st for _, _, st in got}:
                _split_stage(add, r, 1 + st, runs, sorted((a, b) for a, b, x in got if x == st))
    return cf, cb


def _split_stage(add, r: int, slot: int, runs, pieces) -> None:
    """A split sequence's segments against one stage's pieces: runs seeing the same pieces share one."""
    q, keys = 0, 0
    for a, b in runs:
        k = sum(d - c for c, d in pieces if d <= a)
        if k != keys:
            if keys:
                add(r, slot, q, keys, False)
            q, keys = 0, k
        q += b - a
    if keys:
        add(r, slot, q, keys, False)


def choose_rounds(plan: FCPPlan, pieces, kernel: KernelCost) -> FCPPlan:
    """``plan`` with the colouring of ``pieces`` (:func:`.rounds.needed_pieces` of its placement) whose
    :func:`layer_time` is lowest among :data:`ORDERS` orders (module doc). Plans that do not overlap their
    exchange, or that have a sliding-window layer, keep theirs."""
    if not plan.overlap or plan.num_rounds < 2 or any(w is not None for w, _ in plan.settings.attention_layers):
        return plan
    best, best_t = plan, layer_time(plan, kernel)  # its colouring, maybe chosen for other stages
    seen = {_colouring(plan.transfers)}
    for order in _orders(pieces):
        transfers, rounds = colour_rounds(pieces, order)
        if _colouring(transfers) in seen:
            continue
        seen.add(_colouring(transfers))
        other = replace(plan, transfers=transfers, num_rounds=rounds)
        t = layer_time(other, kernel)
        if t < best_t * (1 - MARGIN):
            best, best_t = other, t
    return best


def _colouring(transfers) -> frozenset[tuple[int, int, int]]:
    return frozenset((t.src, t.dst, t.round) for t in transfers)


def _orders(pieces) -> list[list[tuple[int, int]]]:
    edges = list(pieces)
    size = {e: sum(b - a for _, a, b in pieces[e]) for e in edges}
    out = [edges, edges[::-1], sorted(edges, key=lambda e: (size[e], e)), sorted(edges, key=lambda e: (-size[e], e))]
    for seed in range(ORDERS - len(out)):
        shuffled = list(edges)
        random.Random(seed).shuffle(shuffled)
        out.append(shuffled)
    return out
