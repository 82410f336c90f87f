"""``place_fcp``: the FCP bin-packer — which rank holds which token ranges. A pure function of (lengths,
world size, block, cap, kernel model); the output is, per rank, a list of ``(seq, start, end)`` spans in
local order (the simple placements it is compared with live in :mod:`.baseline_placements`).

How ``place_fcp`` balances compute and memory at once
-----------------------------------------------------
Every rank should end with the mean attention cost ``C`` and the mean token count ``T``. The cost is the
modelled kernel work of :mod:`.cost` under the default ``balance="kernel"`` (causal pairs plus what a
FlashAttention-style kernel spends on partial and diagonal tiles and per-tile set-up: a rank's runs are
re-costed as pieces join them), or the causal pairs alone under ``balance="pairs"``.
Items are the blocks of every sequence (a short sequence is one partial block). An item's *density* is
its cost per token (≈ its mean position); a rank's *need* is the density it still lacks,
``(C - cost) / (T - tokens)``. Items go out densest first, each to the neediest rank — dense late blocks
of long sequences pair with ranks that have room for them, light short sequences fill the rest, and the
smallest come last and close the gaps. Four refinements make it exact and local:

* **Split to fit.** When a dense item would push its rank past ``C`` (by more than a small slack), only
  the suffix that fits goes there — "fits" net of the light fill (mean density of the lightest half of
  all tokens) that the rank's remaining token room will still bring; the cut solves the quadratic cost
  (under a kernel cost: scaled by the item's work per pair when placed alone) and leaves no piece under
  ``MIN_PIECE`` tokens. The prefix goes on as a new, lighter item. A piece
  over the token cap is cut the same way, so a batch that fills every rank exactly is planned, and a
  block whose cost alone exceeds ``C`` (common at 256 ranks with 512K-token tails) is still balanced.
* **Locality.** A block goes to the rank holding its sequence's next block while that rank has net
  room and its need is at least ``locality`` × the neediest rank's, so a long sequence becomes a few
  contiguous runs of uneven length (early runs long, late runs short) rather than scattered blocks.
* **Repair.** A final pass swaps k tokens between the most and a less loaded rank until no rank
  exceeds ``C`` by more than ``REBALANCE_TARGET``; token counts are unchanged by construction. Under a
  kernel cost a swap is kept only if it lowers the pair's maximum (a swap also creates runs that need
  remote K/V).
* **Tile-aligned cuts.** Cuts fall on multiples of ``ALIGN`` (a kernel tile) where the piece bounds allow,
  so pieces of long sequences, and the K/V runs they receive, fill whole tiles.

Under a kernel cost, a placement that ends more than ``FALLBACK`` above the mean is compared with the
pair-balanced one (same kernel model) and the one with the lower maximum is kept.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .baseline_placements import merge_sorted
from .cost import (
    OVERHEADS,
    PAIRS,
    KernelCost,
    has_windows,
    rank_work,
    run_cost,
    segment_costs,
    seq_cost,
)
from .spans import Span, span_cost

SLACK = 0.004  # fraction of the mean cost a rank may exceed it by before an item is split instead
REBALANCE_TARGET = 0.004  # the repair pass stops once no rank exceeds the mean cost by more than this
FALLBACK = 0.02  # under a kernel cost, above this imbalance the pair-balanced placement is tried too
PARTNERS = 4  # under a kernel cost, the repair pass tries this many least loaded ranks for each swap
MIN_PIECE = 128  # cuts for compute balance leave no piece shorter than this (nor than the block)
ALIGN = 128  # cuts fall on multiples of this where they can: a FlashAttention tile, so that pieces of long
# sequences (and the K/V runs they receive) fill whole tiles instead of paying for a partial one per segment


def _blocks(lens: np.ndarray, block: int):
    nb = -(-lens // block)
    seq = np.repeat(np.arange(len(lens)), nb)
    j = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
    start = j * block
    end = np.minimum(start + block, lens[seq])
    return seq, start, end


def _cost(a: int, b: int) -> float:
    """Scalar ``span_cost`` in plain Python floats (the placement loop's hot path)."""
    return (b * (b + 1.0) - a * (a + 1.0)) / 2


class _Ranks:
    """Per-rank loads and a lazily invalidated max-heap on *need*, the density a rank still lacks."""

    def __init__(self, world: int, cost_target: float, tok_target: float, cap: int, fill: float):
        self.cost = [0.0] * world
        self.tok = [0] * world
        self.c_goal, self.t_goal, self.cap, self.fill = cost_target, tok_target, cap, fill
        self.version = [0] * world
        self.heap = [(-self.need(r), r, 0) for r in range(world)]
        heapq.heapify(self.heap)

    def need(self, r: int) -> float:
        room_t = self.t_goal - self.tok[r]
        if room_t <= 0:
            return -math.inf if self.tok[r] >= self.cap else -1e300 + (self.c_goal - self.cost[r])
        return (self.c_goal - self.cost[r]) / room_t

    def net_room(self, r: int) -> float:
        """Cost rank r can still take beyond the light fill its free token room will bring."""
        return self.c_goal - self.cost[r] - max(0.0, self.t_goal - self.tok[r]) * self.fill

    def add(self, r: int, cost: float, tok: int) -> None:
        self.cost[r] += cost
        self.tok[r] += tok
        self.version[r] += 1
        if self.tok[r] < self.cap:
            heapq.heappush(self.heap, (-self.need(r), r, self.version[r]))

    def neediest(self, want_tokens: int, tries: int = 8) -> int:
        """The neediest rank with token room; among the first ``tries`` candidates prefer one with room
        for ``want_tokens`` whole (so short sequences are not split needlessly)."""
        heap = self.heap
        while heap:  # the common case: the top entry is current and has room (nothing popped but stale ones)
            _, r, ver = heap[0]
            if ver != self.version[r] or self.tok[r] >= self.cap:
                heapq.heappop(heap)
                continue
            if self.cap - self.tok[r] >= want_tokens:
                return r
            break
        popped, choice = [], None
        while self.heap and len(popped) < tries:
            neg, r, ver = heapq.heappop(self.heap)
            if ver != self.version[r] or self.tok[r] >= self.cap:
                continue
            popped.append((neg, r, ver))
            if self.cap - self.tok[r] >= want_tokens:
                choice = r
                break
        for entry in popped:
            heapq.heappush(self.heap, entry)
        if choice is None:
            if not popped:
                raise RuntimeError("fcp placement ran out of rank capacity (tokens_per_rank check missed)")
            choice = popped[0][1]
        return choice


def _cut_for_cost(a: int, b: int, room: float, fill: float) -> int:
    """Smallest ``m`` in [a, b] with ``span_cost(m, b) - fill * (b - m) <= room``: the longest suffix
    whose cost, net of the ``fill`` density its tokens displace, fits ``room`` (needs positions > fill)."""
    lin = 1 - 2 * fill
    disc = lin * lin + 4 * (b * b + lin * b - 2 * room)
    m = math.ceil((-lin + math.sqrt(max(disc, 0.0))) / 2)
    return min(max(m, a), b)


def _light_fill_density(start: np.ndarray, end: np.ndarray, ratio: np.ndarray) -> float:
    """Mean density (cost per token) of the lightest half of all tokens: what a rank's leftover token
    room will be filled with at the end, when only light items remain."""
    density = (start + end + 1) / 2.0 * ratio
    tokens = (end - start).astype(np.float64)
    order = np.argsort(density, kind="stable")
    cum = np.cumsum(tokens[order])
    half = order[: int(np.searchsorted(cum, cum[-1] / 2)) + 1]
    return float((density[half] * tokens[half]).sum() / tokens[half].sum())


def place_fcp(lens: tuple[int, ...], world: int, block: int, cap: int, locality: float = 0.5,
              kernel: KernelCost = PAIRS, fused: bool = True, layers=((None, 1),)) -> list[list[Span]]:
    """The FCP placement balancing ``kernel`` (module doc) for ranks that run every sequence ``fused``
    (else split; :mod:`.tasks`), in an average layer of the model's ``layers`` (``((window or None,
    count), ...)``: sliding-window layers cost about tokens × window). Under a kernel cost, if the result
    is more than ``FALLBACK`` above the mean, the pair-balanced placement is also made and kept when its
    maximum rank work (under ``kernel``) is lower: the kernel-cost greedy misjudges some block sizes. Ranks
    are alike here; which of them share a node is the planner's numbering (:func:`.topology.by_nodes`)."""
    spans, cost = _place(lens, world, block, cap, locality, kernel, fused, layers)
    held = _Held(kernel, fused, layers)
    if held.pairs or cost.max() <= cost.mean() * (1 + FALLBACK):
        return spans
    alt = _place(lens, world, block, cap, locality, PAIRS, fused, layers)[0]
    return alt if max(held.rank_cost(r) for r in alt) < cost.max() else spans


def _place(lens, world, block, cap, locality, kernel, fused, layers) -> tuple[list[list[Span]], np.ndarray]:
    arr = np.asarray(lens, dtype=np.int64)
    total = int(arr.sum())
    seq, start, end = _blocks(arr, block)
    held = _Held(kernel, fused, layers)
    ratio = held.item_ratios(start, end)  # modelled cost / pairs of each item placed alone
    fill = _light_fill_density(start, end, ratio)
    goal = float((span_cost(start, end) * ratio).sum()) / world
    ranks = _Ranks(world, goal, total / world, cap, fill)
    soft_cap = min(cap, math.ceil(total / world * 1.01))
    ranks.cap = soft_cap if soft_cap * world >= total else cap
    order = np.lexsort((-start, seq, -(start + end)))  # densest first; ties by sequence, later first
    min_piece = max(1, min(block, MIN_PIECE, total // (8 * world)))  # tiny batches may cut finer
    holder: dict[int, int] = {}  # seq -> rank holding its most recently placed (earliest) piece
    out: list[list[Span]] = [[] for _ in range(world)]
    slack = SLACK * ranks.c_goal
    for s, a, b, x in zip(seq[order].tolist(), start[order].tolist(), end[order].tolist(), ratio[order].tolist()):
        whole_end = b
        while a < b:
            r = _choose(ranks, holder.get(s), a, b, locality)
            m = max(a, b - int(ranks.cap - ranks.tok[r]))  # token room
            if m > a:
                m = _align_up(m, b)
            room = ranks.net_room(r) / x  # in pairs
            cost = _cost(m, b)
            if cost - fill / x * (b - m) > room + slack / x and (a + b) / 2 > fill / x and room > slack / x:
                m = max(m, _cut(a, b, _cut_for_cost(a, b, room, fill / x), min_piece))  # dense, too big: cut
            out[r].append((s, m, b))
            ranks.add(r, held.add(r, s, m, b, x if m == a and b == whole_end else None), b - m)
            holder[s] = r
            b = m
    cost = _rebalance(out, ranks.cost, min_piece, held)
    return [merge_sorted(spans) for spans in out], cost


class _Held:
    """The cost of what each rank holds under ``kernel`` (:mod:`.cost`): plain pair counts for
    :data:`~hf_fcp.plan.cost.PAIRS`; else, run ``fused``, the sum of its runs' fused segments (touching
    runs of a sequence are one run), or, run split, per (rank, sequence) the modelled work of its runs.
    With sliding-window ``layers``, per (rank, sequence) the average layer's work of its runs."""

    def __init__(self, kernel: KernelCost, fused: bool = True, layers=((None, 1),)):
        self.kernel, self.fused, self.layers = kernel, fused, layers
        self.windows = has_windows(layers)
        self.pairs = kernel.tile == 1 and not any(getattr(kernel, f) for f in OVERHEADS) and not self.windows
        self.runs: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (rank, seq) -> runs held
        self.cost: dict[tuple[int, int], float] = {}  # (rank, seq) -> seq_cost of those runs

    def item_ratios(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Modelled cost / pairs of each item placed alone (its prefix held elsewhere)."""
        if self.pairs:
            return np.ones(len(start))
        n = (end - start).astype(np.float64)
        if self.windows:  # each item alone: its fused run (sliding layers) or its run as executed (full ones)
            alone = np.array([self._seq_cost([(a, b)]) for a, b in zip(start.tolist(), end.tolist())])
            return alone / span_cost(start, end)
        if self.fused:
            alone = segment_costs(n, end, True, self.kernel)
        else:
            alone = segment_costs(n, start, False, self.kernel) + segment_costs(n, n, True, self.kernel)
        return alone / span_cost(start, end)

    def add(self, r: int, s: int, a: int, b: int, ratio: float | None = None) -> float:
        """Rank r takes tokens [a, b) of sequence s: the increase of its cost. ``ratio``: the item's
        precomputed cost per pair when [a, b) is a whole item (its cost alone, if r holds nothing of s)."""
        if self.pairs:
            return _cost(a, b)
        key = (r, s)
        runs = self.runs.get(key)
        if runs is None and ratio is not None:  # the common case: a whole item on a new (rank, sequence)
            self.runs[key] = [(a, b)]
            self.cost[key] = ratio * _cost(a, b)
            return self.cost[key]
        if runs is None:
            runs = self.runs[key] = []
        if self.windows:
            runs.append((a, b))
            before, self.cost[key] = self.cost.get(key, 0.0), self._seq_cost(runs)
            return self.cost[key] - before
        if self.fused:
            return self._add_fused(runs, a, b)
        runs.append((a, b))
        before, self.cost[key] = self.cost.get(key, 0.0), seq_cost(runs, self.kernel)
        return self.cost[key] - before

    def _add_fused(self, runs: list[tuple[int, int]], a: int, b: int) -> float:
        """[a, b) joins the (rank, sequence)'s runs, merging with touching ones: the cost change."""
        k = self.kernel
        left = next((i for i, (_, e) in enumerate(runs) if e == a), None)
        right = next((i for i, (st, _) in enumerate(runs) if st == b), None)
        lo, hi, delta = a, b, 0.0
        for i in sorted({i for i in (left, right) if i is not None}, reverse=True):
            st, e = runs.pop(i)
            delta -= run_cost(st, e, k)
            lo, hi = min(lo, st), max(hi, e)
        runs.append((lo, hi))
        return delta + run_cost(lo, hi, k)

    def _seq_cost(self, runs: list[tuple[int, int]]) -> float:
        """Average-layer work of one (rank, sequence)'s runs (:func:`.cost.rank_work`)."""
        return rank_work([(0, a, b) for a, b in runs], self.kernel, frozenset({0}) if self.fused else frozenset(),
                         self.layers)

    def rank_cost(self, spans: list[Span]) -> float:
        """Cost of one rank's whole span list."""
        return rank_work(spans, self.kernel, frozenset(s for s, _, _ in spans) if self.fused else frozenset(),
                         self.layers)


def _cut(a: int, b: int, m: int, min_piece: int) -> int:
    """Move the cut ``m`` of ``[a, b)`` so that neither side is shorter than ``min_piece`` (the kernels
    run short query runs inefficiently) and onto a multiple of ``ALIGN`` when one lies in range; no cut
    (``a``) when the range is too short to cut."""
    if b - a < 2 * min_piece:
        return a
    m = min(max(m, a + min_piece), b - min_piece)
    near = round(m / ALIGN) * ALIGN
    return near if a + min_piece <= near <= b - min_piece else m


def _align_up(m: int, b: int) -> int:
    """``m`` rounded up to a multiple of ``ALIGN`` if that stays below ``b`` (a cut for token room)."""
    up = -(-m // ALIGN) * ALIGN
    return up if up < b else m


def _rebalance(out: list[list[Span]], costs: list[float], min_piece: int, held: _Held,
               target: float = REBALANCE_TARGET) -> np.ndarray:
    """Repair pass: while the most loaded rank exceeds the mean cost by more than ``target``, swap k
    tokens between it and a less loaded rank (:func:`_swap`). Token counts stay. Under pair costs the
    least loaded rank is the partner and the cost moves exactly as solved; under a kernel cost both ranks
    are re-costed, a swap that does not lower their maximum is undone, and the next least loaded ranks
    are tried (up to ``PARTNERS``) before the pass ends. Returns the final cost of every rank."""
    cost = np.asarray(costs, np.float64)
    for _ in range(4 * len(out)):
        hi = int(np.argmax(cost))
        goal = float(cost.mean())
        if cost[hi] <= goal * (1 + target) or not out[hi]:
            return cost
        per_pair = 1.0 if held.pairs else cost[hi] / max(1.0, sum(_cost(a, b) for _, a, b in out[hi]))
        for lo in _least(cost, 1 if held.pairs else PARTNERS):
            excess = min(cost[hi] - goal, goal - cost[lo])
            if held.pairs:
                undo = _swap(out, hi, lo, excess, min_piece) if excess > 0 and out[lo] else None
                if undo is not None:
                    cost[hi] -= undo[2]
                    cost[lo] += undo[2]
                    break
                continue
            if excess > 0 and out[lo] and _kernel_swap(out, hi, lo, excess / per_pair, min_piece, held, cost):
                break
        else:
            return cost
    return cost


def _least(cost: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` smallest costs, smallest first (ties: lower index)."""
    if n == 1:
        return [int(np.argmin(cost))]
    part = np.argpartition(cost, min(n, len(cost)) - 1)[:n]
    return sorted(part.tolist(), key=lambda i: (cost[i], i))


def _kernel_swap(out: list[list[Span]], hi: int, lo: int, excess: float, min_piece: int, held: _Held,
                 cost: np.ndarray) -> bool:
    """:func:`_swap` under a kernel cost: re-cost both ranks and keep the swap only if it lowers their
    maximum; a half-size swap is tried when the full one does not. Updates ``cost``."""
    for part in (excess, excess / 2):
        undo = _swap(out, hi, lo, part, min_piece)
        if undo is None:
            return False
        new_hi, new_lo = held.rank_cost(out[hi]), held.rank_cost(out[lo])
        if max(new_hi, new_lo) < cost[hi]:
            cost[hi], cost[lo] = new_hi, new_lo
            return True
        out[hi], out[lo] = undo[0], undo[1]
    return False


def _swap(out: list[list[Span]], hi: int, lo: int, excess: float, min_piece: int):
    """Swap the first k tokens of ``hi``'s latest-starting span for the first k tokens of one of ``lo``'s
    spans that starts earlier; the pairs move by exactly k × (difference of the two start positions), so
    k is solved for, not searched. The partner span is the farthest one that still lets k be at least
    ``min_piece`` (else the farthest); k ends both moved runs on a tile boundary when that does not
    overshoot. Returns ``(hi's old spans, lo's old spans, pairs moved)``, or None when no span fits."""
    x = max(range(len(out[hi])), key=lambda i: (out[hi][i][1], -i))
    sx, x0, x1 = out[hi][x]
    earlier = sorted((out[lo][i][1], i) for i in range(len(out[lo])) if out[lo][i][1] < x0)
    if not earlier:
        return None
    roomy = [(y0, i) for y0, i in earlier if x0 - y0 <= excess / min_piece]
    y = (roomy or earlier)[0][1]
    sy, y0, y1 = out[lo][y]
    k = min(math.ceil(excess / (x0 - y0)), x1 - x0, y1 - y0)
    aligned = -(-(x0 + k) // ALIGN) * ALIGN - x0
    if x0 % ALIGN == y0 % ALIGN == 0 and aligned <= min(x1 - x0, y1 - y0) and aligned * (x0 - y0) <= 1.5 * excess:
        k = aligned
    undo = (list(out[hi]), list(out[lo]), k * (x0 - y0))
    out[hi][x:x + 1] = [(sy, y0, y0 + k)] + ([(sx, x0 + k, x1)] if x0 + k < x1 else [])
    out[lo][y:y + 1] = [(sx, x0, x0 + k)] + ([(sy, y0 + k, y1)] if y0 + k < y1 else [])
    return undo


def _choose(ranks: _Ranks, adj: int | None, a: int, b: int, locality: float) -> int:
    """Where the piece ``[a, b)`` goes: the neediest rank, or ``adj`` (the rank holding the sequence's
    next piece) while it has net room and is at least ``locality`` × as needy."""
    r = ranks.neediest(b - a)
    if adj is not None and adj != r and ranks.tok[adj] < ranks.cap:
        if ranks.net_room(adj) > SLACK * ranks.c_goal and ranks.need(adj) >= locality * ranks.need(r):
            return adj
    return r
