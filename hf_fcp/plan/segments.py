"""What each rank computes in each communication stage of a p2p plan, as flat numpy arrays: the one
description of a rank's stages that the planner prices (:class:`hf_fcp.plan.schedule.StageWork`, with the
kernel model) and the simulator times (:mod:`hf_fcp.simulate.segments`, with a GPU's); the engine's task
lists (:mod:`.tasks`) run the same segments (tested).

A **segment** is one attention kernel segment: ``q`` queries of one sequence against ``k`` keys, with
``pairs`` visible (query, key) pairs, run by ``rank`` in time ``slot`` (0: work on local K/V; ``1 + i``:
p2p stage i; ring step i). Three kinds, as :mod:`.tasks` builds them: the **local** causal segment of each
sequence a rank runs split (its runs joined) and each fused run at position 0; per split sequence and
stage, the **remote** segments of its runs against the pieces that stage brings (runs that see the same
pieces share one); per fused run after position 0, one **fused** causal segment against all its keys in
the slot of the last stage it needs.

Invariant (tested): over all segments of a plan, ``pairs`` sums to the causal pairs of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from .cost import KernelCost, tile_counts
from .fcp_plan import FCPPlan
from .spans import lex_order, ranges, span_cost


@dataclass(kw_only=True)
class Segments:
    """Flat arrays (n,) of attention segments."""

    rank: np.ndarray
    """int64: rank that runs the segment."""
    slot: np.ndarray
    """int64: 0 = local K/V; p2p: 1 + stage; ring: the step."""
    q: np.ndarray
    """float64: query tokens."""
    k: np.ndarray
    """float64: key tokens."""
    pairs: np.ndarray
    """float64: visible (query, key) pairs."""

    @staticmethod
    def concat(parts: list["Segments"]) -> "Segments":
        fields = ("rank", "slot", "q", "k", "pairs")
        return Segments(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


@dataclass(kw_only=True)
class Spans:
    """Every rank's spans flat, sorted by (rank, seq, start); ``key = rank * num_seqs + seq``."""

    rank: np.ndarray
    seq: np.ndarray
    a: np.ndarray
    b: np.ndarray
    key: np.ndarray
    num_seqs: int
    fused: np.ndarray
    """bool: the span's sequence runs fused on its rank (``plan.fused``)."""

    @staticmethod
    def of(plan: FCPPlan) -> "Spans":
        """Every rank's held runs (touching spans of a sequence merged, as the rank views do)."""
        rows = [(r, s, a, b) for r, spans in enumerate(plan.rank_spans) for s, a, b in spans]
        arr = np.asarray(rows, np.int64).reshape(-1, 4)
        arr = arr[lex_order(arr[:, 2], arr[:, 1], arr[:, 0])]
        n = len(plan.seq_lens)
        key = arr[:, 0] * n + arr[:, 1]
        new = np.concatenate([[True], (key[1:] != key[:-1]) | (arr[1:, 2] != arr[:-1, 3])])[:len(arr)]
        first, last = np.flatnonzero(new), np.flatnonzero(np.append(new[1:], True))
        arr, key = np.column_stack([arr[first, :3], arr[last, 3]]), key[first]
        fused_keys = np.asarray([r * n + s for r, seqs in enumerate(plan.fused) for s in seqs], np.int64)
        return Spans(rank=arr[:, 0], seq=arr[:, 1], a=arr[:, 2], b=arr[:, 3], key=key, num_seqs=n,
                     fused=np.isin(key, fused_keys))

    def match(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (i, j) with ``key[i] == self.key[j]`` (self.key is sorted)."""
        lo = np.searchsorted(self.key, key, "left")
        cnt = np.searchsorted(self.key, key, "right") - lo
        return np.repeat(np.arange(len(key)), cnt), ranges(lo, cnt)


def make_segments(rank, slot, q, k, pairs) -> Segments:
    """:class:`Segments` from array-likes (``slot`` may be one value for all)."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    slot = np.broadcast_to(np.asarray(slot, np.int64), np.shape(rank)).copy()
    return Segments(rank=np.asarray(rank, np.int64), slot=slot,
                    q=f(q), k=f(k), pairs=f(pairs))


def local_segments(sp: Spans) -> Segments:
    """Slot 0 (``tasks.local_tasks``): one causal segment per held sequence run split — the rank's spans of
    the sequence, joined in position order, are both queries and keys; pairs = each span against the rank's
    own earlier spans of its sequence plus itself — and a causal square per run starting at 0 of the
    sequences run fused."""
    split = local_split_segments(_subset(sp, ~sp.fused))
    first = sp.fused & (sp.a == 0)
    n = (sp.b - sp.a)[first]
    return Segments.concat([split, make_segments(sp.rank[first], 0, n, n, span_cost(0, n))])


def _subset(sp: Spans, keep: np.ndarray) -> Spans:
    return Spans(rank=sp.rank[keep], seq=sp.seq[keep], a=sp.a[keep], b=sp.b[keep], key=sp.key[keep],
                 num_seqs=sp.num_seqs, fused=sp.fused[keep])


def local_split_segments(sp: Spans) -> Segments:
    """One causal segment per held sequence over its spans joined (every sequence run split)."""
    n = sp.b - sp.a
    cum = np.cumsum(n)
    first = np.concatenate([[True], sp.key[1:] != sp.key[:-1]])[:len(n)]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(n)), 0))
    earlier = cum - n - (cum[group_start] - n[group_start])  # own tokens of the sequence before this span
    pairs = earlier * n + n * (n + 1) / 2
    g = np.cumsum(first) - 1  # segment index per span (spans are sorted by key)
    rank = sp.rank[first]
    held = np.bincount(g, weights=n, minlength=len(rank))
    return make_segments(rank, 0, held, held, np.bincount(g, weights=pairs, minlength=len(rank)))


def pieces_of(plan: FCPPlan) -> np.ndarray:
    """int64 (n, 6): one row ``(src, dst, round, seq, start, end)`` per piece of every message of ``plan``."""
    if not plan.transfers:
        return np.zeros((0, 6), np.int64)
    src, dst, rounds, pieces = zip(*plan.transfers)
    count = np.fromiter(map(len, pieces), np.int64, len(pieces))
    # no list of row tuples: 10^7 pieces at W=1024
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(pieces)), np.int64, 3 * int(count.sum()))
    per_piece = [np.repeat(np.asarray(x, np.int64), count) for x in (src, dst, rounds)]
    return np.column_stack([*per_piece, flat.reshape(-1, 3)])


class RemoteSegments:
    """The remote and fused segments of a p2p plan (held runs ``sp``, ``pieces`` of :func:`pieces_of`) for
    any assignment of its pieces to stages; what does not depend on the stages is computed once."""

    def __init__(self, sp: Spans, pieces: np.ndarray):
        self.sp = sp
        dst, seq, c, d = pieces[:, 1], pieces[:, 3], pieces[:, 4], pieces[:, 5]
        piece_key = dst * sp.num_seqs + seq
        # fused runs with a > 0: q = b - a queries against all b keys, causal, in slot 1 + the last stage of
        # the pieces before them (pieces of a (rank, seq) sorted by end: a prefix of them precedes the run)
        self.runs = np.flatnonzero(sp.fused & (sp.a > 0))
        self.order = lex_order(d, piece_key)
        self.pk, pd = piece_key[self.order], d[self.order]
        top = int(pd.max(initial=0)) + 1
        self.at = np.searchsorted(self.pk * top + pd, sp.key[self.runs] * top + sp.a[self.runs], "right") - 1
        self.fused_pairs = span_cost(sp.a[self.runs], sp.b[self.runs])
        # split sequences: their pieces (a (rank, seq) runs fused or split as a whole)
        split = ~np.isin(piece_key, sp.key[sp.fused])
        self.split_key, self.split_d, self.split_tokens = piece_key[split], d[split], (d - c)[split]
        self.split = split

    def segments(self, stage: np.ndarray, num_stages: int, overlap: bool) -> Segments:
        """The segments with the pieces in stages ``stage`` (int64, one per piece): slot ``1 + stage``
        (fused runs: of the last stage they need; every one in slot ``num_stages`` when the exchange runs
        first, ``overlap`` False)."""
        return Segments.concat([self._split(stage, num_stages), self._fused(stage, num_stages, overlap)])

    def _fused(self, stage, num_stages: int, overlap: bool) -> Segments:
        sp, runs = self.sp, self.runs
        big = np.int64(stage.max(initial=0) + 1)
        last = np.maximum.accumulate(self.pk * big + stage[self.order]) - self.pk * big  # running max per group
        slot = 1 + last[self.at] if overlap else num_stages  # exchange first: every fused run after the last
        return make_segments(sp.rank[runs], slot, sp.b[runs] - sp.a[runs], sp.b[runs], self.fused_pairs)

    def _split(self, stage, num_stages: int) -> Segments:
        """Per (held run, stage) of a split sequence, the keys of the pieces that stage brings before the run:
        pieces grouped by (rank, seq, stage) and sorted by end, each run's count found by binary search (no
        piece × run product: one sequence over 256 ranks has millions of those)."""
        sp, stages = self.sp, max(num_stages, 1)
        key, d, tokens, st = self.split_key, self.split_d, self.split_tokens, stage[self.split]
        order = lex_order(d, st, key)
        key, d, tokens, st = key[order], d[order], tokens[order], st[order]
        gkey = key * stages + st
        starts = np.flatnonzero(np.concatenate([[True], gkey[1:] != gkey[:-1]])) if len(gkey) else gkey
        cum = np.concatenate([[0], np.cumsum(tokens)])
        # every (group, held run of the group's (rank, seq)) pair; runs are sorted by (key, start)
        lo = np.searchsorted(sp.key, key[starts], "left")
        n = np.searchsorted(sp.key, key[starts], "right") - lo
        g, j = np.repeat(np.arange(len(starts)), n), ranges(lo, n)
        ends = np.append(starts[1:], len(key))
        top = int(d.max(initial=0)) + 1
        at = np.searchsorted(np.repeat(np.arange(len(starts)), ends - starts) * top + d, g * top + sp.a[j], "right")
        k = (cum[at] - cum[starts[g]]).astype(np.float64)  # keys of the group's pieces that end before the run
        seen = k > 0
        j, stage_of, k = j[seen], st[starts[g[seen]]], k[seen]
        q = sp.b[j] - sp.a[j]
        # Consecutive held runs of a sequence that see the same pieces of a stage share one segment
        # (``tasks.remote_tasks``); within a (rank, seq, stage) the keys seen only grow with the run's
        # start, so equal key counts mean equal key sets.
        kk = k.astype(np.int64)
        rkey, ktop = sp.key[j], int(kk.max(initial=0)) + 1
        if (int(rkey.max(initial=0)) + 1) * stages * ktop < 2 ** 62:  # one int64 key: much faster
            _, first, g = np.unique((rkey * stages + stage_of) * ktop + kk, return_index=True, return_inverse=True)
        else:
            _, first, g = np.unique(np.stack([rkey, stage_of, kk]), axis=1, return_index=True, return_inverse=True)
        q = np.bincount(g.reshape(-1), weights=q, minlength=len(first))
        return make_segments(sp.rank[j][first], 1 + stage_of[first], q, k[first], q * k[first])


def priced(segs: Segments, kernel: KernelCost, world: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) kernel work (W, ``slots``) of ``segs`` per rank and slot, in pairs
    (:func:`.cost.segment_parts` of each; causal: the segments that see fewer than ``q × k`` pairs)."""
    touched, diag, nq, nk = tile_counts(segs.q, segs.k, segs.pairs < segs.q * segs.k, kernel.tile)
    w, t2 = kernel.bwd_weight, kernel.tile_work
    fwd = (touched + kernel.fwd_diag * diag + kernel.fwd_q_tile * nq + kernel.fwd_k_tile * nk) * t2
    bwd = w * (touched + kernel.bwd_diag * diag + kernel.bwd_q_tile * nq + kernel.bwd_k_tile * nk) * t2
    at = segs.rank * slots + segs.slot
    per = lambda x: np.bincount(at, weights=x, minlength=world * slots).astype(np.float64).reshape(world, slots)  # noqa: E731
    return per(fwd), per(bwd)


def launches(segs: Segments, world: int, slots: int) -> np.ndarray:
    """(W, ``slots``) bool: whether the rank launches a kernel in the slot (a segment there sees pairs)."""
    return np.bincount(segs.rank * slots + segs.slot, weights=segs.pairs > 0, minlength=world * slots
                       ).reshape(world, slots) > 0
