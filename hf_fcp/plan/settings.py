"""``PlanSettings``: every setting of the planner in one validated object.

It is built once (by ``FCPPlugin``, the collator, the CLI or a direct ``plan_batch`` call), validated in
``__post_init__``, and then travels as itself to the planner, into the plan (``plan.settings``) and to
every rank's view (``view.kernel``). Every check raises ``ValueError`` naming the setting, the value and
what is allowed ("got X, expected Y"), before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .checks import check_choice, check_int, check_number
from .cost import KernelCost

STRATEGIES = ("fcp", "ring", "allgather", "packing")
"""Placements ``plan_batch`` makes: this library's (``fcp``) and the simple ones it is compared with."""
BALANCE = ("kernel", "pairs")
FUSION = ("auto", "all", "none")
OVERLAP = ("auto", "always", "never")
RELAY = ("auto", "always", "never")
KERNELS = ("torch_cpu", "flash_attn", "torch_cuda", "naive")
"""Attention kernel backends the engine runs (see :mod:`hf_fcp.engine.kernels`); None = automatic."""
KV_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp8": 1}
BATCH_TOKENS_PER_RANK = 16384
"""Tokens per rank of a global batch when nothing sets the budget: ``FCPPlugin``'s sampler fills
``world_size × BATCH_TOKENS_PER_RANK`` tokens (the planner itself caps a rank at ``tokens_per_rank``, by
default an even share of whatever batch it gets)."""
WEAK_SCALING_TOKENS_PER_RANK = 32768
"""Tokens per rank of the simulator's weak-scaling batches (the setting of the FCP paper and of
docs/performance.md's tables): 2× :data:`BATCH_TOKENS_PER_RANK`, the long-context GPU budget they model."""


@dataclass(kw_only=True, frozen=True)
class PlanSettings:
    """How to plan a global batch (everything but the lengths and the world size)."""

    # the fields a command line exposes carry their help as metadata (HfArgumentParser reads it; see help_of)
    block_size: int = field(default=4096, metadata={
        "help": "Tokens per block: sequences are cut into blocks of this size (the last one may be partial)."})
    tokens_per_rank: int | None = field(default=None, metadata={
        "help": "Hard cap on the tokens a rank holds; None: an even share of each batch, ceil(total / W)."})
    strategy: str = field(default="fcp", metadata={
        "help": "Placement: fcp (this library), or for comparison ring (zigzag over all ranks), allgather "
                "(contiguous shards, K/V all-gathered) and packing (whole sequences, no context parallelism)."})
    kv_heads: int = field(default=8, metadata={
        "help": "Key/value heads per token, used only to convert K/V tokens into bytes in stats()."})
    head_dim: int = field(default=128, metadata={"help": "Head dimension, used only for byte counts in stats()."})
    kv_dtype: str = "bf16"
    """Element type of K and V on the wire: one of bf16, fp16, fp32, fp8 (bytes in ``stats()``)."""
    rounds_per_stage: int = field(default=1, metadata={
        "help": "Coalesce this many consecutive congestion-free rounds into one communication stage (>= 1)."})
    max_stages: int = 0
    """0: stages of ``rounds_per_stage`` rounds. N ≥ 1: coalesce each plan's rounds into at most N stages:
    the placements the planner compares are priced in N stages (``rounds_per_stage`` = ``ceil(rounds / N)``),
    and the plan it keeps runs in N, N/2 or N/4 stages, whichever its timeline finds fastest (the plan's
    settings then hold that ``rounds_per_stage``)."""
    locality: float = 0.5
    """fcp only: keep a sequence's next block on the rank holding its neighbour while that rank still
    needs at least ``locality`` × the work of the neediest rank (0 = always, 1 = never prefer locality)."""
    balance: str = "kernel"
    """fcp only: what the placement equalises across ranks. ``"kernel"``: modelled attention-kernel work —
    the causal pairs plus what a FlashAttention-style kernel spends beyond them (partial and diagonal
    tiles, per-tile set-up; :mod:`hf_fcp.plan.cost`); ``"pairs"``: causal (query, key) pairs only."""
    kernel_cost: KernelCost | None = None
    """The kernel model ``balance="kernel"`` uses: a :class:`hf_fcp.plan.cost.KernelCost` (e.g. a calibrated
    cluster's ``Cluster.kernel_cost()``); ``None``: :data:`hf_fcp.plan.cost.FLASH`, PyTorch's
    FlashAttention-2 kernel measured on an H200."""
    fusion: str = "auto"
    """How ranks run a sequence they hold part of: ``"all"`` — *fused*, one causal kernel segment per held
    run against all its keys (received and local, in position order) once they arrived; ``"none"`` —
    *split*, a local causal segment at once plus one segment per stage that brings remote keys (more and
    smaller kernel segments, each able to run as soon as its keys are there); ``"auto"`` — fused when the
    exchange is not overlapped (``overlap``: every key is there before any kernel runs), else whichever of
    the two the planner finds faster (on the engine's timeline, :mod:`hf_fcp.plan.schedule`, while that
    search fits its budget; else its per-rank model, :func:`hf_fcp.plan.execution.execution`). See
    :mod:`hf_fcp.plan.tasks`."""
    overlap: str = "auto"
    """Whether a rank computes while its K/V arrive. ``"always"``: local work runs at once and each
    stage's work when the stage arrived (the communication kernels then share the GPU with the attention
    kernels while they run, ``overlap_slowdown``); ``"never"``: every K/V arrives first, then all segments run (no
    sharing; the exchange is exposed); ``"auto"``: the planner picks the faster (as for ``fusion``)."""
    link_cost: float = 34.0
    """Time to move one token's K and V between two ranks, in units of the kernel time of one causal
    (query, key) pair forward + backward: ≈ 34 for Llama-3-70B heads (64 q / 8 kv, head dim 128, bf16) on
    H200 NVLink (360 GB/s), ≈ 8× that over 400 Gb/s InfiniBand. Left at this default, ``FCPPlugin``
    scales it to the model's heads and K/V dtype (K/V bytes per token over attention FLOPs per pair: 68
    for Llama-3-8B's 32 q / 8 kv heads)."""
    overlap_slowdown: float = 0.06
    """Fraction of the attention kernels' speed lost while communication kernels run beside them (NCCL
    channels on 8 of an H100/H200's 132 SMs)."""
    node_size: int = 8
    """GPUs per node (one NVLink domain): ranks r and q share a node when r // node_size == q // node_size.
    The planner aligns its grouped placements to nodes (:func:`hf_fcp.plan.candidates.grouped`) and, with
    ``node_link_cost``, prices messages inside a node at that cost."""
    node_link_cost: float | None = None
    """``link_cost`` of a message between two ranks of one node (NVLink); None: ``link_cost`` for every
    message. The simulator's cluster presets give both (``link_cost`` then prices the network)."""
    relay: str = "auto"
    """Across nodes, send K/V that several ranks of another node need once to one of them, which forwards
    it to the others over the node's links (and sums their dK/dV on the way back): less network traffic,
    the forwards in later rounds (:mod:`hf_fcp.plan.relay`). ``"auto"``: where ``node_link_cost`` is
    below ``link_cost`` and the planner's timeline finds it faster than the plain exchange; ``"always"``:
    wherever a plan spans nodes; ``"never"``."""
    link_latency: float = 880.0
    """Fixed time of one message beside its bytes (link latency, NCCL set-up), in tokens of K/V moved
    (each ``link_cost``): ≈ 880 for 10 µs on H200 NVLink at 4 KiB of K and V per token (8 kv heads of 128,
    bf16). It prices the exchange's schedule (:mod:`hf_fcp.plan.schedule`); ``FCPPlugin`` scales it, and
    ``link_cost``, to the model when they are left at their defaults."""
    attention_layers: tuple[tuple[int | None, int], ...] = ((None, 1),)
    """The model's kinds of attention layer as ``((window, layers), ...)``: ``window`` None for full causal
    attention, else a sliding window of that many keys (transformers' ``sliding_window``), and how many
    layers use it. The planner balances their summed kernel work, and every window gets its own, smaller
    exchange (``plan.windows``); ``FCPPlugin`` reads them from the model's config."""
    kernel: str | None = None
    """Attention kernel backend every rank runs this plan's attention with (:data:`KERNELS`); None picks
    the best one for the tensors' device and dtype. It reaches the attention layers with the rank views."""

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size)
        check_int("tokens_per_rank", self.tokens_per_rank, optional=True)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_int("kv_heads", self.kv_heads)
        check_int("head_dim", self.head_dim)
        check_choice("kv_dtype", self.kv_dtype, sorted(KV_DTYPE_BYTES))
        check_int("rounds_per_stage", self.rounds_per_stage)
        check_int("max_stages", self.max_stages, 0)
        check_number("locality", self.locality, high=1.0, low_open=False)
        check_choice("balance", self.balance, BALANCE)
        check_choice("fusion", self.fusion, FUSION)
        check_choice("overlap", self.overlap, OVERLAP)
        check_number("link_cost", self.link_cost, low_open=False)
        check_number("overlap_slowdown", self.overlap_slowdown, high=0.99, low_open=False)
        check_number("link_latency", self.link_latency, low_open=False)
        check_int("node_size", self.node_size)
        check_number("node_link_cost", self.node_link_cost, low_open=False, optional=True)
        check_choice("relay", self.relay, RELAY)
        if self.kernel_cost is not None and not isinstance(self.kernel_cost, KernelCost):
            raise ValueError(f"kernel_cost: got {type(self.kernel_cost).__name__}, expected an "
                             f"hf_fcp.plan.cost.KernelCost or None")
        if self.kernel is not None:
            check_choice("kernel", self.kernel, KERNELS)
        _check_layers(self.attention_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V for one token: 2 × kv_heads × head_dim × element size."""
        return 2 * self.kv_heads * self.head_dim * KV_DTYPE_BYTES[self.kv_dtype]

    def resolve_tokens_per_rank(self, total: int, world_size: int) -> int:
        """The per-rank token cap of a batch of ``total`` tokens: ``tokens_per_rank`` if set (it must hold
        the batch), else an even share."""
        even = -(-total // world_size)
        cap = self.tokens_per_rank
        if cap is None:
            return even
        if cap * world_size < total:
            raise ValueError(
                f"tokens_per_rank={cap} is too small: the batch holds {total} tokens, more than "
                f"world_size × tokens_per_rank = {world_size} × {cap} = {cap * world_size}; "
                f"use tokens_per_rank >= {even} or a smaller batch")
        return cap


def help_of(name: str, default=None) -> str:
    """The help of ``PlanSettings.<name>`` (its field metadata) followed by the default a command line shows:
    ``default`` if given (a tool that differs on purpose), else the field's."""
    f = next(f for f in fields(PlanSettings) if f.name == name)
    shown = f.default if default is None else default
    return f"{f.metadata['help']} (default {shown})"


def _check_layers(layers) -> None:
    expected = "a non-empty tuple of (window: int >= 1 or None, layers: int >= 1) pairs with distinct windows"
    ok = isinstance(layers, tuple) and layers and all(isinstance(x, tuple) and len(x) == 2 for x in layers)
    if ok:
        ok = all((w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 1))
                 and isinstance(n, int) and not isinstance(n, bool) and n >= 1 for w, n in layers)
        ok = ok and len({w for w, _ in layers}) == len(layers)
    if not ok:
        raise ValueError(f"attention_layers: got {layers!r}, expected {expected}")


def settings_from(settings: PlanSettings | None, overrides: dict) -> PlanSettings:
    """``settings`` with ``overrides`` applied (validated), or new settings from the overrides alone.
    Unknown names raise with the list of allowed ones."""
    allowed = sorted(PlanSettings.__dataclass_fields__)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown planner setting(s) {unknown}; allowed settings are {allowed}")
    if settings is None:
        return PlanSettings(**overrides)
    if not isinstance(settings, PlanSettings):
        raise ValueError(f"settings: got {type(settings).__name__}, expected an hf_fcp.PlanSettings")
    if not overrides:
        return settings  # validated when it was built
    return replace(settings, **overrides)
