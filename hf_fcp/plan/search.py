"""Local search on a placement: move cut positions so that the busiest rank's modelled work goes down while
every rank keeps exactly the tokens it holds.

A *cut* is where a sequence passes from a run on one rank to a run on another. Two cuts shared by the
same two ranks — one where the busy rank holds the denser side, one where it holds the lighter side — can
move together by ``δ`` tokens: the busy rank hands ``δ`` dense tokens to its partner and takes ``δ`` light
ones back, so token counts stay and about ``δ × (difference of the two positions)`` causal work moves.
``δ`` steps in whole kernel tiles (a cut inside a tile makes both runs pay the whole tile), so aligned
cuts stay aligned; a step that would empty a short run is halved. Every candidate move is priced with the
kernel model (:mod:`.cost`) on the four runs it touches; the best improvement is applied until none lowers
the maximum — then, while the busiest rank is over ``FINE_ABOVE`` above the mean, moves of an eighth of a
tile are tried too (off the tile grid: worth it only where the partial tiles they cost are cheap; whole-tile
moves still come first, as a finer move can open one up again) — or the
busiest rank is within ``DONE`` of the mean. Whole sequences
never move.
"""

from __future__ import annotations

import numpy as np

from .cost import KernelCost, layered_run_cost
from .spans import Span

MAX_MOVES = 200  # cut-pair moves per polish
CHOICES = 8  # per partner, the cut pairs priced exactly (three-rank cycles: dense / light cuts)
HALVINGS = 3  # a three-rank cycle whose partner overshoots tries its step, then half and a quarter of it
DONE = 1e-3  # the polish stops once the busiest rank is this close to the mean
FINEST = 8  # once no whole-tile move helps, steps of tile / FINEST tokens are tried ...
FINE_ABOVE = 5e-3  # ... while the busiest rank is more than this above the mean


class Placement:
    """Runs of every sequence in position order, per-rank work and tokens, and the cuts between ranks."""

    def __init__(self, spans: list[list[Span]], world: int, kernel: KernelCost, layers=((None, 1),)):
        self.world, self.kernel, self.layers = world, kernel, layers
        by_seq: dict[int, list[list[int]]] = {}
        for r, rank_spans in enumerate(spans):
            for s, a, b in rank_spans:
                by_seq.setdefault(s, []).append([a, b, r])
        self.seqs: dict[int, list[list[int]]] = {}
        for s, runs in by_seq.items():
            runs.sort()
            merged = [runs[0]]
            for a, b, r in runs[1:]:
                if merged[-1][2] == r and merged[-1][1] == a:
                    merged[-1][1] = b
                else:
                    merged.append([a, b, r])
            self.seqs[s] = merged
        self.work, self.tokens = np.zeros(world), np.zeros(world, np.int64)
        for runs in self.seqs.values():
            for a, b, r in runs:
                self.work[r] += self.run_cost(a, b)
                self.tokens[r] += b - a

    def run_cost(self, a: int, b: int) -> float:
        """Modelled work of the fused run ``[a, b)`` in an average layer (:func:`.cost.layered_run_cost`)."""
        return layered_run_cost(a, b, self.layers, self.kernel)

    def cuts_of(self, rank: int) -> list[tuple[int, int, int, bool]]:
        """(seq, index of the left run, partner rank, rank is on the left) of every cut touching ``rank``."""
        out = []
        for s, runs in self.seqs.items():
            for j in range(len(runs) - 1):
                left, right = runs[j][2], runs[j + 1][2]
                if left == rank and right != rank:
                    out.append((s, j, right, True))
                elif right == rank and left != rank:
                    out.append((s, j, left, False))
        return out

    def spans(self) -> list[list[Span]]:
        out: list[list[Span]] = [[] for _ in range(self.world)]
        for s, runs in self.seqs.items():
            for a, b, r in runs:
                out[r].append((s, a, b))
        return [sorted(x) for x in out]


def _shift(p: Placement, s: int, j: int, delta: int) -> dict[int, float] | None:
    """Work change per rank if cut ``j`` of sequence ``s`` moves by ``delta`` (None: a run would vanish)."""
    runs = p.seqs[s]
    (a, c, left), (_, b, right) = runs[j][:3], runs[j + 1][:3]
    new = c + delta
    if not a < new < b:
        return None
    cost = p.run_cost
    return {left: cost(a, new) - cost(a, c), right: cost(new, b) - cost(c, b)}


def _apply(p: Placement, s: int, j: int, delta: int) -> None:
    runs = p.seqs[s]
    gain = _shift(p, s, j, delta)
    for r, dw in gain.items():
        p.work[r] += dw
    p.tokens[runs[j][2]] += delta
    p.tokens[runs[j + 1][2]] -= delta
    runs[j][1] += delta
    runs[j + 1][0] += delta


def _pair_max(p: Placement, m1, m2, hi: int, partner: int) -> float | None:
    """max(work[hi], work[partner]) after both moves (the second priced after the first: they may touch
    the same run); None when a run would vanish."""
    if _shift(p, *m1) is None:
        return None
    _apply(p, *m1)
    g2 = _shift(p, *m2)
    after = None if g2 is None else max(p.work[hi] + g2.get(hi, 0.0), p.work[partner] + g2.get(partner, 0.0))
    _apply(p, m1[0], m1[1], -m1[2])
    return after


def _best_move(p: Placement, hi: int, tile: int):
    """The pair of cut moves that lowers max(work[hi], work[partner]) the most, as ((s, j, δ), (s', j', δ')),
    or None. Per partner, the ``CHOICES`` pairs of cuts whose predicted transfer (tiles × position gap)
    comes closest to half the work gap are priced exactly."""
    by_partner: dict[int, list[tuple[int, int, bool]]] = {}
    for s, j, partner, hi_left in p.cuts_of(hi):
        by_partner.setdefault(partner, []).append((s, j, hi_left))
    best, best_max = None, p.work[hi]
    for partner, cuts in by_partner.items():
        excess = (p.work[hi] - p.work[partner]) / 2
        options = []
        for give_cut in cuts:
            give = p.seqs[give_cut[0]][give_cut[1]][1]
            for take_cut in cuts:
                gap = give - p.seqs[take_cut[0]][take_cut[1]][1]
                if gap > 0:
                    steps = max(1, round(excess / (tile * gap)))
                    options.append((abs(excess - steps * tile * gap), steps, give_cut, take_cut))
        options.sort(key=lambda o: o[0])
        for _, steps, (s1, j1, hi_left1), (s2, j2, hi_left2) in options[:CHOICES]:
            while steps:  # halving: a run may be short
                d = steps * tile
                m1 = (s1, j1, -d if hi_left1 else d)  # hi's side of cut 1 shrinks by d
                m2 = (s2, j2, d if hi_left2 else -d)  # hi's side of cut 2 grows by d
                after = _pair_max(p, m1, m2, hi, partner)
                if after is not None:
                    break
                steps //= 2
            if after is not None and after < best_max:
                best, best_max = (m1, m2), after
    return best


def _best_cycle(p: Placement, hi: int, tile: int):
    """A three-rank cycle when no pair move helps: hi gives dense tokens to p1, takes light ones from p2, and
    p1 passes as many to p2 through a cut they share. ((s, j, δ) × 3) or None."""
    cuts = p.cuts_of(hi)
    dense = sorted(cuts, key=lambda c: -p.seqs[c[0]][c[1]][1])[:CHOICES]
    light = sorted(cuts, key=lambda c: p.seqs[c[0]][c[1]][1])[:CHOICES]
    best, best_max = None, p.work[hi]
    partner_cuts: dict[int, list[tuple[int, int, int, bool]]] = {}
    for s1, j1, p1, hi_left1 in dense:
        give = p.seqs[s1][j1][1]
        if p1 not in partner_cuts:
            partner_cuts[p1] = p.cuts_of(p1)
        for s2, j2, p2, hi_left2 in light:
            take = p.seqs[s2][j2][1]
            if p2 == p1 or take >= give:
                continue
            for s3, j3, p1_left in [(s, j, left) for s, j, o, left in partner_cuts[p1] if o == p2][:CHOICES]:
                steps = max(1, int((p.work[hi] - p.work.mean()) / (give - take) // tile))
                overshoots = 0
                while steps:  # halving while a run would vanish, or (HALVINGS times) a partner overshoots
                    d = steps * tile
                    moves = ((s1, j1, -d if hi_left1 else d), (s2, j2, d if hi_left2 else -d),
                             (s3, j3, -d if p1_left else d))  # p1's side of the third cut shrinks by d
                    after = _cycle_max(p, moves, (hi, p1, p2))
                    if after is not None and after < best_max:
                        best, best_max = moves, after
                        break
                    overshoots += after is not None
                    if overshoots >= HALVINGS:
                        break
                    steps //= 2
    return best


def _cycle_max(p: Placement, moves, ranks) -> float | None:
    """The largest work among ``ranks`` after ``moves`` (applied in turn, then undone); None if a run
    would vanish."""
    done, after = [], None
    for m in moves:
        if _shift(p, *m) is None:
            break
        _apply(p, *m)
        done.append(m)
    else:
        after = max(p.work[r] for r in ranks)
    for s, j, d in reversed(done):
        _apply(p, s, j, -d)
    return after


def polish(spans: list[list[Span]], world: int, kernel: KernelCost, layers=((None, 1),)) -> list[list[Span]]:
    """``spans`` after best-improvement cut moves on the busiest rank — pairs of cuts shared with one
    partner, else three-rank cycles (module doc); token counts of every rank are unchanged. Work is that of
    an average layer of the model's ``layers`` (``PlanSettings.attention_layers``)."""
    p = Placement(spans, world, kernel, layers)
    tile = full = max(1, kernel.tile)
    moves = 0
    while moves < MAX_MOVES:
        hi = int(np.argmax(p.work))
        if p.work[hi] <= p.work.mean() * (1 + DONE):
            break
        move = None
        for step in sorted({full, tile}, reverse=True):  # whole tiles first, even once finer steps began
            move = _best_move(p, hi, step) or _best_cycle(p, hi, step)
            if move is not None:
                break
        if move is None:
            if tile <= max(1, kernel.tile // FINEST) or p.work[hi] <= p.work.mean() * (1 + FINE_ABOVE):
                break
            tile //= FINEST  # stuck on whole tiles (short runs): finer steps, cuts off the tile grid
            continue
        for s, j, d in move:
            _apply(p, s, j, d)
        moves += 1
    return p.spans()
