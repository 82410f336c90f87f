"""The per-rank view of a plan: what one worker needs to run attention and to cut its shard of the batch.

A :class:`RankView` is picklable and moves with ``.to(device)``. Local token order is the order of
``plan.spans(rank)``. Attention work is precomputed as varlen batches (:class:`TaskList`), so the engine
only gathers rows and calls kernels:

* ``local_tasks`` (causal, bottom-right aligned): one segment per held sequence; its held runs, joined
  in position order, are both the queries and the keys. The positions between runs are not in the
  segment, so "query i sees keys 0..i of the joined runs" is exactly the causal mask::

      queries = keys:  [ a1 .. b1 | a2 ....... b2 ]     (tokens b1..a2 live on other ranks)

* ``stages[k].tasks`` (not causal): keys are rows of the receive buffer that arrived in stage ``k``.
  Received pieces never overlap held tokens, so a piece is either wholly before a held run (all pairs
  visible) or wholly after it (none). Consecutive held runs of a sequence that see the same pieces
  share one segment, so each query row appears once per stage. Pieces after every run (sent by
  ``ring``/``allgather``) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .spans import ranges


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


class _Movable:
    """``.to(device)`` for dataclasses holding tensors, nested views and tuples of views."""

    def to(self, device):
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value.to(device)
            elif isinstance(value, _Movable):
                changes[f.name] = value.to(device)
            elif isinstance(value, tuple) and value and isinstance(value[0], _Movable):
                changes[f.name] = tuple(v.to(device) for v in value)
        return replace(self, **changes)


@dataclass(frozen=True)
class TaskList(_Movable):
    """A varlen batch of attention segments. Segment ``i`` has queries ``q[q_rows[cu_q[i]:cu_q[i+1]]]``
    and keys/values ``kv[k_rows[cu_k[i]:cu_k[i+1]]]`` (``kv`` = local K/V or the receive buffer)."""

    q_rows: torch.Tensor  # int64 (Nq,) local token rows
    cu_q: torch.Tensor  # int64 (S+1,)
    k_rows: torch.Tensor  # int64 (Nk,)
    cu_k: torch.Tensor  # int64 (S+1,)
    max_q: int
    max_k: int
    causal: bool  # bottom-right aligned causal mask when True

    @property
    def num_segments(self) -> int:
        return int(self.cu_q.numel()) - 1

    @staticmethod
    def build(q_runs: list[np.ndarray], k_runs: list[np.ndarray], causal: bool) -> "TaskList":
        q_len = np.array([len(r) for r in q_runs], dtype=np.int64)
        k_len = np.array([len(r) for r in k_runs], dtype=np.int64)
        cat = lambda runs: np.concatenate(runs) if runs else np.zeros(0, np.int64)  # noqa: E731
        return TaskList(q_rows=_tensor(cat(q_runs)), cu_q=_tensor(np.concatenate([[0], np.cumsum(q_len)])),
                        k_rows=_tensor(cat(k_runs)), cu_k=_tensor(np.concatenate([[0], np.cumsum(k_len)])),
                        max_q=int(q_len.max(initial=0)), max_k=int(k_len.max(initial=0)), causal=causal)


@dataclass(frozen=True)
class RoundView(_Movable):
    """This rank's part of one congestion-free round (peer −1: nothing in that direction)."""

    send_peer: int
    send_rows: torch.Tensor  # int64 (n_send,) local rows whose K/V are sent, in message order
    recv_peer: int
    recv_start: int  # first row of the message in the receive buffer
    recv_len: int


@dataclass(frozen=True)
class StageView(_Movable):
    """Rounds run together as one communication stage, and the attention work their KV unlocks."""

    rounds: tuple[RoundView, ...]
    tasks: TaskList  # keys index the receive buffer; causal=False


@dataclass(frozen=True)
class RankView(_Movable):
    """Everything rank ``rank`` needs for one batch. Tensors are int64 on CPU until ``.to(device)``."""

    rank: int
    world_size: int
    num_tokens: int  # tokens in the global batch
    fingerprint: str  # the plan's fingerprint (equal on every rank of a consistent plan)
    seq_lens: torch.Tensor  # int64 (num_seqs,) the global batch
    token_index: torch.Tensor  # int64 (n_local,) index of each local token in the concatenated batch
    position_ids: torch.Tensor  # int64 (n_local,) position of each local token within its sequence
    seq_index: torch.Tensor  # int64 (n_local,) sequence of each local token
    spans: torch.Tensor  # int64 (n_spans, 3) rows (seq, start, end), local order
    num_recv: int  # rows of the receive buffer (remote KV tokens)
    local_tasks: TaskList
    stages: tuple[StageView, ...]
    kernel: str | None = None  # attention kernel backend (the plan's ``settings.kernel``; None: automatic)

    @property
    def num_local(self) -> int:
        return int(self.token_index.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())


def build_rank_view(plan, rank: int) -> RankView:
    """Rank ``rank``'s view of ``plan`` (an :class:`hf_fcp.plan.fcp_plan.FCPPlan`; use ``plan.for_rank``)."""
    spans = np.asarray(plan.rank_spans[rank], dtype=np.int64).reshape(-1, 3)
    lens = spans[:, 2] - spans[:, 1]
    local_off = np.concatenate([[0], np.cumsum(lens)])[:-1]
    offsets = plan.offsets
    by_seq: dict[int, list[tuple[int, int, int]]] = {}
    for (s, a, b), o in zip(spans.tolist(), local_off.tolist()):
        by_seq.setdefault(s, []).append((a, b, o))
    for runs in by_seq.values():
        runs.sort()
    mine = plan.transfers_of(rank)  # built on demand for ring/allgather plans: once per view
    return RankView(
        rank=rank, world_size=plan.world_size, num_tokens=plan.num_tokens, fingerprint=plan.fingerprint,
        seq_lens=_tensor(plan.seq_lens),
        token_index=_tensor(ranges(offsets[spans[:, 0]] + spans[:, 1], lens)),
        position_ids=_tensor(ranges(spans[:, 1], lens)),
        seq_index=_tensor(np.repeat(spans[:, 0], lens)),
        spans=_tensor(spans),
        num_recv=sum(t.tokens for t in mine if t.dst == rank),
        local_tasks=_local_tasks(spans, local_off, by_seq),
        stages=_stages(plan, rank, mine, spans, local_off, by_seq),
        kernel=plan.settings.kernel,
    )


def _local_tasks(spans, local_off, by_seq) -> TaskList:
    """One causal segment per sequence: its held spans, in position order (which is local order), are
    both queries and keys; bottom-right causal over the joined runs is exactly the causal mask, because
    the positions missing between runs are not in the segment."""
    q_runs = [_rows(by_seq[s]) for s in dict.fromkeys(spans[:, 0].tolist())]
    return TaskList.build(q_runs, q_runs, causal=True)


def _rows(runs) -> np.ndarray:
    """Local rows of ``runs`` ((start, end, local offset), in position order), concatenated."""
    return ranges(np.array([o for _, _, o in runs], np.int64), np.array([b - a for a, b, _ in runs], np.int64))


def _send_rows(pieces, by_seq) -> np.ndarray:
    starts, lens = [], []
    for s, c, d in pieces:
        a, b, o = next(r for r in by_seq[s] if r[0] <= c and d <= r[1])
        starts.append(o + c - a)
        lens.append(d - c)
    return ranges(np.array(starts, np.int64), np.array(lens, np.int64))


def _stages(plan, rank, mine, spans, local_off, by_seq) -> tuple[StageView, ...]:
    sends = {t.round: t for t in mine if t.src == rank}
    recvs = {t.round: t for t in mine if t.dst == rank}
    out, buf = [], 0
    for r0, r1 in plan.stages:
        rounds, pieces = [], []  # pieces: (seq, start, end, buffer row)
        for r in range(r0, r1):
            snd, rcv = sends.get(r), recvs.get(r)
            rounds.append(RoundView(
                send_peer=snd.dst if snd else -1,
                send_rows=_tensor(_send_rows(snd.pieces, by_seq) if snd else np.zeros(0, np.int64)),
                recv_peer=rcv.src if rcv else -1, recv_start=buf, recv_len=rcv.tokens if rcv else 0))
            for s, c, d in (rcv.pieces if rcv else ()):
                pieces.append((s, c, d, buf))
                buf += d - c
        out.append(StageView(rounds=tuple(rounds), tasks=_remote_tasks(spans, local_off, pieces)))
    return tuple(out)


def _remote_tasks(spans, local_off, pieces) -> TaskList:
    """Non-causal segments. For a sequence whose held runs start at a_1 < a_2 < ..., the received pieces
    ending in (a_{j-1}, a_j] are seen by runs j, j+1, ...: one segment per such group, each piece once."""
    by_seq: dict[int, list[tuple[int, int, int]]] = {}
    for s, c, d, row in pieces:
        by_seq.setdefault(s, []).append((c, d, row))
    runs: dict[int, list[tuple[int, int, int]]] = {}
    for (s, a, b), o in zip(spans.tolist(), local_off.tolist()):
        runs.setdefault(s, []).append((a, b, o))
    for held in runs.values():
        held.sort()
    q_runs, k_runs = [], []
    for s, got in by_seq.items():
        held, keys, group = runs.get(s, []), [], []
        got.sort()
        i = 0
        for j, (a, _, _) in enumerate(held):
            new = []
            while i < len(got) and got[i][1] <= a:
                c, d, row = got[i]
                new.append(np.arange(row, row + d - c, dtype=np.int64))
                i += 1
            if new and group:  # this run sees more keys than the runs before it: close their segment
                q_runs.append(_rows(group))
                k_runs.append(np.concatenate(keys))
                group = []
            keys += new
            if keys:
                group.append(held[j])
        if group:
            q_runs.append(_rows(group))
            k_runs.append(np.concatenate(keys))
    return TaskList.build(q_runs, k_runs, causal=False)
