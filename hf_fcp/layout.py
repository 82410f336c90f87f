"""Plan data types: where every token lives and which KV tokens move where, in which round.

Pure data and arithmetic on it; no torch.distributed. Terms used throughout:

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
from dataclasses import dataclass, field
from typing import NamedTuple
import numpy as np

from .config import PlanOptions
from .cost import PAIRS, kernel_for, rank_work

Span = tuple[int, int, int]


def span_cost(start, end):
    """Causal pairs of the token range ``[start, end)``: sum of ``p + 1`` for p in the range.

    Works on ints and on numpy arrays (elementwise, float64 to avoid overflow at 2M-token sequences).
    """
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    out = (end * (end + 1) - start * (start + 1)) / 2
    return float(out) if out.ndim == 0 else out


class Transfer(NamedTuple):
    """One message: ``src`` sends the K/V of ``pieces`` (held by ``src``) to ``dst`` in ``round``."""

    src: int
    dst: int
    round: int
    pieces: tuple[Span, ...]
    """Spans in the order their tokens are laid out in the message (and in ``dst``'s receive buffer)."""

    @property
    def tokens(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


@dataclass(frozen=True)
class FCPPlan:
    """The plan of one global batch for all ranks. Build it with :func:`hf_fcp.plan_batch`.

    Deterministic: the same inputs give an identical plan (and ``fingerprint``) on every rank.
    """

    seq_lens: tuple[int, ...]
    world_size: int
    block_size: int
    tokens_per_rank: int
    strategy: str
    rank_spans: tuple[tuple[Span, ...], ...]
    """Per rank, its held spans in local token order."""
    transfers: tuple[Transfer, ...]
    """All messages, sorted by (round, src)."""
    num_rounds: int
    options: PlanOptions = field(default_factory=PlanOptions)
    collective: bool = False
    """True for ``ring``/``allgather``: ``transfers`` is left empty (it grows as W² × sequences) and each
    rank's messages are built on demand by ``transfers_of``: in round k, rank r sends to rank r+k+1 all
    its spans of the sequences that rank also holds."""
    plan_ms: float = 0.0
    """Wall time the planner took, in milliseconds."""

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
        """Communication stages as half-open round ranges ``[r0, r1)``, ``rounds_per_stage`` rounds each."""
        step = self.options.rounds_per_stage
        return tuple((r, min(r + step, self.num_rounds)) for r in range(0, self.num_rounds, step))

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

    def comm_matrix(self) -> np.ndarray:
        """int64 (W, W): KV tokens sent from rank i (row) to rank j (column) over the whole batch."""
        w = self.world_size
        mat = np.zeros((w, w), dtype=np.int64)
        if not self.collective:
            for t in self.transfers:
                mat[t.src, t.dst] += t.tokens
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
        """The picklable per-rank view the attention engine and collator use (see ``RankView``)."""
        from .views import build_rank_view

        self._check_rank(rank)
        return build_rank_view(self, rank)

    def _check_rank(self, rank) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")

    # ---- accounting ------------------------------------------------------------------------------------
    def rank_loads(self) -> dict[str, np.ndarray]:
        """Per-rank arrays (W,): ``tokens`` held, attention ``cost`` (causal pairs), ``work`` (modelled
        kernel work in pairs, :func:`hf_fcp.cost.seq_cost` under the ``balance`` / ``kernel_cost``
        options), ``kv_in`` and ``kv_out`` (KV tokens received / sent), ``spans`` (number of held spans)."""
        w = self.world_size
        tokens, cost, work = np.zeros(w, np.int64), np.zeros(w, np.float64), np.zeros(w, np.float64)
        mat = self.comm_matrix()
        kv_in, kv_out = mat.sum(axis=0), mat.sum(axis=1)
        nspans = np.zeros(w, np.int64)
        kernel = kernel_for(self.options.balance, self.options.kernel_cost)
        for r, spans in enumerate(self.rank_spans):
            if spans:
                arr = np.asarray(spans, dtype=np.int64)
                tokens[r] = int((arr[:, 2] - arr[:, 1]).sum())
                cost[r] = float(span_cost(arr[:, 1], arr[:, 2]).sum())
                work[r] = cost[r] if kernel == PAIRS else rank_work(spans, kernel)
            nspans[r] = len(spans)
        return {"tokens": tokens, "cost": cost, "work": work, "kv_in": kv_in, "kv_out": kv_out, "spans": nspans}

    def stats(self) -> dict[str, float | int]:
        """Summary figures of the plan.

        ``compute_imbalance``: max/mean − 1 over ranks of what the planner balances (``work`` under
        ``balance="kernel"``, the default; causal pairs under ``"pairs"``); ``pairs_imbalance``: the same
        of causal pairs alone; ``memory_imbalance``: of tokens held.
        ``comm_bytes``: total K+V bytes moved (``kv_heads``, ``head_dim``, ``kv_dtype`` options).
        ``max_rank_comm_bytes``: the largest per-rank traffic, max over ranks of max(bytes in, bytes out).
        ``rounds``: congestion-free rounds; ``stages``: after coalescing; ``plan_ms``: planner wall time.
        """
        loads = self.rank_loads()
        per_tok = self.options.kv_bytes_per_token
        return {
            "compute_imbalance": _imbalance(loads["work" if self.options.balance == "kernel" else "cost"]),
            "pairs_imbalance": _imbalance(loads["cost"]),
            "memory_imbalance": _imbalance(loads["tokens"]),
            "comm_bytes": int(loads["kv_in"].sum()) * per_tok,
            "max_rank_comm_bytes": int(np.maximum(loads["kv_in"], loads["kv_out"]).max()) * per_tok,
            "rounds": self.num_rounds,
            "stages": len(self.stages),
            "max_spans_per_rank": int(loads["spans"].max()),
            "plan_ms": round(self.plan_ms, 3),
        }

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the plan (inputs, placement, rounds); equal plans, equal fingerprints."""
        h = hashlib.blake2b(digest_size=8)
        head = (self.strategy, self.world_size, self.block_size, self.tokens_per_rank, self.num_rounds,
                self.options.rounds_per_stage)
        h.update(repr(head).encode())
        h.update(np.asarray(self.seq_lens, dtype=np.int64).tobytes())
        for spans in self.rank_spans:
            h.update(np.asarray(spans, dtype=np.int64).tobytes() + b"|")
        for t in self.transfers:
            h.update(np.asarray((t.src, t.dst, t.round), dtype=np.int64).tobytes())
            h.update(np.asarray(t.pieces, dtype=np.int64).tobytes())
        return h.hexdigest()

    def to_dict(self, assignment: bool = False) -> dict:
        """JSON-ready summary: ``stats()`` plus strategy, sizes and, optionally, every rank's spans."""
        out = {"strategy": self.strategy, "world_size": self.world_size, "block_size": self.block_size,
               "tokens_per_rank": self.tokens_per_rank, "num_tokens": self.num_tokens,
               "num_sequences": len(self.seq_lens), **self.stats()}
        if assignment:
            out["ranks"] = [[list(s) for s in spans] for spans in self.rank_spans]
        return out


def _imbalance(values: np.ndarray) -> float:
    mean = float(np.mean(values))
    return 0.0 if mean <= 0 else float(np.max(values)) / mean - 1.0
