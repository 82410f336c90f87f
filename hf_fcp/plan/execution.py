"""How the ranks run a placement, and its modelled layer time: the planner's execution model.

A rank either receives every K/V first and then runs every held sequence *fused* (one causal segment per
held run against all its keys), or *overlaps* the exchange with compute. Overlapped, a transfer costs the
kernels beside it ``overlap_slowdown`` of their speed while it runs, and is exposed where it outlasts the
rank's *independent* work — the work that needs no remote K/V: whole documents and runs at position 0
when a sequence runs fused, every held sequence's local causal segment when it runs split (then the
remote keys get one more segment per stage that brings them). Fused is less kernel work, split more work
that can hide the transfer: :func:`execution` prices exchange-first, overlapped fused and overlapped split
(every rank alike) and takes the fastest. (Choosing per rank and sequence, by the most hiding per extra
work, modelled faster but ran slower in the simulator — a rank's exposure also delays the ranks waiting
for its dK/dV — so the choice stays uniform; the engine runs any per-rank mix, ``FCPPlan.fused``.) Within
its budget, :mod:`.schedule` then prices the same uniform options on the engine's timeline, which
couples the ranks, and has the last word.

Times are in kernel-work units (causal pairs, forward + backward; :mod:`.cost`); ``link_cost`` converts
K/V tokens moved into them.
"""

from __future__ import annotations

import numpy as np

from .cost import KernelCost, layered_run_cost, run_cost, segment_cost, seq_cost, touching_runs
from .rounds import needed_pieces, windowed_pieces
from .settings import PlanSettings
from .spans import Span


def link_tokens(spans: list[list[Span]], layers, pieces=None) -> np.ndarray:
    """:func:`larger_direction` of the exchanges ``spans`` needs for the model's ``layers`` (``pieces``:
    :func:`.rounds.needed_pieces` of ``spans``, when known)."""
    if pieces is None:
        pieces = needed_pieces(spans) if any(w is None for w, _ in layers) else {}
    kinds = []
    for window, count in layers:
        pairs = pieces if window is None else windowed_pieces(spans, window)
        src, dst, tokens = (np.fromiter(x, np.int64, len(pairs)) for x in (
            (s for s, _ in pairs), (d for _, d in pairs), (sum(b - a for _, a, b in got) for got in pairs.values())))
        kinds.append((count, src, dst, tokens))
    return larger_direction(len(spans), kinds)


def larger_direction(world: int, kinds) -> np.ndarray:
    """Per rank, the K/V tokens it sends or receives in a layer, the larger of the two (links are full
    duplex), averaged over the model's layers: ``kinds`` holds ``(layers, src, dst, tokens)`` per layer
    kind (int arrays, one entry per message). The one link-token count of the planner."""
    total, layers = np.zeros(world), 0
    for count, src, dst, tokens in kinds:
        weights = np.asarray(tokens, np.float64)
        total = total + count * np.maximum(np.bincount(src, weights, world), np.bincount(dst, weights, world))
        layers += count
    return total / layers


def remote_sources(pieces) -> dict[tuple[int, int], int]:
    """(rank, seq) -> how many ranks send it K/V of the sequence (``pieces``: :func:`.rounds.needed_pieces`):
    the remote segments it runs split when every round is its own stage (``rounds_per_stage=1``)."""
    out: dict[tuple[int, int], int] = {}
    for (_, dst), got in pieces.items():
        for s in {s for s, _, _ in got}:
            out[dst, s] = out.get((dst, s), 0) + 1
    return out


def remote_stages(pieces: np.ndarray, rounds_per_stage: int, num_seqs: int) -> dict[tuple[int, int], int]:
    """(rank, seq) -> in how many communication stages K/V of the sequence reach the rank: the remote
    segments it runs split (one per stage that brings keys). ``pieces``: :func:`.segments.pieces_of`."""
    if not len(pieces):
        return {}
    key = pieces[:, 1] * num_seqs + pieces[:, 3]
    stage = pieces[:, 2] // rounds_per_stage
    top = int(stage.max()) + 1
    pairs = np.unique(key * top + stage) // top
    keys, counts = np.unique(pairs, return_counts=True)
    return dict(zip(zip((keys // num_seqs).tolist(), (keys % num_seqs).tolist()), counts.tolist()))


def _full_share(layers) -> float:
    return sum(count for w, count in layers if w is None) / sum(count for _, count in layers)


class RankWork:
    """What :class:`RankChoices` needs that does not depend on the stages: per rank the work and independent
    work with every sequence fused, per sequence that needs remote keys what running it split adds with one
    remote segment (``(seq, extra work, extra independent work)``), and the tokens each rank holds of each
    sequence."""

    def __init__(self, spans: list[list[Span]], kernel: KernelCost, layers):
        self.kernel, self.layers = kernel, layers
        self.held: dict[tuple[int, int], int] = {}  # of the (rank, seq) that need remote keys, at least
        if all(w is None for w, _ in layers):
            self._full_attention(spans, kernel)
            return
        full = _full_share(layers)  # the layer-weighted average over full and sliding-window layers
        self.work, self.free = np.zeros(len(spans)), np.zeros(len(spans))
        self.options: list[list[tuple[int, float, float]]] = []
        for r, x in enumerate(spans):
            opts = []
            for s, runs in held_runs(x).items():
                held = sum(b - a for a, b in runs)
                self.held[r, s] = held
                self.work[r] += sum(layered_run_cost(a, b, layers, kernel) for a, b in runs)
                self.free[r] += layered_run_cost(0, runs[0][1], layers, kernel) if runs[0][0] == 0 else 0.0
                if runs[-1][0] > 0 and full > 0:  # some run needs remote keys: splitting it is a choice
                    full_fused = sum(run_cost(a, b, kernel) for a, b in runs)
                    full_head = run_cost(0, runs[0][1], kernel) if runs[0][0] == 0 else 0.0
                    opts.append((s, full * (seq_cost(runs, kernel) - full_fused),
                                 full * (segment_cost(held, held, True, kernel) - full_head)))
            self.options.append(opts)

    def _full_attention(self, spans: list[list[Span]], kernel: KernelCost) -> None:
        """``__init__`` of a model of full-attention layers only, vectorised over the held runs (the same
        values, added in the same order)."""
        world = len(spans)
        self.options = [[] for _ in range(world)]
        rows = [(r, s, a, b) for r, x in enumerate(spans) for s, a, b in x]
        if not rows:
            self.work, self.free = np.zeros(world), np.zeros(world)
            return
        rows.sort()
        rank, seq, a, b = np.asarray(rows, np.int64).T
        same = (rank[1:] == rank[:-1]) & (seq[1:] == seq[:-1])
        starts = np.flatnonzero(np.concatenate([[True], ~(same & (a[1:] == b[:-1]))]))  # touching runs merged
        ends = np.append(starts[1:], len(a)) - 1
        rank, seq, a, b = rank[starts], seq[starts], a[starts], b[ends]
        cost = run_cost(a, b, kernel)
        first = np.flatnonzero(np.concatenate([[True], (rank[1:] != rank[:-1]) | (seq[1:] != seq[:-1])]))
        group = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(a))))
        fused = np.bincount(group, weights=cost)  # per held (rank, sequence), its runs in position order
        head = np.where(a[first] == 0, cost[first], 0.0)
        self.work = np.bincount(rank[first], weights=fused, minlength=world)
        self.free = np.bincount(rank[first], weights=head, minlength=world)
        last = np.append(first[1:], len(a)) - 1
        for g in np.flatnonzero(a[last] > 0).tolist():  # some run needs remote keys: splitting it is a choice
            r, s, lo, hi = int(rank[first[g]]), int(seq[first[g]]), int(first[g]), int(last[g]) + 1
            runs = list(zip(a[lo:hi].tolist(), b[lo:hi].tolist()))
            held = sum(y - x for x, y in runs)
            self.held[r, s] = held
            self.options[r].append((s, seq_cost(runs, kernel) - float(fused[g]),
                                    segment_cost(held, held, True, kernel) - float(head[g])))

    def split_extra(self, segments) -> dict[tuple[int, int], float]:
        """(rank, seq) -> what the sequence costs run split beyond one remote segment: each further remote
        segment (``segments``: (rank, seq) -> their number) pays the held queries' tile set-ups again."""
        _, _, cq, ck = self.kernel.coefficients
        full = _full_share(self.layers)  # cuts fall on tiles (placement.ALIGN): no partial key tiles to add
        tile = self.kernel.tile
        return {(r, s): full * (n - 1) * (cq * -(-self.held[r, s] // tile) + ck) for (r, s), n in segments.items()}


class RankChoices:
    """Per rank: the work and independent work with every sequence fused, and per sequence that needs
    remote keys what running it split adds to each (``(seq, extra work, extra independent work)``).
    ``segments``: (rank, seq) -> remote segments when split (:func:`remote_stages`, :func:`remote_sources`);
    ``base``: the :class:`RankWork` of ``spans``, when known (it does not depend on the stages)."""

    def __init__(self, spans: list[list[Span]], kernel: KernelCost, layers, segments, base: RankWork | None = None):
        base = base or RankWork(spans, kernel, layers)
        extra = base.split_extra(segments)
        self.work, self.free = base.work, base.free
        self.options = [[(s, d + extra.get((r, s), 0.0), g) for s, d, g in opts] for r, opts in enumerate(base.options)]


def held_runs(spans) -> dict[int, list[tuple[int, int]]]:
    """Per sequence its held runs in position order, touching ones merged (as the rank views run them)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for s, a, b in sorted(spans):
        out.setdefault(s, []).append((a, b))
    return {s: touching_runs(runs) for s, runs in out.items()}


def _overlapped(work: float, free: float, comm: float, settings: PlanSettings, fwd: float) -> float:
    """A rank's modelled time with its transfer (``comm`` each way) beside ``work``, ``free`` of it
    independent of remote K/V (module doc)."""
    if not comm:
        return work
    exposed = max(0.0, comm - fwd * free) + max(0.0, comm - (1 - fwd) * free)
    return work + 2 * settings.overlap_slowdown * comm + exposed


def execution(choices: RankChoices, link: np.ndarray, settings: PlanSettings, kernel: KernelCost):
    """(time, per-rank work, per-rank sequences run split, overlap) of the fastest way to run a placement
    that the ``fusion`` and ``overlap`` settings allow (module doc). ``link``: per rank, the K/V tokens it
    sends or receives (:func:`link_tokens`)."""
    fwd = 1.0 / (1.0 + kernel.bwd_weight)  # the forward's share of a pair's kernel time
    comm = settings.link_cost * link
    options = []
    for overlap in (True, False):
        if settings.overlap != ("never" if overlap else "always"):
            for split in ((False, True) if settings.fusion == "auto" and overlap else
                          (settings.fusion == "none",)):
                options.append(_uniform(choices, comm, settings, fwd, overlap, split))
    return min(options, key=lambda o: o[0])


def _uniform(choices: RankChoices, comm: np.ndarray, settings: PlanSettings, fwd: float, overlap: bool,
             split: bool):
    """Every rank runs every sequence split (``split``) or fused; the exchange overlapped or first."""
    extra = np.array([sum(d for _, d, _ in opts) for opts in choices.options]) if split else 0.0
    gain = np.array([sum(g for _, _, g in opts) for opts in choices.options]) if split else 0.0
    work, free = choices.work + extra, choices.free + gain
    sets = [frozenset(s for s, _, _ in opts) if split else frozenset() for opts in choices.options]
    if not overlap:
        return float(work.max() + 2 * comm.max()), work, sets, False
    times = [_overlapped(w, f, c, settings, fwd) for w, f, c in zip(work, free, comm)]
    return float(max(times, default=0.0)), work, sets, True
