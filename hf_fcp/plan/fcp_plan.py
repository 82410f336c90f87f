"""Plan data types: where every token lives and which KV tokens move where, in which round.

Pure data and arithmetic on it (numpy only: planning never imports torch; ``for_rank`` does, on use).
Terms used throughout:

* **global batch**: sequences ``0..n-1`` of lengths ``seq_lens``; token ``p`` of sequence ``s`` has global
  index ``offsets[s] + p`` in the concatenated batch.
* **span** ``(seq, start, end)``: the half-open token range ``[start, end)`` of one sequence.
* **cost** of a span: causal (query, key) pairs, a token at position ``p`` costs ``p + 1``.
* **transfer**: one P2P message carrying the K and V of some spans from the rank that holds them (``src``)
  to a rank that needs them (``dst``) in a given ``round``. In a round every rank sends at most one and
  receives at most one message (congestion-free).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .cost import kernel_for, rank_work
from .settings import PlanSettings
from .spans import Span, span_cost


def imbalance(values) -> float:
    """max / mean − 1 of per-rank values (0 when the mean is 0): how far the busiest rank is above average."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if values.size else 0.0
    return 0.0 if mean <= 0 else float(values.max()) / mean - 1.0


def revised(plan: "FCPPlan", **changes) -> "FCPPlan":
    """``dataclasses.replace(plan, **changes)`` that keeps ``plan``'s cached ``message_array`` when the
    messages are not among the changes."""
    new = replace(plan, **changes)
    if "transfers" not in changes and "message_array" in plan.__dict__:
        new.__dict__["message_array"] = plan.__dict__["message_array"]  # cached_property's slot: not recomputed
    return new


class Transfer(NamedTuple):
    """One message: ``src`` sends the K/V of ``pieces`` to ``dst`` in ``round`` — pieces ``src`` holds, or
    (from ``FCPPlan.relay_from`` on) pieces it received in an earlier stage and forwards."""

    src: int
    dst: int
    round: int
    pieces: tuple[Span, ...]
    """Spans in the order their tokens are laid out in the message (and in ``dst``'s receive buffer)."""

    @property
    def tokens(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


class WindowPlan(NamedTuple):
    """The exchange of a layer kind with a sliding ``window``: its messages and congestion-free rounds."""

    window: int
    transfers: tuple[Transfer, ...]
    num_rounds: int


class _Record:
    """Dataclass of figures that also reads like a dict (``stats.rounds`` or ``stats["rounds"]``, as
    transformers' ``ModelOutput`` does), so figures can be logged or serialised by name."""

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(f"{name!r}: expected one of {list(self.keys())}")
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlanStats(_Record):
    """Summary figures of a plan (:meth:`FCPPlan.stats`); imbalances are max / mean − 1 over ranks."""

    compute_imbalance: float
    """Of what the planner balances: modelled kernel work under ``balance="kernel"`` (the default),
    causal pairs under ``"pairs"``."""
    pairs_imbalance: float
    """Of causal (query, key) pairs alone."""
    memory_imbalance: float
    """Of tokens held."""
    comm_bytes: int
    """K+V bytes moved over the whole batch (forward; the backward returns as many dK/dV bytes)."""
    max_rank_comm_bytes: int
    """The largest per-rank traffic: max over ranks of max(bytes in, bytes out)."""
    rounds: int
    """Congestion-free rounds."""
    stages: int
    """Communication stages after coalescing ``rounds_per_stage`` rounds."""
    max_spans_per_rank: int
    """Most token ranges any rank holds."""
    plan_ms: float
    """Planner wall time, milliseconds."""
    tokens: int
    """Tokens in the global batch."""
    sequences: int
    """Sequences in the global batch."""


@dataclass(frozen=True)
class RankLoads(_Record):
    """Per-rank arrays (W,) of one plan (:meth:`FCPPlan.rank_loads`)."""

    tokens: np.ndarray
    """int64: tokens held."""
    cost: np.ndarray
    """float64: attention cost in causal pairs."""
    work: np.ndarray
    """float64: modelled kernel work in pairs (:func:`hf_fcp.plan.cost.rank_work` under the ``balance`` /
    ``kernel_cost`` settings; the pairs themselves under ``balance="pairs"``)."""
    kv_in: np.ndarray
    """int64: KV tokens received."""
    kv_out: np.ndarray
    """int64: KV tokens sent."""
    spans: np.ndarray
    """int64: number of held spans."""


@dataclass(frozen=True)
class FCPPlan:
    """The plan of one global batch for all ranks. Build it with :func:`hf_fcp.plan_batch`.

    Deterministic: the same inputs give an identical plan (and ``fingerprint``) on every rank.
    """

    seq_lens: tuple[int, ...]
    world_size: int
    block_size: int
    tokens_per_rank: int
    """The per-rank token cap this plan was made under (``settings.tokens_per_rank`` resolved)."""
    strategy: str
    """The placement's name (``settings.strategy``, or a simulator baseline's name)."""
    rank_spans: tuple[tuple[Span, ...], ...]
    """Per rank, its held spans in local token order."""
    transfers: tuple[Transfer, ...]
    """All messages, sorted by (round, src)."""
    num_rounds: int
    settings: PlanSettings = field(default_factory=PlanSettings)
    collective: bool = False
    """True for ``ring``/``allgather``: ``transfers`` is left empty (it grows as W² × sequences) and each
    rank's messages are built on demand by ``transfers_of``: in round k, rank r sends to rank r+k+1 all
    its spans of the sequences that rank also holds."""
    plan_ms: float = 0.0
    """Wall time the planner took, in milliseconds."""
    overlap: bool = True
    """Ranks compute while K/V arrive (stage by stage); False: every K/V arrives first, then all segments
    run (``PlanSettings.overlap``)."""
    window: int | None = None
    """The sliding window (keys) of the layers this plan's exchange serves; None: full causal attention.
    The main plan serves full attention; ``for_window(w)`` derives the plan of a sliding-window layer."""
    windows: tuple[WindowPlan, ...] = ()
    """One smaller exchange per sliding window of ``settings.attention_layers``: a rank receives only the
    keys inside the windows of its runs."""
    fused: tuple[frozenset[int], ...] = ()
    """Per rank, the sequences it runs *fused*: one causal kernel segment per held run against all its
    keys (received and local, in position order) once they arrived; the others run *split*: a local causal
    segment at once plus a segment per stage that brings remote keys (:mod:`hf_fcp.plan.tasks`). Empty:
    every rank runs every sequence split."""
    relay_from: int = 0
    """The first round of the relay phase (0: none; :mod:`hf_fcp.plan.relay`): from it on, ranks forward
    K/V they received from another node to the other ranks of their node that need it (and, in the
    backward, send back the dK/dV those ranks return to them added to their own). It starts a new stage."""

    # ---- structure -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def offsets(self) -> np.ndarray:
        """int64 (n+1,): start of each sequence in the concatenated global batch."""
        return np.concatenate([[0], np.cumsum(self.seq_lens, dtype=np.int64)])

    @property
    def stages(self) -> tuple[tuple[int, int], ...]:
        """Communication stages as half-open round ranges ``[r0, r1)``, ``rounds_per_stage`` rounds each;
        the relay phase (``relay_from``) starts a stage of its own."""
        step, cut = self.settings.rounds_per_stage, self.relay_from or self.num_rounds
        return tuple((r, min(r + step, end)) for start, end in ((0, cut), (cut, self.num_rounds))
                     for r in range(start, end, step))

    def stage_of(self, rounds: np.ndarray) -> np.ndarray:
        """The stage (index into :attr:`stages`) of each round of the int array ``rounds``."""
        step, cut = self.settings.rounds_per_stage, self.relay_from
        if not cut:
            return rounds // step
        return np.where(rounds < cut, rounds // step, -(-cut // step) + (rounds - cut) // step)

    def spans(self, rank: int) -> list[Span]:
        """``rank``'s held ``(seq_index, start, end)`` token ranges in its local token order."""
        self._check_rank(rank)
        return list(self.rank_spans[rank])

    def transfers_of(self, rank: int) -> list[Transfer]:
        """The messages ``rank`` sends or receives, sorted by (round, src)."""
        self._check_rank(rank)
        if not self.collective:
            return [t for t in self.transfers if t.src == rank or t.dst == rank]
        w, out = self.world_size, []
        held = [{s for s, _, _ in spans} for spans in self.rank_spans]
        for k in range(w - 1):
            for src, dst in (((rank - k - 1) % w, rank), (rank, (rank + k + 1) % w)):
                pieces = tuple(p for p in self.rank_spans[src] if p[0] in held[dst])
                if pieces and src != dst:
                    out.append(Transfer(src, dst, k, pieces))
        return sorted(set(out), key=lambda t: (t.round, t.src))

    @cached_property
    def message_array(self) -> np.ndarray:
        """int64 (m, 4): one row ``(src, dst, tokens, round)`` per message, in ``transfers`` order."""
        if not self.transfers:
            return np.zeros((0, 4), np.int64)
        src, dst, rounds, pieces = zip(*self.transfers)
        tokens = [p[0][2] - p[0][1] if len(p) == 1 else sum([b - a for _, a, b in p]) for p in pieces]
        return np.column_stack([src, dst, tokens, rounds]).astype(np.int64)

    def comm_matrix(self) -> np.ndarray:
        """int64 (W, W): KV tokens sent from rank i (row) to rank j (column) over the whole batch."""
        w = self.world_size
        mat = np.zeros((w, w), dtype=np.int64)
        if not self.collective:
            m = self.message_array
            np.add.at(mat, (m[:, 0], m[:, 1]), m[:, 2])
            return mat
        n = len(self.seq_lens)
        tok = np.zeros((w, n), dtype=np.float64)
        for r, spans in enumerate(self.rank_spans):
            if spans:
                arr = np.asarray(spans, dtype=np.int64)
                np.add.at(tok[r], arr[:, 0], arr[:, 2] - arr[:, 1])
        mat = np.rint(tok @ (tok > 0).T.astype(np.float64)).astype(np.int64)
        np.fill_diagonal(mat, 0)
        return mat

    def for_rank(self, rank: int):
        """The picklable per-rank view the attention engine and collator use (a
        :class:`hf_fcp.plan.views.RankView` of int64 CPU tensors)."""
        from .views import (
            build_rank_view,  # torch is loaded here, on use: planning alone never needs it
        )

        self._check_rank(rank)
        return build_rank_view(self, rank)

    def fused_on(self, rank: int) -> frozenset[int]:
        """The sequences ``rank`` runs fused (see ``fused``); every one of them under a sliding window."""
        if self.window is not None:
            return frozenset(s for s, _, _ in self.rank_spans[rank])
        return self.fused[rank] if self.fused else frozenset()

    def for_window(self, window: int | None) -> "FCPPlan":
        """The plan of the layers with this sliding ``window`` (None: this plan): the same placement with
        the window's exchange; its rank views run every sequence fused under the window."""
        if window is None or window == self.window:
            return self
        match = [w for w in self.windows if w.window == window]
        if not match:
            have = [w.window for w in self.windows]
            raise ValueError(f"window: got {window}, expected one of the plan's sliding windows {have} (plan with "
                             f"attention_layers that include ({window}, layers))")
        return replace(self, transfers=match[0].transfers, num_rounds=match[0].num_rounds, collective=False,
                       window=window, windows=(), relay_from=0)

    def _check_rank(self, rank) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")

    # ---- accounting ------------------------------------------------------------------------------------
    def rank_loads(self) -> RankLoads:
        """Per-rank loads (:class:`RankLoads`): tokens, causal pairs, modelled kernel work, KV in/out, spans."""
        w = self.world_size
        tokens, cost, work = np.zeros(w, np.int64), np.zeros(w, np.float64), np.zeros(w, np.float64)
        mat = self.comm_matrix()
        nspans = np.zeros(w, np.int64)
        kernel = kernel_for(self.settings.balance, self.settings.kernel_cost)
        for r, spans in enumerate(self.rank_spans):
            if spans:
                arr = np.asarray(spans, dtype=np.int64)
                tokens[r] = int((arr[:, 2] - arr[:, 1]).sum())
                cost[r] = float(span_cost(arr[:, 1], arr[:, 2]).sum())
                work[r] = rank_work(spans, kernel, self.fused_on(r), self.settings.attention_layers)
            nspans[r] = len(spans)
        return RankLoads(tokens=tokens, cost=cost, work=work, kv_in=mat.sum(axis=0), kv_out=mat.sum(axis=1),
                         spans=nspans)

    def stats(self) -> PlanStats:
        """Summary figures of the plan (:class:`PlanStats`; bytes from the ``kv_heads``, ``head_dim`` and
        ``kv_dtype`` settings)."""
        loads = self.rank_loads()
        per_tok = self.settings.kv_bytes_per_token
        return PlanStats(
            compute_imbalance=imbalance(loads.work if self.settings.balance == "kernel" else loads.cost),
            pairs_imbalance=imbalance(loads.cost), memory_imbalance=imbalance(loads.tokens),
            comm_bytes=int(loads.kv_in.sum()) * per_tok,
            max_rank_comm_bytes=int(np.maximum(loads.kv_in, loads.kv_out).max()) * per_tok,
            rounds=self.num_rounds, stages=len(self.stages), max_spans_per_rank=int(loads.spans.max()),
            plan_ms=round(self.plan_ms, 3), tokens=self.num_tokens, sequences=len(self.seq_lens))

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the plan (inputs, placement, rounds); equal plans, equal fingerprints."""
        h = hashlib.blake2b(digest_size=8)
        head = (self.strategy, self.world_size, self.block_size, self.tokens_per_rank, self.num_rounds,
                self.settings.rounds_per_stage) + ((self.relay_from,) if self.relay_from else ())
        h.update(repr(head).encode())
        h.update(np.asarray(self.seq_lens, dtype=np.int64).tobytes())
        for spans in self.rank_spans:
            h.update(np.asarray(spans, dtype=np.int64).tobytes() + b"|")
        for t in self.transfers:
            h.update(np.asarray((t.src, t.dst, t.round), dtype=np.int64).tobytes())
            h.update(np.asarray(t.pieces, dtype=np.int64).tobytes())
        for seqs in self.fused:
            h.update(np.asarray(sorted(seqs), dtype=np.int64).tobytes() + b"|")
        for wp in self.windows:
            transfers = [(t.src, t.dst, t.round, t.pieces) for t in wp.transfers]
            h.update(repr((wp.window, wp.num_rounds, transfers)).encode())
        if self.window is not None:
            h.update(f"window={self.window}".encode())
        return h.hexdigest()

    def to_dict(self, assignment: bool = False) -> dict:
        """JSON-ready summary: ``stats()`` plus strategy, sizes and, optionally, every rank's spans."""
        out = {"strategy": self.strategy, "world_size": self.world_size, "block_size": self.block_size,
               "tokens_per_rank": self.tokens_per_rank, "num_tokens": self.num_tokens,
               "num_sequences": len(self.seq_lens), **self.stats().to_dict()}
        if assignment:
            out["ranks"] = [[list(s) for s in spans] for spans in self.rank_spans]
        return out

