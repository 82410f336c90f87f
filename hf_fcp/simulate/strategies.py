"""Placement strategies the simulator compares; each builds an :class:`hf_fcp.FCPPlan` and names the
schedule the engine times it with (``p2p`` rounds, ``ring`` steps, ``allgather`` or ``local``).

Fixed-CP baselines (``ring``, ``allgather``, ``wlb``, ``magi``) use one CP group size ``c`` for all ranks,
as a launched job does: by default the smallest power of two whose group holds the batch's longest
sequence under ``tokens_per_rank`` (``fixed_cp_size``; chosen per batch, which a real job cannot do), or
with ``cp_size="best"`` the fastest such size per batch in hindsight; the ``W / c`` groups are data
parallel. Whole sequences go to groups; a group may end a few tokens over ``c × tokens_per_rank`` when
whole sequences do not fill the groups exactly (real loaders vary micro-batch lengths the same way) —
``memory_imbalance`` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..plan import FCPPlan, PlanSettings, make_plan, plan_batch, span_cost
from ..plan.baseline_placements import assign_to_groups, dispatch, merge_sorted, zigzag
from ..plan.candidates import tried_blocks
from ..plan.settings import settings_from
from ..plan.spans import Span

STRATEGY_NAMES = ("fcp", "ring", "allgather", "bytescale", "wlb", "magi", "packing")
FIXED_CP = ("ring", "allgather", "wlb", "magi")


@dataclass(kw_only=True)
class Candidate:
    """A plan plus how its communication is scheduled."""

    plan: FCPPlan
    """Placement (and, for ``p2p``, the coloured rounds) of one batch."""
    schedule: str
    """``p2p`` (targeted sends in stages), ``ring`` (per-sequence rings, compute overlapped per step),
    ``allgather`` (K/V gathered before compute, dK/dV reduce-scattered after) or ``local`` (no traffic)."""
    cp_size: int = 1
    """CP group size for fixed-group strategies (1 for fcp/bytescale/packing)."""


class NotApplicable(ValueError):
    """The strategy cannot run this batch (e.g. ``packing`` with a sequence longer than a rank holds)."""


def fixed_cp_size(lens, world: int, cap: int) -> int:
    """Smallest power of two ``c`` with ``c × cap ≥ max(lens)`` that divides ``world`` (else ``world``)."""
    need = -(-max(lens) // cap)
    c = 1 << (need - 1).bit_length()
    return c if c <= world and world % c == 0 else world


def cp_sizes(lens, world: int, cap: int, cp_size: str | int) -> list[int]:
    """CP group sizes to try: ``"min"`` → [fixed_cp_size]; ``"best"`` → every power-of-two multiple of it
    that divides ``world`` (the engine keeps the fastest: the best fixed size in hindsight); an int → it."""
    c = fixed_cp_size(lens, world, cap)
    if cp_size == "min":
        return [c]
    if cp_size == "best":
        return [c << i for i in range(world.bit_length()) if (c << i) <= world and world % (c << i) == 0]
    if isinstance(cp_size, int) and not isinstance(cp_size, bool) and cp_size >= 1:
        if world % cp_size:
            raise NotApplicable(f"cp size {cp_size} does not divide world size {world}")
        if cp_size * cap < max(lens):
            raise NotApplicable(f"cp size {cp_size} cannot hold the longest sequence: {max(lens)} tokens > "
                                f"{cp_size} x {cap} tokens per rank")
        return [cp_size]
    raise ValueError(f"cp_size must be 'min', 'best' or a positive integer, got {cp_size!r}")


def _put(spans: list[list[Span]], s: int, pieces) -> None:
    for r, a, b in pieces:
        spans[r].append((s, a, b))


COLLECTIVE_SETTINGS = PlanSettings(fusion="none", overlap="always")  # ring-style plans: every sequence split
STAGES = 16
"""Communication stages of fcp and magi, at most (``PlanSettings.max_stages``): each plan runs in the count of
16, 8 or 4 its timeline finds fastest (:func:`hf_fcp.plan.planner.choose_stages`); 0 = one stage per round."""


def _finish(lens, spans, world, block, cap, name, schedule, cp=1, comm="collective",
            settings: PlanSettings = COLLECTIVE_SETTINGS) -> Candidate:
    spans = [merge_sorted(r) for r in spans]
    plan = make_plan(tuple(int(x) for x in lens), spans, world_size=world, block_size=block, tokens_per_rank=cap,
                     strategy=name, comm=comm, settings=settings)
    return Candidate(plan=plan, schedule=schedule, cp_size=cp)


def _in_groups(lens, world: int, cap: int, cp_size, by_cost: bool = False):
    """(c, group index, ranks of the group, its sequences) for every tried CP size c and DP group."""
    for c in cp_sizes(lens, world, cap, cp_size):
        groups = assign_to_groups(lens, world // c, c * cap, by_cost=by_cost)
        yield c, [(list(range(g * c, (g + 1) * c)), seqs) for g, seqs in enumerate(groups)]


def ring(lens, world, block, cap, *, cp_size="min", **_) -> list[Candidate]:
    """TransformerEngine context parallelism (Megatron-LM ``cp_comm_type="p2p"``, THD format): every
    sequence of a CP group is zigzag-sharded over the group's c ranks and K/V blocks rotate around the ring
    (c − 1 steps, each overlapped with the step's compute); groups are data parallel, filled by tokens."""
    out = []
    for c, groups in _in_groups(lens, world, cap, cp_size):
        spans: list[list[Span]] = [[] for _ in range(world)]
        for ranks, seqs in groups:
            for i, s in enumerate(seqs):
                _put(spans, s, zigzag(0, int(lens[s]), ranks, extra_from=i))
        out.append(_finish(lens, spans, world, block, cap, "ring", "ring", c))
    return out


def allgather(lens, world, block, cap, *, cp_size="min", **_) -> list[Candidate]:
    """Llama 3 context parallelism (Dubey et al. 2024, "The Llama 3 Herd of Models", §3.3.2): the same
    2c-chunk zigzag split as ``ring`` over a fixed group, but K/V are all-gathered before attention (not
    overlapped) and dK/dV reduce-scattered after it. Simplified: one all-gather per layer for all
    sequences of the group."""
    return [Candidate(plan=replace(cand.plan, strategy="allgather"), schedule="allgather", cp_size=cand.cp_size)
            for cand in ring(lens, world, block, cap, cp_size=cp_size)]


def wlb(lens, world, block, cap, *, cp_size="min", **_) -> list[Candidate]:
    """WLB-LLM (Wang et al., OSDI'25, arXiv 2503.17924): workload-aware packing of documents into the
    DP groups (largest attention cost first, to the least-loaded group with token room) and per-document
    sharding inside each fixed CP group; its adaptive selector picks per batch between per-document and
    per-sequence sharding by estimated latency — both are returned and the engine keeps the faster.
    Simplified: no outlier delay across batches (every batch is simulated on its own), no PP level."""
    out = []
    for c, groups in _in_groups(lens, world, cap, cp_size, by_cost=True):
        per_doc: list[list[Span]] = [[] for _ in range(world)]
        per_seq: list[list[Span]] = [[] for _ in range(world)]
        for ranks, seqs in groups:
            for i, s in enumerate(seqs):
                _put(per_doc, s, zigzag(0, int(lens[s]), ranks, extra_from=i))
            _zigzag_concat([(s, int(lens[s])) for s in seqs], ranks, per_seq)
        out += [_finish(lens, per_doc, world, block, cap, "wlb", "ring", c),
                _finish(lens, per_seq, world, block, cap, "wlb", "ring", c)]
    return out


def _zigzag_concat(docs: list[tuple[int, int]], ranks: list[int], out: list[list[Span]]) -> None:
    """Per-sequence sharding: the group's documents concatenated, cut into 2c chunks, zigzag."""
    total = sum(n for _, n in docs)
    c = len(ranks)
    bounds = [total * i // (2 * c) for i in range(2 * c + 1)]
    pos = 0
    for s, n in docs:
        for i in range(2 * c):
            a, b = max(bounds[i], pos), min(bounds[i + 1], pos + n)
            if b > a:
                out[ranks[i if i < c else 2 * c - 1 - i]].append((s, a - pos, b - pos))
        pos += n


def magi(lens, world, block, cap, *, cp_size="min", stages=STAGES, fcp_options=None, **_) -> list[Candidate]:
    """MagiAttention (SandAI 2025, github.com/SandAI-org/MagiAttention): the group's packed sequence is
    cut into equal chunks, dispatched with a min-heap so every rank of the fixed CP group gets the same
    number of chunks and a balanced mask area; only the needed K/V is sent (GroupCast, here the coloured
    P2P rounds), overlapped in at most ``stages`` stages (its multi-stage overlap). It gets what fcp gets:
    the planner settings of ``fcp_options`` (the same kernel, link and overlap model), the execution (fused
    or split, overlapped or exchange first), stage count and colouring of its rounds chosen the way fcp's
    are (:func:`hf_fcp.plan.planner.make_plan`), and one candidate per chunk size fcp tries
    (:func:`hf_fcp.plan.candidates.tried_blocks`; the engine keeps the fastest). Simplified: no dynamic
    solver, no Q/O communication; groups are data parallel, filled by tokens."""
    settings = settings_from(None, {**(fcp_options or {}), "max_stages": stages})
    out = []
    for c, groups in _in_groups(lens, world, cap, cp_size):
        for chunk in tried_blocks(block, cap, world, lens):
            spans = dispatch(lens, groups, chunk, world)
            out.append(_finish(lens, spans, world, chunk, cap, "magi", "p2p", c, comm="p2p", settings=settings))
    return out


def bytescale(lens, world, block, cap, **_) -> list[Candidate]:
    """ByteScale (Ge et al. 2025, arXiv 2502.21231) data-aware sharding: a sequence longer than a rank
    holds gets the fewest ranks that fit it (dynamic CP group, zigzag ring inside); shorter ones stay whole
    and are packed onto the rank with the least attention cost that has room (its compute balance), and
    one that fits nowhere whole is split over the ranks with most room. Simplified: a single micro-batch
    (no cross-micro-batch or PP balancing), rings as in TE."""
    lens = np.asarray(lens, np.int64)
    room, cost = np.full(world, cap, np.int64), np.zeros(world)
    spans: list[list[Span]] = [[] for _ in range(world)]
    for s in np.lexsort((np.arange(len(lens)), -lens)).tolist():
        n = int(lens[s])
        fits = room >= n
        if n <= cap and fits.any():
            r = int(np.argmin(np.where(fits, cost, np.inf)))
            spans[r].append((s, 0, n))
            room[r] -= n
            cost[r] += span_cost(0, n)
            continue
        ranks = _fewest_ranks(room, n)
        pieces = zigzag(0, n, ranks) if ranks else _contiguous(n, room)
        _put(spans, s, pieces)
        for r, a, b in pieces:
            room[r] -= b - a
            cost[r] += span_cost(a, b)
    return [_finish(lens, spans, world, block, cap, "bytescale", "ring")]


def _fewest_ranks(room: np.ndarray, n: int) -> list[int] | None:
    """The fewest ranks (most room first, then lowest index) whose equal zigzag shares of n tokens fit."""
    order = np.lexsort((np.arange(len(room)), -room))
    for g in range(1, len(room) + 1):
        share = -(-n // (2 * g)) * 2  # a rank takes two chunks of at most ceil(n / 2g) tokens
        if room[order[g - 1]] >= share:
            return sorted(order[:g].tolist())
        if room[order[g - 1]] <= 0:
            break
    return None


def _contiguous(n: int, room: np.ndarray) -> list[tuple[int, int, int]]:
    """n tokens as contiguous pieces on the ranks with most room (rooms too uneven for equal shares)."""
    a, out = 0, []
    for r in np.lexsort((np.arange(len(room)), -room)).tolist():
        take = min(int(room[r]), n - a)
        if take <= 0:
            break
        out.append((r, a, a + take))
        a += take
    return out


def fcp(lens, world, block, cap, *, stages=STAGES, fcp_options=None, **_) -> list[Candidate]:
    """This library's planner (``plan_batch(strategy="fcp", **fcp_options)``; default options unless
    given): blocks of every sequence bin-packed over all ranks, targeted P2P K/V sends in congestion-free
    rounds, coalesced into at most ``stages`` communication stages (``max_stages``, the count chosen by
    the planner; 0: one per round)."""
    plan = plan_batch(list(lens), world_size=world, block_size=block, tokens_per_rank=cap,
                      **{**(fcp_options or {}), "max_stages": stages})
    return [Candidate(plan=plan, schedule="p2p")]


def packing(lens, world, block, cap, **_) -> list[Candidate]:
    """Whole sequences per rank, no context parallelism; not applicable when a sequence does not fit."""
    try:
        plan = plan_batch(list(lens), world_size=world, block_size=block, tokens_per_rank=cap, strategy="packing")
    except ValueError as e:
        raise NotApplicable(str(e)) from None
    return [Candidate(plan=plan, schedule="local")]


BUILDERS = {"fcp": fcp, "ring": ring, "allgather": allgather, "bytescale": bytescale, "wlb": wlb, "magi": magi,
            "packing": packing}


def build(name: str, lens, *, world_size: int, block_size: int, tokens_per_rank: int, cp_size: str | int = "min",
          stages: int = STAGES, fcp_options: dict | None = None) -> list[Candidate]:
    """Candidate plans of strategy ``name`` for one batch; the engine times them all and keeps the fastest
    (WLB-LLM's adaptive sharding; every CP size of ``cp_sizes``). ``stages``: communication stages of the
    p2p strategies (fcp, magi); ``fcp_options``: planner options of fcp (``hf_fcp.PlanSettings``)."""
    if name not in BUILDERS:
        raise ValueError(f"strategy must be one of {list(STRATEGY_NAMES)}, got {name!r}")
    return BUILDERS[name](lens, world_size, block_size, tokens_per_rank, cp_size=cp_size, stages=stages,
                          fcp_options=fcp_options)
