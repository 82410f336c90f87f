"""``plan_batch``: placement + communication plan of one global batch. Pure and deterministic.

Placement (:mod:`.placement` for ``fcp``, :mod:`.baseline_placements` for the others) decides which rank
holds which token ranges; :mod:`.rounds` derives the K/V each rank needs and colours the messages into
congestion-free rounds. ``ring`` and ``allgather`` move what their algorithms move (every rank receives
every other rank's chunk of each shared sequence) in the cyclic schedule of a ring: in round k, rank r
sends to r+k+1.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, NamedTuple, Sequence

import numpy as np

from .baseline_placements import place_allgather, place_packing, place_ring
from .bounds import work_bound
from .candidates import Option, alternatives, choose, grouped_options, searched, step_time, tried_blocks
from .checks import check_int, check_plan_size, check_seq_lens
from .cost import kernel_for
from .execution import RankChoices, RankWork, execution, larger_direction, remote_stage_counts
from .fcp_plan import FCPPlan, Span, WindowPlan, revised
from .placement import place_fcp
from .relay import relayed, relays
from .rounds import colour_rounds, coloured, needed_pieces, windowed_pieces
from .schedule import MARGIN, SEARCH_WORK, StageWork, choose_schedule, layer_time, search_work
from .segments import pieces_of
from .settings import PlanSettings, settings_from
from .topology import by_nodes

_SIMPLE = {"ring": place_ring, "allgather": place_allgather, "packing": place_packing}
STAGE_CHOICES = 3
"""Stage counts :func:`choose_stages` compares: ``max_stages`` and that halved, ``STAGE_CHOICES − 1`` times.
In the simulator the fastest count of 4-32 stages was 4 for one W=64 batch and 8-32 for the others
(W = 16-256 on lognormal, stdlib, paper, bimodal and light batches of seed 3), and the planner's timeline
picked the simulator's fastest count or one within 0.5% of it."""


def plan_batch(seq_lens: Sequence[int], *, world_size: int, settings: PlanSettings | None = None,
               **overrides: Any) -> FCPPlan:
    """Plan one global batch for ``world_size`` ranks.

    Args:
        seq_lens: lengths of the batch's sequences in input order (sequence ``i`` is the ``i``-th run of
            the concatenated batch); integers ≥ 1.
        world_size: number of ranks sharing the batch (data and context parallel together).
        settings: a :class:`hf_fcp.PlanSettings`, validated once when it was built (``FCPPlugin`` and
            ``FCPCollator`` pass theirs); default ``PlanSettings()``.
        **overrides: :class:`PlanSettings` fields to set or change, e.g. ``block_size=4096``,
            ``tokens_per_rank=32768``, ``strategy="ring"``, ``balance="pairs"``, ``rounds_per_stage=2``.

    Returns:
        An :class:`FCPPlan`; ``plan.for_rank(r)`` is rank ``r``'s view, ``plan.stats()`` its figures.
    """
    t0 = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    # The planner allocates ~10^5 small tuples; with the collector running, W=256 lognormal/bimodal batches
    # plan in 42-51 ms instead of 32-42 ms (measured: benchmarks/bench_planner.py batches, median of 5).
    gc.disable()
    try:
        return _plan_batch(seq_lens, world_size, settings_from(settings, overrides), t0)
    finally:
        if gc_was_enabled:
            gc.enable()


def _plan_batch(seq_lens, world_size, settings: PlanSettings, t0: float) -> FCPPlan:
    lens = check_seq_lens(seq_lens)
    world = check_int("world_size", world_size)
    cap = settings.resolve_tokens_per_rank(sum(lens), world)
    check_plan_size(lens, world, settings.block_size, cap, settings.strategy)  # before anything is allocated
    block, strategy = settings.block_size, settings.strategy
    if strategy == "fcp":
        return _plan_fcp(lens, world, cap, settings, t0)
    spans = _SIMPLE[strategy](lens, world, cap)
    comm = "collective" if strategy in ("ring", "allgather") else "p2p"
    return make_plan(lens, spans, world_size=world, block_size=block, tokens_per_rank=cap, strategy=strategy,
                     comm=comm, settings=settings, started=t0)


def _plan_fcp(lens: tuple[int, ...], world: int, cap: int, settings: PlanSettings, t0: float) -> FCPPlan:
    """fcp's plan: its greedy placement (within the search budget, the best of its candidates), numbered by
    nodes, or the alternative it must not lose to that the timeline finds faster (:func:`_fastest`)."""
    block, kernel = settings.block_size, kernel_for(settings.balance, settings.kernel_cost)
    small = searched(lens, world)
    fused = settings.fusion != "none"  # the cost the greedy balances: fused, how most plans run
    greedy = lambda b: place_fcp(lens, world, b, cap, locality=float(settings.locality), kernel=kernel,  # noqa: E731
                                 fused=fused, layers=settings.attention_layers)
    spans = greedy(block)
    if not small and settings.fusion == "auto" and not _runs_fused(spans, settings, kernel):
        fused = False  # the fused-cost placement turned out to run split: balance split costs instead
        spans = greedy(block)
    simple = alternatives(lens, world, cap) if small else []
    if small:  # within the search budget: blocks finer than a quarter rank too, and the simple placements
        finer = [greedy(b) for b in tried_blocks(block, cap, world, lens)[1:]]
        spans = choose([spans, *finer, *simple], settings, kernel)
    placed = by_nodes(spans, settings.node_size)  # its ranks renumbered so that K/V stays inside nodes
    build = lambda x, s=settings: _build(lens, x, world_size=world, block_size=block, tokens_per_rank=cap,  # noqa: E731
                                         strategy="fcp", settings=s)
    in_group = lambda g_lens, ranks, g_cap, b: by_nodes(  # noqa: E731  groups are node-aligned
        place_fcp(g_lens, ranks, b, g_cap, locality=float(settings.locality), kernel=kernel, fused=fused,
                  layers=settings.attention_layers), settings.node_size if ranks % settings.node_size == 0 else None)
    others = [Option(None, lambda x=x: x) for x in simple if x != spans]
    if small and placed is not spans:  # within the search budget, the numbering it was placed in too
        others.insert(0, Option(None, lambda: spans))
    others += grouped_options(lens, world, cap, block, settings.node_size, in_group, kernel)
    return _fastest(placed, others, build, kernel, settings, t0)


def _fastest(placed: list[list[Span]], others: list[Option], build, kernel, settings: PlanSettings,
             t0: float) -> FCPPlan:
    """The plan of ``placed`` or of one of the ``others`` placements, whichever the engine's timeline
    (:func:`.schedule.layer_time`) finds fastest, each in its fastest stage count (:func:`fastest_stages`:
    the baselines get that choice too). ``build(spans)``: :func:`_build` of a placement.

    Best first: every candidate has a lower bound of its layer time — before it is placed
    (``Option.bound``; unknown: 0), once placed :func:`.bounds.work_bound` (compute and communication) —
    and the one of lowest bound is taken next: placed if it is not, else planned. The search stops when the
    lowest bound left is above the fastest plan found (none left could win), so an alternative is placed or
    planned only when its bound does not rule it out. Among plans within ``MARGIN`` of each other the
    earlier candidate (``placed``, then ``others`` in order) is kept. Models with sliding-window layers
    keep ``placed`` (the timeline prices full attention only). A candidate whose exchange is relayed
    (:mod:`.relay`) is priced with its plain exchange too, and the faster of the two is its plan."""
    if any(w is not None for w, _ in settings.attention_layers):
        return replace(build(placed).plan, plan_ms=(time.perf_counter() - t0) * 1e3)
    heap = [(_bound(placed, kernel, settings), 0, placed, None)]
    heap += [(option.bound or 0.0, i, None, option) for i, option in enumerate(others, 1)]
    heapq.heapify(heap)
    best, best_t, best_i, restaged = None, np.inf, -1, False
    while heap and heap[0][0] <= best_t:
        key, i, spans, option = heapq.heappop(heap)
        if spans is None:  # not placed yet
            spans = option.build()
            if spans is not None:
                heapq.heappush(heap, (max(key, _bound(spans, kernel, settings)), i, spans, None))
            continue
        staged, t, moved = _staged(build(spans), kernel)
        if staged.relay_from and settings.relay == "auto":  # relayed: its plain exchange where that is faster
            never = replace(settings, relay="never")
            if _bound(spans, kernel, never) < min(t, best_t * (1 + MARGIN)):  # (and could count)
                plain, t_plain, moved_plain = _staged(build(spans, never), kernel)
                if t_plain < t:
                    staged, t, moved = plain, t_plain, moved_plain
        if t < best_t * (1 - MARGIN) or (i < best_i and t <= best_t * (1 + MARGIN)):
            # without its cached message array while the others are planned (at W=1024 a large one)
            best, best_t, best_i, restaged = replace(staged), t, i, moved
    return replace(_colour(best, kernel) if restaged else best, plan_ms=(time.perf_counter() - t0) * 1e3)


def _bound(spans: list[list[Span]], kernel, settings: PlanSettings) -> float:
    """:func:`.bounds.work_bound` of a placement; 0 when no bound is claimed."""
    return work_bound(spans, kernel, settings) or 0.0


def _staged(built: _Built, kernel) -> tuple[FCPPlan, float, bool]:
    """(:func:`fastest_stages` of a built plan, its layer time, whether its stage count changed)."""
    staged, t = fastest_stages(built.plan, kernel, built.pieces, built.base)
    return staged, t, staged is not built.plan


def _runs_fused(spans, settings: PlanSettings, kernel) -> bool:
    """Whether the execution model (:func:`.execution.execution`) runs every sequence of ``spans`` fused."""
    return step_time(spans, settings, kernel, detail=True)[2]


def make_plan(seq_lens: tuple[int, ...], spans: list[list[Span]], *, world_size: int, block_size: int,
              tokens_per_rank: int, strategy: str, comm: str = "p2p", settings: PlanSettings | None = None,
              started: float | None = None) -> FCPPlan:
    """Build an :class:`FCPPlan` from any placement (used by the strategies of ``hf_fcp.simulate`` too).

    ``spans[r]`` lists rank r's ``(seq, start, end)`` ranges in local order; together they must cover
    every token once. ``comm="p2p"``: targeted sends of the causally needed KV in Δ coloured rounds, in
    the number of stages :func:`choose_stages` picks when ``settings.max_stages`` is set, relayed across
    nodes (:mod:`.relay`, ``settings.relay``) unless the plain exchange's timeline is faster;
    ``comm="collective"``: ring / all-gather traffic (every shared sequence's chunks to every holder).
    """
    t0 = time.perf_counter() if started is None else started
    build = lambda s: _build(seq_lens, spans, world_size=world_size, block_size=block_size,  # noqa: E731
                             tokens_per_rank=tokens_per_rank, strategy=strategy, comm=comm, settings=s)
    built = build(settings)
    kernel = kernel_for(built.plan.settings.balance, built.plan.settings.kernel_cost)
    plan = _choose_stages(built, kernel)
    if plan.relay_from and settings.relay == "auto":  # the plain exchange instead where the timeline finds it faster
        plain = _choose_stages(build(replace(settings, relay="never")), kernel)
        if layer_time(plain, kernel) < layer_time(plan, kernel):
            plan = plain
    return replace(plan, plan_ms=(time.perf_counter() - t0) * 1e3)


class _Built(NamedTuple):
    """A plan as :func:`_build` returns it, with what :func:`fastest_stages` would otherwise compute again:
    its pieces (:func:`.segments.pieces_of`; None: not known) and the :class:`.execution.RankWork` of its
    placement (None: not known)."""

    plan: FCPPlan
    pieces: np.ndarray | None = None
    base: RankWork | None = None


def _build(seq_lens, spans, *, world_size: int, block_size: int, tokens_per_rank: int, strategy: str,
           comm: str = "p2p", settings: PlanSettings | None = None) -> _Built:
    """:func:`make_plan` with ``settings.max_stages`` stages (at most), the count not chosen."""
    known, relay_from = None, 0  # the p2p exchange's pieces and message array; its relay phase
    if comm == "collective":
        transfers, rounds = (), (world_size - 1 if any(len(_holders(spans).get(s, ())) > 1
                                                       for s in range(len(seq_lens))) else 0)
    elif comm == "p2p":
        relay = settings is not None and relays(settings, world_size) and relayed(spans, settings.node_size)
        if relay:
            transfers, rounds, pieces, messages, relay_from = relay
        else:
            transfers, rounds, pieces, messages = coloured(spans)
        known = pieces, messages
        if settings is not None and settings.max_stages:
            settings = replace(settings, rounds_per_stage=_per_stage(rounds, settings.max_stages))
    else:
        raise ValueError(f"comm: got {comm!r}, expected 'p2p' or 'collective'")
    settings = settings or PlanSettings()
    windows = tuple(WindowPlan(w, *colour_rounds(windowed_pieces(spans, w))) for w, _ in settings.attention_layers if w)
    plan = FCPPlan(seq_lens=tuple(seq_lens), world_size=world_size, block_size=block_size,
                   tokens_per_rank=tokens_per_rank, strategy=strategy, rank_spans=tuple(tuple(s) for s in spans),
                   transfers=transfers, num_rounds=rounds, settings=settings, collective=comm == "collective",
                   windows=windows, relay_from=relay_from)
    return _schedule(plan, known)


def _per_stage(rounds: int, stages: int) -> int:
    """``rounds_per_stage`` that runs ``rounds`` rounds in at most ``stages`` stages."""
    return max(1, -(-rounds // stages))


def choose_stages(plan: FCPPlan, kernel) -> FCPPlan:
    """``plan`` run in the number of communication stages its timeline (:func:`.schedule.layer_time`)
    finds fastest among ``max_stages``, half and a quarter of it (:data:`STAGE_CHOICES` counts): more
    stages start computing on the first K/V sooner, fewer pay fewer segment set-ups. The new count gets
    its execution and, within the search budget, its colouring chosen again. Plans without
    ``max_stages``, without rounds or with sliding-window layers keep theirs."""
    return _choose_stages(_Built(plan), kernel)


def _choose_stages(built: _Built, kernel) -> FCPPlan:
    if not _stages_chosen(built.plan):
        return built.plan
    best, _, moved = _staged(built, kernel)
    return _colour(best, kernel) if moved else best


def _stages_chosen(plan: FCPPlan) -> bool:
    return bool(plan.settings.max_stages and plan.num_rounds >= 2 and not plan.collective
                and all(w is None for w, _ in plan.settings.attention_layers))


def fastest_stages(plan: FCPPlan, kernel, pieces: np.ndarray | None = None, base: RankWork | None = None
                   ) -> tuple[FCPPlan, float]:
    """(``plan`` in the stage count of :func:`choose_stages`, its execution chosen again for that count but
    not its colouring; its layer time). ``plan``: a p2p plan of full-attention layers; ``pieces`` and
    ``base``: its :func:`.segments.pieces_of` and :class:`.execution.RankWork`, when known."""
    pieces = pieces_of(plan) if pieces is None else pieces  # the same for every stage count
    works = {plan.fused: StageWork(plan, kernel, pieces)}
    best, best_t = plan, layer_time(plan, kernel, works[plan.fused])
    if not _stages_chosen(plan):
        return best, best_t
    cap, rounds = plan.settings.max_stages, plan.num_rounds
    tried, link = {plan.settings.rounds_per_stage}, _link_tokens(plan)
    for k in range(1, STAGE_CHOICES):
        per = _per_stage(rounds, max(1, cap >> k))
        if per in tried:
            continue
        tried.add(per)
        base = base or RankWork([list(x) for x in plan.rank_spans], kernel, plan.settings.attention_layers)
        alt = choose_execution(revised(plan, settings=replace(plan.settings, rounds_per_stage=per)), link, base,
                               pieces)
        if alt.fused not in works:  # the work depends on the execution, not the stages
            works[alt.fused] = StageWork(alt, kernel, pieces)
        t = layer_time(alt, kernel, works[alt.fused])
        if t < best_t * (1 - MARGIN):
            best, best_t = alt, t
    return best, best_t


def _colour(plan: FCPPlan, kernel) -> FCPPlan:
    """``plan`` with the execution and colouring :func:`.schedule.choose_schedule` picks (for its stage count),
    when the search fits its budget and the exchange is not relayed (its colourings would drop the relays)."""
    if plan.relay_from or search_work(plan) > SEARCH_WORK:
        return plan
    return choose_schedule(plan, needed_pieces([list(x) for x in plan.rank_spans]), kernel)


def schedule(plan: FCPPlan) -> FCPPlan:
    """``plan`` with its execution chosen by the per-rank model (:func:`choose_execution`) and, for a p2p
    plan (fcp's, or any placement given to :func:`make_plan`) whose schedule search fits its budget
    (:data:`.schedule.SEARCH_WORK`), the execution and colouring of its exchange that the timeline finds
    fastest (:func:`.schedule.choose_schedule`) — again after a change of ``rounds_per_stage``."""
    return _schedule(plan).plan


def _schedule(plan: FCPPlan, known: tuple[np.ndarray, np.ndarray] | None = None) -> _Built:
    """:func:`schedule`, with the pieces and :class:`.execution.RankWork` of the plan it returns (the pieces
    only while its colouring is the one it came with). ``known``: its pieces and message array
    (:func:`.rounds.coloured`), when known."""
    if plan.collective:
        return _Built(choose_execution(plan))
    kernel = kernel_for(plan.settings.balance, plan.settings.kernel_cost)
    if known is None:
        pieces = pieces_of(plan)
    else:
        pieces = known[0]
        plan.__dict__.setdefault("message_array", known[1])  # cached_property's slot: not computed again
    base = RankWork([list(x) for x in plan.rank_spans], kernel, plan.settings.attention_layers)
    plan = choose_execution(plan, base=base, pieces=pieces)
    coloured_ = _colour(plan, kernel)
    return _Built(coloured_, pieces if coloured_.transfers is plan.transfers else None, base)


def choose_execution(plan: FCPPlan, link: np.ndarray | None = None, base: RankWork | None = None,
                     pieces: np.ndarray | None = None) -> FCPPlan:
    """``plan`` with the execution its settings and the model choose (``overlap``, ``fused``;
    :func:`.execution.execution`) — again after a change of ``rounds_per_stage``, which changes how many
    segments a split sequence runs. ``link``: its per-rank link tokens (:func:`_link_tokens`), ``base``:
    the :class:`.execution.RankWork` of its placement, ``pieces``: its :func:`.segments.pieces_of`, when known."""
    settings = plan.settings
    kernel = kernel_for(settings.balance, settings.kernel_cost)
    pieces = pieces_of(plan) if pieces is None else pieces
    segments = remote_stage_counts(pieces, plan.stage_of(pieces[:, 2]), len(plan.seq_lens))
    choices = RankChoices([list(x) for x in plan.rank_spans], kernel, settings.attention_layers, segments, base)
    _, _, split, overlap = execution(choices, _link_tokens(plan) if link is None else link, settings, kernel)
    fused = () if settings.fusion == "none" else tuple(held - skip for held, skip in zip(choices.base.seqs, split))
    return revised(plan, fused=fused, overlap=overlap)


def _link_tokens(plan: FCPPlan) -> np.ndarray:
    """:func:`.execution.larger_direction` of ``plan``'s exchanges (full and sliding-window kinds)."""
    kinds = []
    for window, count in plan.settings.attention_layers:
        one = plan.for_window(window)
        if one.collective:  # ring / all-gather traffic, built from the placement
            mat = one.comm_matrix()
            src, dst = np.nonzero(mat)
            kinds.append((count, src, dst, mat[src, dst]))
        else:
            m = one.message_array
            kinds.append((count, m[:, 0], m[:, 1], m[:, 2]))
    return larger_direction(plan.world_size, kinds)


def _holders(spans) -> dict[int, set[int]]:
    out: dict[int, set[int]] = defaultdict(set)
    for r, rank_spans in enumerate(spans):
        for s, _, _ in rank_spans:
            out[s].add(r)
    return out


