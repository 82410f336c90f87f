"""The fcp planner's candidates and how it chooses: never worse than its simple alternatives.

For every batch the planner makes the greedy placement (:func:`.placement.place_fcp`, balancing modelled
kernel work and, as a variant, causal pairs) and — while the search fits its budget (:func:`searched`) —
a finer-block greedy placement and the simple placements it must beat: every sequence zigzag-split over
all ranks, only the sequences that must span ranks zigzag-split (the rest whole, largest first onto the
least loaded rank with room), and contiguous all-gather-style shards. Each is polished by the local
search of :mod:`.search` and priced by :func:`step_time`, the modelled time of one attention layer as
the engine will run it; the fastest wins (ties: the earlier candidate, the greedy first). At every world
size the planner then also plans the grouped placements (:func:`grouped`) and keeps, of those plans and
its own, the one the engine's timeline finds fastest (:func:`hf_fcp.plan.planner.plan_batch`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .baseline_placements import assign_to_groups, merge_sorted, place_allgather, place_dispatch, place_ring, zigzag
from .checks import check_plan_size
from .cost import KernelCost
from .execution import RankChoices, execution, larger_direction, link_tokens, remote_source_counts
from .fcp_plan import imbalance
from .rounds import needed_columns
from .search import polish
from .settings import PlanSettings
from .spans import Span, pairs_per_list

SEARCH_SPANS = 2048
"""The candidate search runs while sequences × ranks (the spans of the all-rank zigzag, the largest
candidate) is at most this. Rule: a search of at most ~250 ms on two shared CPU cores, measured on
``light`` and ``bimodal`` batches (seeds 100-101, W = 8-64, 8K and 32K tokens per rank), workloads and
seeds the benchmarks do not use; its cost grows about linearly in that count (~0.1 ms per span)."""
POLISH_CUTS = 400  # a placement with more cuts is not polished
POLISHED = 2  # the fastest candidates before polishing that are polished
MIN_BLOCK = 512  # the finer greedy candidate never uses smaller blocks
TIE = 5e-3  # candidates this close to the fastest are told apart by their balance (the exposure model is coarse)


def searched(lens, world: int) -> bool:
    """Whether the planner searches beyond its greedy placement for this batch (:data:`SEARCH_SPANS`)."""
    return len(lens) * world <= SEARCH_SPANS


def tried_blocks(block: int, cap: int, world: int, lens) -> list[int]:
    """The block sizes the fcp planner places ``lens`` with: ``block``, and a finer one (at least
    ``MIN_BLOCK``, when that is finer): while it searches (:func:`searched`) a quarter of a rank's mean share
    of the batch for its own candidates; beyond its search budget (hundreds of ranks, where documents are
    cut over many of them) half of ``block`` for the grouped placements (:func:`grouped_options`) — each only
    while the batch in the finer blocks stays within the planner's size limits (``cap`` tokens a rank)."""
    # the finer block follows the batch, not the budget
    finer = max(MIN_BLOCK, min(block, _mean_share(lens, world) // 4) if searched(lens, world) else block // 2)
    return [block, finer] if finer < block and _plannable(lens, world, finer, cap) else [block]


def _mean_share(lens, world: int) -> int:
    """A rank's mean share of the batch's tokens, rounded up."""
    return -(-int(np.sum(lens, dtype=np.int64)) // world)


def _plannable(lens, world: int, block: int, cap: int) -> bool:
    """Whether the batch in blocks of ``block`` is within the planner's size limits
    (:func:`.checks.check_plan_size`): a finer block never takes a plan past what they bound."""
    try:
        check_plan_size(lens, world, block, cap)
    except ValueError:
        return False
    return True


def zigzag_long(lens, world: int, cap: int) -> list[list[Span]]:
    """Sequences longer than ``cap`` zigzag-split over all ranks; the others whole, longest first onto the
    rank with the fewest causal pairs among those with token room (else the most room)."""
    out: list[list[Span]] = [[] for _ in range(world)]
    tokens, pairs = np.zeros(world, np.int64), np.zeros(world)
    ranks = list(range(world))
    for s, n in enumerate(lens):
        if n > cap:
            for r, a, b in zigzag(0, n, ranks, extra_from=s):
                out[r].append((s, a, b))
                tokens[r] += b - a
                pairs[r] += (b * (b + 1.0) - a * (a + 1.0)) / 2
    for s in sorted((s for s, n in enumerate(lens) if n <= cap), key=lambda s: (-lens[s], s)):
        n = lens[s]
        room = cap - tokens
        r = int(np.argmin(np.where(room >= n, pairs, np.inf))) if (room >= n).any() else int(np.argmax(room))
        if room[r] < n:  # no rank has room for it whole: fill the ranks with most room
            _spread(out, tokens, s, 0, n, cap)
            continue
        out[r].append((s, 0, n))
        tokens[r] += n
        pairs[r] += n * (n + 1.0) / 2
    return [merge_sorted(x) for x in out]


def _spread(out, tokens, s: int, a: int, b: int, cap: int) -> None:
    for r in np.argsort(tokens, kind="stable").tolist():
        take = min(b - a, cap - int(tokens[r]))
        if take > 0:
            out[r].append((s, a, a + take))
            tokens[r] += take
            a += take
        if a >= b:
            return


def step_time(spans: list[list[Span]], settings: PlanSettings, kernel: KernelCost, detail: bool = False):
    """(modelled time of an average attention layer of ``spans`` run as :func:`.execution.execution`
    decides, imbalance of its rank work) — with ``detail``, also whether it runs every sequence fused — with
    the exchange the planner's rounds will carry (every rank receives the prefix of its runs it does not
    hold; under a sliding window, the window before each run)."""
    layers = settings.attention_layers
    src, dst, seq, a, b, _ = needed_columns(spans)  # arrays: at hundreds of ranks, tens of thousands of messages
    segments = remote_source_counts(src, dst, seq, int(seq.max(initial=0)) + 1)
    if all(w is None for w, _ in layers):
        link = larger_direction(len(spans), [(count, src, dst, b - a) for _, count in layers])
    else:  # sliding-window layers move only the keys inside their windows
        link = link_tokens(spans, layers)
    t, work, split, _ = execution(RankChoices(spans, kernel, layers, segments), link, settings, kernel)
    return (t, imbalance(work), not any(split)) if detail else (t, imbalance(work))


def choose(candidates: list[list[list[Span]]], settings: PlanSettings, kernel: KernelCost) -> list[list[Span]]:
    """The candidate with the lowest :func:`step_time`; among those within ``TIE`` of it, the best balanced
    (then the first). The ``POLISHED`` fastest are also polished (:func:`.search.polish`) and join in."""
    world = len(candidates[0])
    timed = [step_time(c, settings, kernel) for c in candidates]
    for i in sorted(range(len(candidates)), key=lambda i: (timed[i][0], i))[:POLISHED]:
        if _cuts(candidates[i]) <= POLISH_CUTS:  # the polished placement joins the candidates
            candidates.append(polish(candidates[i], world, kernel, settings.attention_layers))
            timed.append(step_time(candidates[-1], settings, kernel))
    fastest = min(t for t, _ in timed)
    return candidates[min((i for i in range(len(candidates)) if timed[i][0] <= fastest * (1 + TIE)),
                          key=lambda i: (timed[i][1], i))]


def _cuts(spans: list[list[Span]]) -> int:
    return sum(len(x) for x in spans) - len({s for x in spans for s, _, _ in x})


def alternatives(lens, world: int, cap: int) -> list[list[list[Span]]]:
    """The simple placements the fcp planner must not lose to (module doc), those within ``cap`` tokens a
    rank (a zigzag's rounding can put a token or two more on a rank)."""
    simple = (place_ring(lens, world, cap), zigzag_long(lens, world, cap), place_allgather(lens, world, cap))
    return [x for x in simple if within(x, cap) is not None]


def within(spans: list[list[Span]] | None, cap: int) -> list[list[Span]] | None:
    """``spans``, or None when it is None or puts more than ``cap`` tokens on a rank."""
    return spans if spans is not None and max(sum(b - a for _, a, b in x) for x in spans) <= cap else None


def grouped(lens, world: int, cap: int, block: int, node: int, place) -> list[list[list[Span]]]:
    """The grouped placements the fcp planner must not lose to, at every world size: MagiAttention's
    chunk dispatch over all ranks (:func:`.baseline_placements.place_dispatch`) with each block size fcp
    tries, and, restricted to node-aligned groups of ``node × 2^k < world`` ranks (:func:`in_groups`),
    ``place`` (fcp's greedy: ``place(lengths, ranks, cap, block)``) and the dispatch in the groups of
    :func:`group_items` — beyond the search budget with each block size fcp tries, within it with
    ``block`` — and the dispatch in the groups MagiAttention makes, with each block size, where they
    differ; where those groups hold more than ``cap`` tokens a rank (at group sizes that hold the longest
    sequence, the CP sizes MagiAttention can run), that dispatch with the chunks over the cap moved to the
    least-loaded ranks with room (``place_dispatch(..., capped=True)``); where every sequence fits a rank,
    groups of one rank too: every sequence whole, as the fixed-group baselines place them at CP 1
    (:func:`whole_documents`: by tokens, and by causal pairs among the ranks with room under ``cap`` or
    under the batch's mean share; no communication). Placements that would put
    more than ``cap`` tokens on a rank are left out (whole documents fit only where the budget has room)."""
    built = (option.build() for option in grouped_options(lens, world, cap, block, node, place, kernel=None))
    return [x for x in built if x is not None]


class Option(NamedTuple):
    """A candidate placement not built yet: ``build()`` returns it (None when it puts more than the cap on
    a rank); ``bound`` is a lower bound of its modelled layer time, known before it is placed
    (the causal pairs of its busiest group spread evenly; every pair costs at least one unit of
    :func:`.bounds.work_bound`; None: not known)."""

    bound: float | None
    build: Callable[[], "list[list[Span]] | None"]


def grouped_options(lens, world: int, cap: int, block: int, node: int, place, kernel: KernelCost | None
                    ) -> list[Option]:
    """:func:`grouped`'s placements as :class:`Option` s; those restricted to groups carry a bound known
    before their ranks are placed (the causal pairs of the busiest group spread evenly over its ranks;
    ``kernel``: the planner's kernel model, None for no bounds)."""
    blocks = tried_blocks(block, cap, world, lens)
    out = [Option(None, lambda b=b: within(place_dispatch(lens, world, b, cap), cap)) for b in blocks]
    if max(lens) <= cap:  # groups of one rank: whole documents, no communication
        share = _mean_share(lens, world)  # WLB-LLM fills its groups to the mean share
        ways = [(cap, False), (cap, True)] + ([(share, True)] if share < cap else [])
        out += [Option(None, lambda way=way: within(whole_documents(lens, world, *way), cap)) for way in ways]
    dispatch = lambda g_lens, ranks, g_cap, b: place_dispatch(g_lens, ranks, b, g_cap)  # noqa: E731
    bounded = kernel is not None and min(kernel.coefficients) >= 0
    c = node
    while 1 < c < world and world % c == 0:
        ours = group_items(lens, world, cap, c)
        kinds = [(place, ours, False), (dispatch, ours, False)]
        theirs = _dispatch_groups(lens, world, cap, c)
        if theirs is not None and theirs != ours:  # MagiAttention's own groups and chunks, as it runs them
            kinds.append((dispatch, theirs, True))
        elif theirs is None and c * cap >= max(lens):  # over the cap (at a CP size MagiAttention can run):
            # its dispatch with what overflows moved to ranks with room
            capped = lambda b, c=c: place_dispatch(lens, world, b, cap, group=c, capped=True)  # noqa: E731
            out += [Option(None, lambda b=b, capped=capped: within(capped(b), cap)) for b in blocks]
        bounds = [_busiest_pairs(items) / c if bounded else None for _, items, _ in kinds]
        for b in blocks:
            for (inner, items, every_block), bound in zip(kinds, bounds):
                if b != block and searched(lens, world) and not every_block:
                    continue
                at = lambda g_lens, ranks, g_cap, inner=inner, b=b: inner(g_lens, ranks, g_cap, b)  # noqa: E731
                out.append(Option(bound, lambda items=items, c=c, at=at: within(_place_groups(items, world, c, cap, at),
                                                                                            cap)))
        c *= 2
    return out


def whole_documents(lens, world: int, room: int, by_cost: bool) -> list[list[Span]]:
    """Every sequence whole on one rank, as the fixed-group baselines place them in groups of one rank
    (:func:`.baseline_placements.assign_to_groups`: by tokens, or ``by_cost`` by causal pairs among the
    ranks with room for it under ``room`` tokens, else the fewest tokens); it may put more than ``room``
    tokens on a rank."""
    return [sorted((s, 0, int(lens[s])) for s in seqs) for seqs in assign_to_groups(lens, world, room, by_cost)]


def _dispatch_groups(lens, world: int, cap: int, group: int) -> list[list[Span]] | None:
    """The groups MagiAttention's data parallelism makes (whole sequences, largest first, to the group with
    the fewest tokens: :func:`.baseline_placements.assign_to_groups`) as per-group items; None when a group
    would hold more than ``group × cap`` tokens."""
    seqs = assign_to_groups(lens, world // group, group * cap)
    if max(sum(lens[s] for s in x) for x in seqs) > group * cap:
        return None
    return [[(s, 0, lens[s]) for s in x] for x in seqs]


def _busiest_pairs(lists: list[list[Span]]) -> float:
    """The most causal pairs (:func:`.spans.span_cost`) of any list of ``(seq, start, end)`` spans."""
    return float(pairs_per_list(lists).max(initial=0.0))


def in_groups(lens, world: int, cap: int, group: int, place) -> list[list[Span]]:
    """A placement restricted to groups of ``group`` consecutive ranks: whole sequences to the groups
    (:func:`group_items`), then inside each group ``place(lengths, group, cap)`` places its items as if
    each were a sequence of its own."""
    return _place_groups(group_items(lens, world, cap, group), world, group, cap, place)


def group_items(lens, world: int, cap: int, group: int) -> list[list[Span]]:
    """Per group of ``group`` consecutive ranks, the ``(seq, start, end)`` items it holds: whole sequences,
    largest causal cost first, to the cheapest group with token room; one that fits no group whole is cut
    over the groups with most room (its pieces then need K/V from the groups before them)."""
    lens = np.asarray(lens, np.int64)
    ngroups = world // group
    room, cost = np.full(ngroups, group * cap, np.int64), np.zeros(ngroups)
    items: list[list[Span]] = [[] for _ in range(ngroups)]
    for s in np.lexsort((np.arange(len(lens)), -lens)).tolist():
        n = int(lens[s])
        fits = room >= n
        if fits.any():
            g = int(np.argmin(np.where(fits, cost, np.inf)))
            items[g].append((s, 0, n))
            room[g] -= n
            cost[g] += n * (n + 1.0) / 2
            continue
        a = 0
        for g in np.lexsort((np.arange(ngroups), -room)).tolist():
            take = min(int(room[g]), n - a)
            if take > 0:
                items[g].append((s, a, a + take))
                room[g] -= take
                cost[g] += (a + take) * (a + take + 1.0) / 2 - a * (a + 1.0) / 2
                a += take
    return items


def _place_groups(items: list[list[Span]], world: int, group: int, cap: int, place) -> list[list[Span]]:
    out: list[list[Span]] = [[] for _ in range(world)]
    for g, its in enumerate(items):
        if its:
            for i, spans in enumerate(place(tuple(b - a for _, a, b in its), group, cap)):
                out[g * group + i] = [(its[k][0], its[k][1] + x, its[k][1] + y) for k, x, y in spans]
    return [merge_sorted(x) for x in out]
