"""Independent checks of a plan and its per-rank views (used by tests, fuzzing and ``--check`` tooling).

``check_plan`` raises :class:`PlanError` naming the first violated property:

* every token of every sequence is held by exactly one rank, and no rank holds more than the cap;
* every transfer carries spans its sender holds — or, in the relay phase (``plan.relay_from``), spans it
  received before that phase — and is congestion-free: per round a rank sends at most one message and
  receives at most one; no KV token reaches the same rank twice;
* every rank receives every KV token it needs (the causal prefix of its last held token of a sequence,
  minus what it holds) — for p2p plans exactly that, nothing more.

``check_view`` rebuilds, from a rank's view alone, which key positions each local query row attends to,
and checks it is exactly ``0..p`` of its own sequence for a query at position ``p`` — each key once.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .fcp_plan import FCPPlan


class PlanError(AssertionError):
    """A plan or view violates an invariant; the message names it."""


def _intervals_cover(intervals: list[tuple[int, int]], length: int) -> str | None:
    pos = 0
    for a, b in sorted(intervals):
        if a != pos:
            return f"gap or overlap at token {min(a, pos)} (next range starts at {a}, expected {pos})"
        if b <= a:
            return f"empty or reversed range [{a}, {b})"
        pos = b
    return None if pos == length else f"covered up to {pos}, expected {length}"


def check_plan(plan: FCPPlan) -> None:
    held: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for r, spans in enumerate(plan.rank_spans):
        tokens = sum(b - a for _, a, b in spans)
        if tokens > plan.tokens_per_rank and plan.strategy == "fcp":
            raise PlanError(f"rank {r} holds {tokens} tokens, over the cap {plan.tokens_per_rank}")
        for s, a, b in spans:
            held[s].append((a, b, r))
    for s, length in enumerate(plan.seq_lens):
        problem = _intervals_cover([(a, b) for a, b, _ in held[s]], length)
        if problem:
            raise PlanError(f"sequence {s} (length {length}) is not held exactly once: {problem}")
    transfers = [t for r in range(plan.world_size) for t in plan.transfers_of(r) if t.src == r] \
        if plan.collective else list(plan.transfers)
    _check_rounds(plan, transfers)
    _check_delivery(plan, held, transfers)


def _check_rounds(plan: FCPPlan, transfers) -> None:
    seen_send, seen_recv = set(), set()
    relay = plan.relay_from
    before = defaultdict(set)  # rank -> pieces it received before the relay phase
    for t in transfers:
        if relay and t.round < relay:
            before[t.dst].update(t.pieces)
    for t in transfers:
        if not 0 <= t.round < max(plan.num_rounds, 1):
            raise PlanError(f"transfer {t.src}->{t.dst} in round {t.round}, outside [0, {plan.num_rounds})")
        if (t.src, t.round) in seen_send:
            raise PlanError(f"rank {t.src} sends twice in round {t.round}")
        if (t.dst, t.round) in seen_recv:
            raise PlanError(f"rank {t.dst} receives twice in round {t.round}")
        if t.src == t.dst:
            raise PlanError(f"rank {t.src} sends to itself in round {t.round}")
        seen_send.add((t.src, t.round))
        seen_recv.add((t.dst, t.round))
        own = set(plan.rank_spans[t.src])
        for piece in t.pieces:
            if relay and t.round >= relay and piece in before[t.src]:
                continue  # a forward of what it received before the relay phase
            if not any(p[0] == piece[0] and p[1] <= piece[1] and piece[2] <= p[2] for p in own):
                raise PlanError(f"rank {t.src} sends {piece} in round {t.round} but does not hold it"
                                + (" nor received it before the relay phase" if relay and t.round >= relay else ""))


def _check_delivery(plan: FCPPlan, held, transfers) -> None:
    received: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for t in transfers:
        for s, a, b in t.pieces:
            received[(t.dst, s)].append((a, b))
    for (dst, s), got in received.items():
        got.sort()
        for (a1, b1), (a2, b2) in zip(got, got[1:]):
            if a2 < b1:
                raise PlanError(f"rank {dst} receives tokens [{a2}, {min(b1, b2)}) of sequence {s} twice")
    for s, lst in held.items():
        for r in {r for _, _, r in lst}:
            end = max(b for _, b, rr in lst if rr == r)
            need = [(a, b) for a, b, rr in lst if rr != r and a < end]
            got = received.get((r, s), [])
            missing = sorted(set(need) - set(got)) if not plan.collective else \
                [iv for iv in need if not any(g[0] <= iv[0] and iv[1] <= g[1] for g in got)]
            if missing:
                raise PlanError(f"rank {r} needs KV {missing[:3]} of sequence {s} but never receives it")
            if not plan.collective and sorted(got) != sorted(need):
                extra = sorted(set(got) - set(need))
                raise PlanError(f"rank {r} receives KV {extra[:3]} of sequence {s} it does not need")


def check_view(plan: FCPPlan, rank: int) -> None:
    """Every local query row attends to exactly the keys ``0..p`` of its sequence, each once (under the
    plan's sliding window ``w``, see ``plan.for_window``: exactly ``max(0, p - w + 1)..p``).

    Vectorised and bounded in memory: a query's visible keys in a segment are a slice of the segment's keys,
    i.e. a few runs of consecutive positions, so each (query, segment) becomes a few intervals and the check
    is that each query's intervals tile its expected positions exactly. Memory O(tokens × runs per segment),
    never the O(tokens²) key lists (the README's ``[120, 70000, 9, 3000]`` example at 4 ranks: well under 1 GB).
    """
    view = plan.for_rank(rank)
    window = plan.window
    pos = view.position_ids.numpy()
    seq = view.seq_index.numpy()
    recv_pos, recv_seq = _received_keys(plan, rank, view)
    buf_pos, buf_seq = np.concatenate([recv_pos, pos]), np.concatenate([recv_seq, seq])  # the K/V buffer
    lists = [(view.local_tasks, pos, seq)] + [(st.tasks, recv_pos, recv_seq) for st in view.stages]
    lists += [(st.fused, buf_pos, buf_seq) for st in view.stages]
    parts = []
    for tasks, kpos, kseq in lists:
        cu_q, cu_k = tasks.cu_q.tolist(), tasks.cu_k.tolist()
        q_rows, k_rows = tasks.q_rows.numpy(), tasks.k_rows.numpy()
        for i in range(tasks.num_segments):
            qs, ks = q_rows[cu_q[i]:cu_q[i + 1]], k_rows[cu_k[i]:cu_k[i + 1]]
            parts.append(_segment_intervals(rank, qs, ks, tasks.causal, window, seq, kpos, kseq))
    first = np.zeros_like(pos) if window is None else np.maximum(0, pos - window + 1)
    _check_tiling(rank, parts, first, pos, seq)


def _received_keys(plan: FCPPlan, rank: int, view) -> tuple[np.ndarray, np.ndarray]:
    """Position and sequence of every row of the rank's receive buffer (-1: never written)."""
    recv_pos, recv_seq = np.full(view.num_recv, -1), np.full(view.num_recv, -1)
    for stage in view.stages:
        for rnd in stage.rounds:
            if rnd.recv_peer < 0:
                continue
            t = next(t for t in plan.transfers_of(rank) if t.dst == rank and t.src == rnd.recv_peer
                     and rnd.recv_start == _buffer_start(plan, rank, t))
            row = rnd.recv_start
            for s, a, b in t.pieces:
                recv_pos[row:row + b - a] = np.arange(a, b)
                recv_seq[row:row + b - a] = s
                row += b - a
    return recv_pos, recv_seq


def _segment_intervals(rank, qs, ks, causal, window, seq, kpos, kseq):
    """(query rows, starts, ends): the key positions each query of one segment sees, as intervals.

    Query j sees keys ``[lo_j, hi_j)`` of the segment: all of them, or bottom-right causal (``hi_j = j +
    shift + 1``) and, under a window ``w``, from ``lo_j = j + shift - w + 1``. Raises if one is of another
    sequence."""
    nq, nk = len(qs), len(ks)
    empty = np.zeros(0, np.int64)
    if nk == 0 or nq == 0:
        return empty, empty, empty
    j = np.arange(nq) + (nk - nq)  # j + shift
    hi = np.clip(j + 1, 0, nk) if causal else np.full(nq, nk)
    lo = np.clip(j - window + 1, 0, nk) if causal and window is not None else np.zeros(nq, np.int64)
    k_pos, k_seq = kpos[ks], kseq[ks]
    seen = hi > lo
    same_from = np.maximum.accumulate(np.where(np.r_[True, k_seq[1:] != k_seq[:-1]], np.arange(nk), 0))
    last = np.maximum(hi - 1, 0)  # keys [same_from[last], last] share last's sequence
    bad = np.flatnonzero(seen & ((same_from[last] > lo) | (k_seq[last] != seq[qs])))
    if bad.size:
        q = qs[bad[0]]
        raise PlanError(f"rank {rank}: query row {q} (sequence {seq[q]}) attends to another sequence")
    run_starts = np.flatnonzero(np.r_[True, k_pos[1:] != k_pos[:-1] + 1])
    run_ends = np.r_[run_starts[1:], nk]
    first_run = np.searchsorted(run_starts, lo, side="right") - 1  # the run holding key lo
    runs = np.where(seen, np.searchsorted(run_starts, hi, side="left") - first_run, 0)
    rows = np.repeat(np.arange(nq), runs)
    run = np.repeat(first_run, runs) + np.arange(int(runs.sum())) - np.repeat(np.cumsum(runs) - runs, runs)
    start = np.maximum(run_starts[run], lo[rows])
    stop = np.minimum(run_ends[run], hi[rows])
    return qs[rows], k_pos[start], k_pos[stop - 1] + 1


def _check_tiling(rank: int, parts, first: np.ndarray, pos: np.ndarray, seq: np.ndarray) -> None:
    """Each local query row's intervals must tile ``[first, pos + 1)``: no gap, no overlap, nothing beyond."""
    n = len(pos)
    q, a, b = (np.concatenate([p[i] for p in parts] + [np.zeros(0, np.int64)]) for i in range(3))
    order = np.lexsort((a, q))
    q, a, b = q[order], a[order], b[order]
    head = np.r_[True, q[1:] != q[:-1]] if q.size else np.zeros(0, bool)
    tail = np.r_[q[1:] != q[:-1], True] if q.size else np.zeros(0, bool)
    wrong = np.zeros(n, bool)
    wrong[q[head & (a != first[q])]] = True
    chained = np.flatnonzero(~head)
    wrong[q[chained[a[chained] != b[chained - 1]]]] = True
    wrong[q[tail & (b != pos[q] + 1)]] = True
    present = np.zeros(n, bool)
    present[q] = True
    wrong |= ~present
    if wrong.any():
        r = int(np.flatnonzero(wrong)[0])
        keys = int(np.bincount(q, weights=b - a, minlength=n)[r])
        raise PlanError(f"rank {rank}: query row {r} (sequence {seq[r]}, position {pos[r]}) attends to "
                        f"{keys} keys, expected exactly positions {first[r]}..{pos[r]}")


def _buffer_start(plan: FCPPlan, rank: int, transfer) -> int:
    start = 0
    for t in sorted((t for t in plan.transfers_of(rank) if t.dst == rank), key=lambda t: t.round):
        if t is transfer or t == transfer:
            return start
        start += t.tokens
    raise PlanError(f"transfer {transfer} not addressed to rank {rank}")
