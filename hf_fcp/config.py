"""Validated settings shared by the planner, the CLI and the integrations.

Every check runs before any process group exists and raises ``ValueError`` with a message that names the
setting, the value received and what is allowed ("got X, expected Y").
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from .cost import KernelCost

STRATEGIES = ("fcp", "ring", "allgather", "packing")
BALANCE = ("kernel", "pairs")
KV_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp8": 1}


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is an integer ≥ 1, else raise a message naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return int(value)


def check_seq_lens(seq_lens: Sequence[Any]) -> tuple[int, ...]:
    """Validate a global batch of sequence lengths: a non-empty list of integers ≥ 1."""
    if isinstance(seq_lens, (str, bytes)) or not hasattr(seq_lens, "__len__"):
        raise ValueError(f"seq_lens must be a list of positive integers, got {type(seq_lens).__name__}")
    if len(seq_lens) == 0:
        raise ValueError("seq_lens is empty: a batch needs at least one sequence of length >= 1")
    out = []
    for i, length in enumerate(seq_lens):
        if hasattr(length, "item") and getattr(length, "ndim", 0) == 0:
            length = length.item()
        if isinstance(length, bool) or not isinstance(length, numbers.Integral):
            raise ValueError(f"seq_lens[{i}] must be a positive integer, got {length!r}")
        if length < 1:
            raise ValueError(f"seq_lens[{i}] must be >= 1 (empty sequences carry no tokens), got {length}")
        out.append(int(length))
    return tuple(out)


@dataclass(kw_only=True)
class PlanOptions:
    """Planner options beyond the main arguments of :func:`hf_fcp.plan_batch`."""

    kv_heads: int = 8
    """Key/value heads per token, used only to convert KV tokens into bytes in ``stats()``."""
    head_dim: int = 128
    """Head dimension, used only for byte counts in ``stats()``."""
    kv_dtype: str = "bf16"
    """Element type of K and V on the wire: one of bf16, fp16, fp32, fp8 (bytes in ``stats()``)."""
    rounds_per_stage: int = 1
    """Coalesce this many consecutive congestion-free rounds into one communication stage (≥ 1)."""
    locality: float = 0.5
    """fcp only: keep a sequence's next block on the rank holding its neighbour while that rank still
    needs at least ``locality`` × the work of the neediest rank (0 = always, 1 = never prefer locality)."""
    balance: str = "kernel"
    """fcp only: what the placement equalises across ranks. ``"kernel"``: modelled attention-kernel work —
    the causal pairs plus what a FlashAttention-style kernel spends beyond them (partial and diagonal
    tiles, per-tile set-up; :mod:`hf_fcp.cost`); ``"pairs"``: causal (query, key) pairs only."""
    kernel_cost: KernelCost | None = None
    """The kernel model ``balance="kernel"`` uses: an :class:`hf_fcp.cost.KernelCost` (e.g. a calibrated
    cluster's ``Cluster.kernel_cost()``); ``None``: :data:`hf_fcp.cost.FLASH`, PyTorch's FlashAttention-2
    kernel measured on an H200."""

    def __post_init__(self) -> None:
        if self.balance not in BALANCE:
            raise ValueError(f"balance must be one of {list(BALANCE)}, got {self.balance!r}")
        if self.kernel_cost is not None and not isinstance(self.kernel_cost, KernelCost):
            raise ValueError(f"kernel_cost must be an hf_fcp.cost.KernelCost or None, got "
                             f"{type(self.kernel_cost).__name__}")
        self.kv_heads = check_positive_int("kv_heads", self.kv_heads)
        self.head_dim = check_positive_int("head_dim", self.head_dim)
        self.rounds_per_stage = check_positive_int("rounds_per_stage", self.rounds_per_stage)
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPE_BYTES)}, got {self.kv_dtype!r}")
        if not isinstance(self.locality, numbers.Real) or not 0.0 <= float(self.locality) <= 1.0:
            raise ValueError(f"locality must be a number in [0, 1], got {self.locality!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V for one token: 2 × kv_heads × head_dim × element size."""
        return 2 * self.kv_heads * self.head_dim * KV_DTYPE_BYTES[self.kv_dtype]


def make_options(options: dict[str, Any]) -> PlanOptions:
    """Build :class:`PlanOptions` from keyword options, rejecting unknown names with the allowed list."""
    allowed = sorted(PlanOptions.__dataclass_fields__)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown planner option(s) {unknown}; allowed options are {allowed}")
    return PlanOptions(**options)


def check_strategy(strategy: Any) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy


def resolve_tokens_per_rank(tokens_per_rank: Any, total: int, world_size: int) -> int:
    """The per-rank token cap: ``tokens_per_rank`` if given (validated), else an even share."""
    even = -(-total // world_size)
    if tokens_per_rank is None:
        return even
    cap = check_positive_int("tokens_per_rank", tokens_per_rank)
    if cap * world_size < total:
        raise ValueError(
            f"tokens_per_rank={cap} is too small: the batch holds {total} tokens, more than "
            f"world_size × tokens_per_rank = {world_size} × {cap} = {cap * world_size}; "
            f"use tokens_per_rank >= {even} or a smaller batch"
        )
    return cap
