"""The per-rank view of a plan: what one worker needs to run attention and to cut its shard of the batch.

A :class:`RankView` is picklable and moves with ``.to(device)``. Local token order is the order of
``plan.spans(rank)``. Attention work is precomputed as varlen batches (:mod:`.tasks`): ``local_tasks``
run at once on local K/V; each communication stage's ``tasks`` (split sequences, against the receive
buffer) and ``fused`` (fused sequences, against the K/V buffer ``[receive buffer | local K/V]``) run once
the stage's K/V arrived. Which sequences a rank runs fused is the plan's decision (``plan.fused``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .spans import ranges
from .tasks import Movable, TaskList, fused_segments, fused_tasks, index_tensor, local_tasks, remote_tasks


@dataclass(frozen=True)
class RoundView(Movable):
    """This rank's part of one congestion-free round (peer −1: nothing in that direction)."""

    send_peer: int
    send_rows: torch.Tensor  # int64 (n_send,) local rows whose K/V are sent, in message order (in a relayed
    # exchange, ``RankView.relay_stage``: rows of the K/V buffer [receive buffer | local K/V])
    recv_peer: int
    recv_start: int  # first row of the message in the receive buffer
    recv_len: int


@dataclass(frozen=True)
class StageView(Movable):
    """Rounds run together as one communication stage, and the attention work their KV unlocks."""

    rounds: tuple[RoundView, ...]
    tasks: TaskList  # split sequences: keys index the receive buffer; causal=False
    fused: TaskList  # fused sequences whose last needed piece arrived here: keys index the K/V buffer; causal


@dataclass(frozen=True)
class RankView(Movable):
    """Everything rank ``rank`` needs for one batch. Tensors are int64 on CPU until ``.to(device)``."""

    rank: int
    world_size: int
    num_tokens: int  # tokens in the global batch
    longest: int  # tokens in the batch's longest sequence (host-side: no device read)
    fingerprint: str  # the plan's fingerprint (equal on every rank of a consistent plan)
    seq_lens: torch.Tensor  # int64 (num_seqs,) the global batch
    token_index: torch.Tensor  # int64 (n_local,) index of each local token in the concatenated batch
    position_ids: torch.Tensor  # int64 (n_local,) position of each local token within its sequence
    seq_index: torch.Tensor  # int64 (n_local,) sequence of each local token
    spans: torch.Tensor  # int64 (n_spans, 3) rows (seq, start, end), local order
    num_recv: int  # rows of the receive buffer (remote KV tokens)
    local_tasks: TaskList
    stages: tuple[StageView, ...]
    has_fused: bool  # some stage runs fused segments: the K/V buffer is [receive buffer | local K/V]
    overlap: bool = True  # compute while K/V arrive; False: wait for every stage first (plan.overlap)
    kernel: str | None = None  # attention kernel backend (the plan's ``settings.kernel``; None: automatic)
    window: int | None = None  # sliding window of the layers this view serves (None: full causal attention)
    windows: tuple["RankView", ...] = ()  # the views of the plan's sliding windows (``for_window``)
    relay_stage: int = 0  # first stage of the relay phase (plan.relay_from), 0: none; then send rows index
    # the K/V buffer [receive buffer | local K/V], and a stage from it on is posted once all before it arrived
    forwards: bool = False  # this rank forwards received K/V (and must add the dK/dV it gets back first)

    @property
    def num_local(self) -> int:
        return int(self.token_index.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())

    def for_window(self, window: int | None) -> "RankView":
        """The view of the layers with sliding ``window`` (None: full attention, this view): the same tokens
        with the window's smaller exchange (``plan.for_window(window).for_rank(rank)``)."""
        if window is None or window == self.window:
            return self
        for sub in self.windows:
            if sub.window == window:
                return sub
        if self.world_size == 1:  # nothing is exchanged: the kernels mask the window
            return replace(self, window=window, windows=())
        have = [sub.window for sub in self.windows]
        raise ValueError(f"window: got {window!r}, expected None or one of the plan's sliding windows {have}; plan "
                         f"the batch for the model's layer kinds: FCPPlugin.collator(model.config) (FCPTrainer "
                         f"does), or PlanSettings(attention_layers=hf_fcp.integrations.layer_kinds."
                         f"attention_layers(model.config))")


def build_rank_view(plan, rank: int) -> RankView:
    """Rank ``rank``'s view of ``plan`` (an :class:`hf_fcp.plan.fcp_plan.FCPPlan`; use ``plan.for_rank``)."""
    spans = np.asarray(plan.rank_spans[rank], dtype=np.int64).reshape(-1, 3)
    lens = spans[:, 2] - spans[:, 1]
    local_off = np.concatenate([[0], np.cumsum(lens)])[:-1]
    offsets = plan.offsets
    by_seq: dict[int, list[tuple[int, int, int]]] = {}
    for (s, a, b), o in zip(spans.tolist(), local_off.tolist()):
        by_seq.setdefault(s, []).append((a, b, o))
    by_seq = {s: _merge_touching(sorted(runs)) for s, runs in by_seq.items()}
    mine = plan.transfers_of(rank)  # built on demand for ring/allgather plans: once per view
    num_recv, n_local = sum(t.tokens for t in mine if t.dst == rank), int(lens.sum())
    fused = plan.fused_on(rank)
    stages, segments, forwards = _stages(plan, rank, mine, by_seq, fused, num_recv, n_local)
    extra = [(q, k) for stage, q, k in segments if stage < 0]
    return RankView(
        rank=rank, world_size=plan.world_size, num_tokens=plan.num_tokens, longest=max(plan.seq_lens),
        fingerprint=plan.fingerprint,
        seq_lens=index_tensor(plan.seq_lens),
        token_index=index_tensor(ranges(offsets[spans[:, 0]] + spans[:, 1], lens)),
        position_ids=index_tensor(ranges(spans[:, 1], lens)),
        seq_index=index_tensor(np.repeat(spans[:, 0], lens)),
        spans=index_tensor(spans),
        num_recv=num_recv, local_tasks=local_tasks(by_seq, fused, n_local, extra), stages=stages,
        has_fused=any(st.fused.num_segments for st in stages), overlap=plan.overlap, kernel=plan.settings.kernel,
        window=plan.window, windows=tuple(build_rank_view(plan.for_window(w.window), rank) for w in plan.windows),
        relay_stage=next((k for k, (r0, _) in enumerate(plan.stages) if r0 >= plan.relay_from), 0)
        if plan.relay_from else 0, forwards=forwards,
    )


def _merge_touching(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Held runs (start, end, local offset) in position order, touching ones merged when they are also
    adjacent in local order (plans from ``make_plan`` may list one run as several spans)."""
    out = [runs[0]]
    for a, b, o in runs[1:]:
        a0, b0, o0 = out[-1]
        if a == b0 and o == o0 + b0 - a0:
            out[-1] = (a0, b, o0)
        else:
            out.append((a, b, o))
    return out


def _send_rows(pieces, by_seq, got=None, offset: int = 0) -> np.ndarray:
    """Rows of a message's ``pieces``: local rows (plus ``offset``); a piece in ``got`` (received pieces
    -> their receive-buffer row, in a relayed exchange) at that row."""
    starts, lens = [], []
    for s, c, d in pieces:
        if got is not None and (s, c, d) in got:
            starts.append(got[s, c, d])
        else:
            a, b, o = next(r for r in by_seq[s] if r[0] <= c and d <= r[1])
            starts.append(offset + o + c - a)
        lens.append(d - c)
    return ranges(np.array(starts, np.int64), np.array(lens, np.int64))


def _stages(plan, rank, mine, by_seq, fused, num_recv: int, n_local: int
            ) -> tuple[tuple[StageView, ...], list, bool]:
    """The stage views and the fused segments (:func:`.tasks.fused_segments`) of rank ``rank``, and whether
    it forwards received K/V (a relayed exchange's send rows index the K/V buffer)."""
    sends = {t.round: t for t in mine if t.src == rank}
    recvs = {t.round: t for t in mine if t.dst == rank}
    rounds_of, pieces, buf = [], [], 0  # pieces: (seq, start, end, buffer row, stage)
    got = {} if plan.relay_from else None  # received piece -> its receive-buffer row
    forwards = False
    for k, (r0, r1) in enumerate(plan.stages):
        rounds = []
        for r in range(r0, r1):
            snd, rcv = sends.get(r), recvs.get(r)
            if snd and got is not None:
                forwards = forwards or any(p in got for p in snd.pieces)
            rows = _send_rows(snd.pieces, by_seq, got, num_recv if got is not None else 0) if snd else \
                np.zeros(0, np.int64)
            rounds.append(RoundView(
                send_peer=snd.dst if snd else -1, send_rows=index_tensor(rows),
                recv_peer=rcv.src if rcv else -1, recv_start=buf, recv_len=rcv.tokens if rcv else 0))
            for s, c, d in (rcv.pieces if rcv else ()):
                pieces.append((s, c, d, buf, k))
                if got is not None:
                    got[s, c, d] = buf
                buf += d - c
        rounds_of.append(tuple(rounds))
    segments = fused_segments(by_seq, fused, pieces, num_recv, plan.window)
    fused_by_stage = fused_tasks(segments, len(rounds_of), n_local, num_recv, plan.overlap)
    stages = tuple(StageView(rounds=rounds, fused=fused_by_stage[k],
                             tasks=remote_tasks(by_seq, fused, [p[:4] for p in pieces if p[4] == k], n_local, num_recv))
                   for k, rounds in enumerate(rounds_of))
    return stages, segments, forwards
