"""Independent checks of a plan and its per-rank views (used by tests, fuzzing and ``--check`` tooling).

``check_plan`` raises :class:`PlanError` naming the first violated property:

* every token of every sequence is held by exactly one rank, and no rank holds more than the cap;
* every transfer carries spans its sender holds, and is congestion-free: per round a rank sends at most
  one message and receives at most one; no KV token reaches the same rank twice;
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
            if not any(p[0] == piece[0] and p[1] <= piece[1] and piece[2] <= p[2] for p in own):
                raise PlanError(f"rank {t.src} sends {piece} in round {t.round} but does not hold it")


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
    plan's sliding window ``w``, see ``plan.for_window``: exactly ``max(0, p - w + 1)..p``)."""
    view = plan.for_rank(rank)
    window = plan.window
    pos = view.position_ids.numpy()
    seq = view.seq_index.numpy()
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
    seen: list[list[int]] = [[] for _ in range(view.num_local)]
    buf_pos, buf_seq = np.concatenate([recv_pos, pos]), np.concatenate([recv_seq, seq])  # the K/V buffer
    lists = [(view.local_tasks, pos, seq)] + [(st.tasks, recv_pos, recv_seq) for st in view.stages]
    lists += [(st.fused, buf_pos, buf_seq) for st in view.stages]
    for tasks, kpos, kseq in lists:
        cu_q, cu_k = tasks.cu_q.tolist(), tasks.cu_k.tolist()
        q_rows, k_rows = tasks.q_rows.numpy(), tasks.k_rows.numpy()
        for i in range(tasks.num_segments):
            qs, ks = q_rows[cu_q[i]:cu_q[i + 1]], k_rows[cu_k[i]:cu_k[i + 1]]
            shift = len(ks) - len(qs)
            for j, q in enumerate(qs):
                first = 0 if window is None else max(0, j + shift - window + 1)
                visible = ks[first: j + shift + 1] if tasks.causal else ks
                if np.any(kseq[visible] != seq[q]):
                    raise PlanError(f"rank {rank}: query row {q} (sequence {seq[q]}) attends to another sequence")
                seen[q].extend(kpos[visible].tolist())
    for q in range(view.num_local):
        first = 0 if window is None else max(0, pos[q] - window + 1)
        if sorted(seen[q]) != list(range(first, pos[q] + 1)):
            raise PlanError(f"rank {rank}: query row {q} (sequence {seq[q]}, position {pos[q]}) attends to "
                            f"{len(seen[q])} keys, expected exactly positions {first}..{pos[q]}")


def _buffer_start(plan: FCPPlan, rank: int, transfer) -> int:
    start = 0
    for t in sorted((t for t in plan.transfers_of(rank) if t.dst == rank), key=lambda t: t.round):
        if t is transfer or t == transfer:
            return start
        start += t.tokens
    raise PlanError(f"transfer {transfer} not addressed to rank {rank}")
