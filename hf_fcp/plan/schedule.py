"""How an fcp plan runs its exchange — the execution and the colouring — chosen by its modelled layer time.

Any proper colouring of the message graph moves the same K/V in the same number of rounds, but not at the
same time: a stage's exchange waits for both ends of every message in it, a rank's exchanges run in
stream order, a fused run waits for the last stage that brings its keys, and in the backward an owner
waits for the last of its dK/dV. In the simulator, ten random colourings of the same W=8 plans differed
by 2–3% of a layer. So while the search fits its budget (:data:`SEARCH_WORK`, at any world size) the
planner prices, on the engine's :mod:`.timeline` in kernel-work units (the rank views' segments priced by
the kernel model, a message's time its tokens × ``link_cost`` — ``node_link_cost`` inside a node — plus
``link_latency`` × ``link_cost``), each execution the settings allow with the messages coloured in
:data:`ORDERS` deterministic orders, keeps the fastest, and then swaps pairs of its rounds while that helps
(:func:`swap_rounds`). Earlier options win ties, so the choice is a pure function of the plan.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from . import timeline
from .cost import KernelCost
from .fcp_plan import FCPPlan, Transfer, revised
from .rounds import colour_rounds
from .segments import RemoteSegments, Spans, launches, local_segments, pieces_of, priced

ORDERS = 8
"""Colourings tried: the message graph's order, reversed, by size both ways, and seeded shuffles."""
SWAP_PASSES = 4
"""Rounds of best-improvement pair swaps of the chosen colouring's rounds, at most."""
RECOLOUR = 0.03
"""Executions more than this slower than the fastest, each with the message graph's colouring, are not
recoloured (the colouring moved a layer by at most ~3% in the simulator)."""
SEARCH_WORK = 30_000
"""The colouring search (:func:`choose_schedule`) runs on a plan whose :func:`search_work` is at most this.
Rule: a search of at most ~250 ms on two shared CPU cores (~5-10 µs per unit), measured on ``light`` and
``bimodal`` batches (seeds 100-101, W = 8-64, 8K and 32K tokens per rank), workloads and seeds the
benchmarks do not use. One-node plans need 2-10 thousand units; plans of thousands of messages, millions."""
MARGIN = 1e-5
"""An option replaces the incumbent only if it is this much faster (relative): a near tie is not left to
float rounding, which could differ between the ranks' machines (they must agree on the plan)."""

LOOKUP_WORLD = 2048
"""Up to this world size :meth:`StageWork.stage_arrays` finds each piece's stage in a table of all W²
sender-receiver pairs (32 MiB at 2048 ranks) rather than by sorting the messages."""

Messages = np.ndarray
"""int64 (n, 4): one row ``(sender, receiver, K/V tokens, round)`` per message."""


def layer_time(plan: FCPPlan, kernel: KernelCost, work: "StageWork | None" = None) -> float:
    """Modelled forward + backward time of one full-attention layer of a p2p plan (slowest rank of each
    pass), in kernel-work units (:mod:`.timeline`). ``work``: ``StageWork(plan, kernel)`` when known."""
    return float(layer_times([plan], work or StageWork(plan, kernel))[0])


def layer_times(plans: list[FCPPlan], work: "StageWork") -> np.ndarray:
    """:func:`layer_time` of plans that differ only in their colouring (``work``: their :class:`StageWork`),
    all in one timeline (:func:`_times`)."""
    return _times([_messages(p) for p in plans], plans[0], work)


def _messages(plan: FCPPlan) -> Messages:
    return plan.message_array


def _times(candidates: list[Messages], plan: FCPPlan, work: "StageWork") -> np.ndarray:
    """Layer time of ``plan`` with each candidate's rounds, in one timeline: candidate i's ranks are ranks
    ``i·W ... i·W + W − 1`` of a larger world (the timeline's work is per rank and per message)."""
    w, nstages, settings = work.world, len(plan.stages), plan.settings
    cf, cb = np.zeros((len(candidates) * w, 1 + nstages)), np.zeros((len(candidates) * w, 1 + nstages))
    node, inside = settings.node_size, settings.node_link_cost
    parts = []
    for i, cand in enumerate(candidates):
        src, dst, tokens, stage = cand[:, 0], cand[:, 1], cand[:, 2], plan.stage_of(cand[:, 3])
        cf[i * w:(i + 1) * w], cb[i * w:(i + 1) * w] = work.stage_arrays(src, dst, stage, nstages, plan.overlap)
        cost = settings.link_cost if inside is None else np.where(src // node == dst // node, inside,
                                                                   settings.link_cost)
        parts.append((i * w + src, i * w + dst, tokens * cost, stage))
    src, dst, duration, stage = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(stage, kind="stable")  # per stage, the candidates' messages in their order
    bounds = np.searchsorted(stage[order], np.arange(nstages + 1))
    arrays = [(src[o], dst[o], duration[o]) for o in (order[bounds[k]:bounds[k + 1]] for k in range(nstages))]

    def exchange(avail, k, back):
        src, dst, duration = arrays[k]
        return timeline.exchange(avail, dst if back else src, src if back else dst, duration,
                                 settings.link_latency * settings.link_cost)

    if plan.overlap:
        fwd, bwd, _, _ = timeline.overlapped(cf, cb, exchange, 1.0 - settings.overlap_slowdown, nstages)
    else:
        fwd, bwd, _, _ = timeline.exposed(cf, cb, exchange)
    return fwd.reshape(len(candidates), w).max(1) + bwd.reshape(len(candidates), w).max(1)


def slot_work(plan: FCPPlan, kernel: KernelCost, work: "StageWork | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) work (W, 1 + stages) per rank of its local work and of each stage's work, as
    the rank views run the plan (:mod:`.tasks`: fused runs in the stage of their last piece, split
    sequences' remote segments per stage, consecutive runs that see the same pieces in one segment)."""
    m = plan.message_array
    stage_of = dict(zip(zip(m[:, 0].tolist(), m[:, 1].tolist()), plan.stage_of(m[:, 3]).tolist()))
    return (work or StageWork(plan, kernel)).arrays(stage_of, len(plan.stages), plan.overlap)


class StageWork:
    """The kernel work of a placement run as ``plan.fused`` says, ready to be laid out in the stages of any
    colouring of its messages: the rank's segments of :mod:`.segments` (the description the simulator
    times), priced with the kernel model. ``pieces``: the plan's :func:`.segments.pieces_of`, when known."""

    def __init__(self, plan: FCPPlan, kernel: KernelCost, pieces: np.ndarray | None = None):
        self.kernel, self.world = kernel, plan.world_size
        spans, pieces = Spans.of(plan), pieces_of(plan) if pieces is None else pieces
        self.message = pieces[:, 0] * self.world + pieces[:, 1]  # (src, dst) of each piece
        self.remote = RemoteSegments(spans, pieces)
        local = local_segments(spans)
        self.local, self.local_launches = priced(local, kernel, self.world, 1), launches(local, self.world, 1)

    def arrays(self, stage_of: dict[tuple[int, int], int], nstages: int, overlap: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`slot_work` for the colouring whose message ``(src, dst)`` goes in stage ``stage_of[src, dst]``."""
        src, dst = (np.fromiter((k[i] for k in stage_of), np.int64, len(stage_of)) for i in (0, 1))
        return self.stage_arrays(src, dst, np.fromiter(stage_of.values(), np.int64, len(stage_of)), nstages,
                                 overlap)

    def stage_arrays(self, src: np.ndarray, dst: np.ndarray, stage: np.ndarray, nstages: int,
                     overlap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`arrays` with the messages as arrays: message ``src[i] -> dst[i]`` in stage ``stage[i]``.
        ``overlap``: whether the plan overlaps (else its remote work runs as one kernel after the exchange)."""
        keys = src * self.world + dst
        if self.world <= LOOKUP_WORLD:  # each piece's message's stage, by a table of every (src, dst)
            table = np.empty(self.world * self.world, np.int64)
            table[keys] = stage
            stage = table[self.message]
        else:
            order = np.argsort(keys)
            stage = stage[order][np.searchsorted(keys[order], self.message)]
        remote = self.remote.segments(stage, nstages, True)
        fwd, bwd = priced(remote, self.kernel, self.world, 1 + nstages)
        fwd[:, :1] += self.local[0]
        bwd[:, :1] += self.local[1]
        if self.kernel.launch:  # one kernel launch per time slot with work
            slots = launches(remote, self.world, 1 + nstages)
            if not overlap and nstages:  # every stage's remote work in one kernel, after every stage arrived
                slots[:, -1], slots[:, 1:-1] = slots[:, 1:].any(1), False
            slots[:, :1] |= self.local_launches
            launch = slots * (self.kernel.launch * self.kernel.tile_work)
            fwd, bwd = fwd + launch, bwd + launch
        return fwd, bwd


def search_work(plan: FCPPlan) -> int:
    """Size of :func:`choose_schedule`'s search on ``plan``: the layer timelines it may price (each
    execution's colourings, then every pass of round swaps) times a timeline's size (messages + ranks)."""
    n, per = plan.num_rounds, plan.settings.rounds_per_stage
    pairs = n * (n - 1) // 2 - sum(k * (k - 1) // 2 for k in (min(per, n - i) for i in range(0, n, per)))
    return (3 * ORDERS + SWAP_PASSES * pairs) * (len(plan.transfers) + plan.world_size)


def choose_schedule(plan: FCPPlan, pieces, kernel: KernelCost) -> FCPPlan:
    """``plan`` run the way, and with the colouring, of lowest :func:`layer_time`: each execution its
    settings allow (:func:`executions`; ``plan``'s own first) with its colouring chosen
    (:func:`choose_rounds`), then the fastest one's rounds swapped (:func:`swap_rounds`). Plans with a
    sliding-window layer keep theirs (the timeline prices full attention only)."""
    if not plan.num_rounds or any(w is not None for w, _ in plan.settings.attention_layers):
        return plan
    ways = [(p, StageWork(p, kernel)) for p in executions(plan)]
    timed = [layer_time(p, kernel, work) for p, work in ways]
    options = colourings(plan, pieces)  # the same for every execution
    best, best_t, best_work = plan, np.inf, ways[0][1]
    for (p, work), t in zip(ways, timed):
        if t > min(timed) * (1 + RECOLOUR):
            continue  # no colouring makes up for that much
        p, t = _best_colouring(p, work, options)
        if t < best_t * (1 - MARGIN):
            best, best_t, best_work = p, t, work
    return swap_rounds(best, best_work, best_t)


def executions(plan: FCPPlan) -> list[FCPPlan]:
    """``plan`` as given, then run each other way its ``overlap`` and ``fusion`` settings allow: the
    exchange overlapped with every sequence fused or every sequence split, or the exchange first and
    every sequence fused (split when ``fusion="none"``)."""
    settings = plan.settings
    fused = tuple(frozenset(s for s, _, _ in x) for x in plan.rank_spans)
    split = ()  # every rank runs every sequence split (``FCPPlan.fused``)
    out, seen = [plan], {(plan.overlap, plan.fused)}
    for overlap in (True, False):
        if settings.overlap == ("never" if overlap else "always"):
            continue
        ways = {"all": [fused], "none": [split], "auto": [fused, split] if overlap else [fused]}[settings.fusion]
        for way in ways:
            if (overlap, way) not in seen:
                seen.add((overlap, way))
                out.append(revised(plan, overlap=overlap, fused=way))
    return out


def choose_rounds(plan: FCPPlan, pieces, kernel: KernelCost, work: StageWork | None = None,
                  options: list | None = None) -> FCPPlan:
    """``plan`` with the colouring of ``pieces`` (:func:`.rounds.needed_pieces` of its placement) whose
    :func:`layer_time` is lowest among its own and :data:`ORDERS` orders' (module doc; ``options``:
    :func:`colourings`, when known); ties keep the earlier. Plans with a sliding-window layer keep theirs."""
    if plan.num_rounds < 2 or any(w is not None for w, _ in plan.settings.attention_layers):
        return plan
    return _best_colouring(plan, work or StageWork(plan, kernel), options or colourings(plan, pieces))[0]


def _best_colouring(plan: FCPPlan, work: StageWork, options: list) -> tuple[FCPPlan, float]:
    """(``plan`` with the fastest of ``options``' colourings, its :func:`layer_time`); ties keep the earlier."""
    plans = [replace(plan, transfers=t, num_rounds=n) for t, n in options]
    times = layer_times(plans, work)  # the same work for every colouring
    best = 0
    for i, t in enumerate(times):
        if t < times[best] * (1 - MARGIN):
            best = i
    return plans[best], float(times[best])


def colourings(plan: FCPPlan, pieces) -> list[tuple[tuple[Transfer, ...], int]]:
    """``(transfers, rounds)`` of ``plan``'s own colouring (maybe chosen for other stages), then of every
    other one :data:`ORDERS` orders of ``pieces`` give."""
    out, seen = [(plan.transfers, plan.num_rounds)], {_colouring(plan.transfers)}
    for order in _orders(pieces):
        transfers, rounds = colour_rounds(pieces, order)
        if _colouring(transfers) not in seen:
            seen.add(_colouring(transfers))
            out.append((transfers, rounds))
    return out


def swap_rounds(plan: FCPPlan, work: StageWork, time: float | None = None) -> FCPPlan:
    """``plan`` after up to :data:`SWAP_PASSES` best-improvement swaps of two of its rounds (the rounds'
    order decides what arrives first and which rounds share a stage; any order stays a proper colouring).
    Swaps within one stage change nothing and are not tried. ``time``: ``plan``'s :func:`layer_time`, when
    known."""
    n, per = plan.num_rounds, plan.settings.rounds_per_stage
    if n < 2 or any(w is not None for w, _ in plan.settings.attention_layers):
        return plan
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if i // per != j // per]
    order, msgs = np.arange(n), _messages(plan)
    best_t = _times([msgs], plan, work)[0] if time is None else time
    for _ in range(SWAP_PASSES):
        if not pairs:
            break
        now = order[msgs[:, 3]]
        swapped = [np.column_stack([msgs[:, :3], np.where(now == i, j, np.where(now == j, i, now))])
                   for i, j in pairs]
        times = _times(swapped, plan, work)
        k = int(np.argmin(times))
        if not times[k] < best_t * (1 - MARGIN):
            break
        i, j = pairs[k]
        order = np.where(order == i, j, np.where(order == j, i, order))
        best_t = times[k]
    if (order == np.arange(n)).all():
        return plan
    order = order.tolist()
    moved = (Transfer(t.src, t.dst, order[t.round], t.pieces) for t in plan.transfers)
    return replace(plan, transfers=tuple(sorted(moved, key=lambda t: (t.round, t.src, t.dst))))


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
