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

from .cost import (
    KernelCost,
    layered_run_cost,
    one_run_cost,
    run_cost,
    segment_cost,
    segment_costs,
    seq_cost,
    touching_runs,
)
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
    rank, seq, counts = remote_stage_counts(pieces, pieces[:, 2] // rounds_per_stage, num_seqs)
    return dict(zip(zip(rank.tolist(), seq.tolist()), counts.tolist()))


def remote_stage_counts(pieces: np.ndarray, stage: np.ndarray, num_seqs: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`remote_stages` as int64 arrays ``(rank, seq, stages)``, sorted by (rank, seq); ``stage``: the
    stage of each piece (``plan.stage_of`` of its round)."""
    return _distinct(pieces[:, 1], pieces[:, 3], stage, num_seqs)


def remote_source_counts(src: np.ndarray, dst: np.ndarray, seq: np.ndarray, num_seqs: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`remote_sources` as int64 arrays ``(rank, seq, senders)``, sorted by (rank, seq), from the
    needed pieces as columns (:func:`.rounds.needed_columns`: sender, receiver and sequence of each)."""
    return _distinct(dst, seq, src, num_seqs)


def _distinct(rank: np.ndarray, seq: np.ndarray, group: np.ndarray, num_seqs: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (rank, seq) that occurs, how many distinct ``group`` values it occurs with: ``(rank, seq, count)``."""
    if not len(rank):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(group.max()) + 1
    pairs = np.unique((rank * num_seqs + seq) * top + group) // top
    keys, counts = np.unique(pairs, return_counts=True)
    return keys // num_seqs, keys % num_seqs, counts


def _full_share(layers) -> float:
    return sum(count for w, count in layers if w is None) / sum(count for _, count in layers)


class RankWork:
    """What :class:`RankChoices` needs that does not depend on the stages: per rank the work and independent
    work with every sequence fused and the sequences it holds (``seqs``), and per (rank, sequence) that
    needs remote keys, in (rank, seq) order, what running it split adds with one remote segment (arrays
    ``opt_rank``, ``opt_seq``, ``opt_extra``, ``opt_gain``) and the tokens the rank holds of it
    (``opt_held``)."""

    def __init__(self, spans: list[list[Span]], kernel: KernelCost, layers):
        self.kernel, self.layers = kernel, layers
        self.seqs = tuple(frozenset(s for s, _, _ in x) for x in spans)
        if all(w is None for w, _ in layers):
            self._full_attention(spans, kernel)
            return
        full = _full_share(layers)  # the layer-weighted average over full and sliding-window layers
        self.work, self.free = np.zeros(len(spans)), np.zeros(len(spans))
        rows = []
        for r, x in enumerate(spans):
            for s, runs in held_runs(x).items():
                held = sum(b - a for a, b in runs)
                self.work[r] += sum(layered_run_cost(a, b, layers, kernel) for a, b in runs)
                self.free[r] += layered_run_cost(0, runs[0][1], layers, kernel) if runs[0][0] == 0 else 0.0
                if runs[-1][0] > 0 and full > 0:  # some run needs remote keys: splitting it is a choice
                    full_fused = sum(run_cost(a, b, kernel) for a, b in runs)
                    full_head = run_cost(0, runs[0][1], kernel) if runs[0][0] == 0 else 0.0
                    rows.append((r, s, held, full * (seq_cost(runs, kernel) - full_fused),
                                 full * (segment_cost(held, held, True, kernel) - full_head)))
        self._options(*(zip(*rows) if rows else ((),) * 5))

    def _options(self, rank, seq, held, extra, gain) -> None:
        self.opt_rank, self.opt_seq, self.opt_held = (np.asarray(x, np.int64) for x in (rank, seq, held))
        self.opt_extra, self.opt_gain = np.asarray(extra, np.float64), np.asarray(gain, np.float64)

    def _full_attention(self, spans: list[list[Span]], kernel: KernelCost) -> None:
        """``__init__`` of a model of full-attention layers only, vectorised over the held runs (the same
        values, added in the same order)."""
        world = len(spans)
        rows = [(r, s, a, b) for r, x in enumerate(spans) for s, a, b in x]
        if not rows:
            self.work, self.free = np.zeros(world), np.zeros(world)
            self._options((), (), (), (), ())
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
        need = np.flatnonzero(a[last] > 0)  # some run needs remote keys: splitting the sequence is a choice
        one = first[need] == last[need]
        extra, gain = np.zeros(len(need)), np.zeros(len(need))
        lo = first[need[one]]  # held as one run [a, b), a > 0: seq_cost and segment_cost in closed form
        extra[one] = one_run_cost(a[lo], b[lo], kernel) - fused[need[one]]
        gain[one] = segment_costs(b[lo] - a[lo], b[lo] - a[lo], True, kernel)
        for i in np.flatnonzero(~one).tolist():
            lo, hi = int(first[need[i]]), int(last[need[i]]) + 1
            runs = list(zip(a[lo:hi].tolist(), b[lo:hi].tolist()))
            held = sum(y - x for x, y in runs)
            extra[i] = seq_cost(runs, kernel) - float(fused[need[i]])
            gain[i] = segment_cost(held, held, True, kernel) - float(head[need[i]])
        held = np.bincount(group, weights=b - a, minlength=len(first))[need]
        self._options(rank[first[need]], seq[first[need]], held, extra, gain)

    @property
    def options(self) -> list[list[tuple[int, float, float]]]:
        """Per rank, ``(seq, extra work, extra independent work)`` of each sequence it may run split."""
        return _per_rank(len(self.work), self.opt_rank, self.opt_seq, self.opt_extra, self.opt_gain)

    def split_extra(self, segments) -> np.ndarray:
        """Per option (``opt_*`` order), what the sequence costs run split beyond one remote segment: each
        further remote segment (``segments``: (rank, seq) -> their number, or :func:`remote_stage_counts`'
        arrays) pays the held queries' tile set-ups again."""
        _, _, cq, ck = self.kernel.coefficients
        full = _full_share(self.layers)  # cuts fall on tiles (placement.ALIGN): no partial key tiles to add
        if isinstance(segments, dict):
            segments = tuple(np.fromiter((k[i] if i < 2 else v for k, v in segments.items()), np.int64,
                                         len(segments)) for i in range(3))
        rank, seq, n = segments
        top = int(max(self.opt_seq.max(initial=0), seq.max(initial=0))) + 1
        keys = self.opt_rank * top + self.opt_seq
        at = np.minimum(np.searchsorted(keys, rank * top + seq), max(len(keys) - 1, 0))
        hit = keys[at] == rank * top + seq if len(keys) else np.zeros(len(at), bool)
        at, n = at[hit], n[hit]  # a sequence that is no option (only sliding-window layers need it) adds nothing
        out = np.zeros(len(keys))
        out[at] = full * (n - 1) * (cq * -(-self.opt_held[at] // self.kernel.tile) + ck)
        return out


def _per_rank(world: int, rank: np.ndarray, *columns: np.ndarray) -> list[list[tuple]]:
    """Rows ``(columns[0][i], columns[1][i], ...)`` grouped by ``rank[i]`` (sorted), as Python lists."""
    out: list[list[tuple]] = [[] for _ in range(world)]
    for r, *row in zip(rank.tolist(), *(c.tolist() for c in columns)):
        out[r].append(tuple(row))
    return out


class RankChoices:
    """Per rank: the work and independent work with every sequence fused, and per sequence that needs
    remote keys what running it split adds to each (``options``; the same as arrays in :class:`RankWork`'s
    ``opt_*`` order: ``opt_rank``, ``opt_seq``, ``extra``, ``gain``). ``segments``: (rank, seq) -> remote
    segments when split (:func:`remote_stages`, :func:`remote_sources`, or :func:`remote_stage_counts`'
    arrays); ``base``: the :class:`RankWork` of ``spans``, when known (it does not depend on the stages)."""

    def __init__(self, spans: list[list[Span]], kernel: KernelCost, layers, segments, base: RankWork | None = None):
        self.base = base = base or RankWork(spans, kernel, layers)
        self.work, self.free = base.work, base.free
        self.opt_rank, self.opt_seq, self.gain = base.opt_rank, base.opt_seq, base.opt_gain
        self.extra = base.opt_extra + base.split_extra(segments)
        self.split_seqs = tuple(frozenset(s for (s,) in x) for x in _per_rank(len(self.work), self.opt_rank,
                                                                                 self.opt_seq))

    @property
    def options(self) -> list[list[tuple[int, float, float]]]:
        """Per rank, ``(seq, extra work, extra independent work)`` of each sequence it may run split."""
        return _per_rank(len(self.work), self.opt_rank, self.opt_seq, self.extra, self.gain)


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
    world = len(choices.work)
    per_rank = lambda x: np.bincount(choices.opt_rank, weights=x, minlength=world)  # noqa: E731  in option order
    work, free = (choices.work + per_rank(choices.extra), choices.free + per_rank(choices.gain)) if split else \
        (choices.work + 0.0, choices.free + 0.0)
    sets = list(choices.split_seqs) if split else [frozenset()] * world
    if not overlap:
        return float(work.max() + 2 * comm.max()), work, sets, False
    times = [_overlapped(w, f, c, settings, fwd) for w, f, c in zip(work, free, comm)]
    return float(max(times, default=0.0)), work, sets, True
