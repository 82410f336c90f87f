"""Cluster model: compute peak, attention-kernel efficiency, links, and the SMs communication occupies.

Every number the simulator turns into time lives here, with its source. Presets ``h100`` and ``h200``;
any field can be overridden from a JSON file (``load_cluster("my.json")`` with ``{"base": "h100",
"ib_bw": 25e9}``; a file without ``base`` starts from ``h100``; keys starting with ``_`` are notes).
``benchmarks/calibrate_attention.py`` measures the kernel on a GPU and writes such a file
(:func:`.kernel_model.fit` fits it).

Attention-kernel time
---------------------
A segment of ``q`` queries × ``k`` keys costs ``work`` full kernel tiles (:mod:`hf_fcp.plan.cost`: tiles
touched, extra for tiles the causal diagonal crosses, a fixed cost per query tile and per key tile), and
a full tile runs at ``eff_fwd`` / ``eff_bwd`` of peak. So a causal square of 512 tokens spends most of its
time outside full tiles, and a short query run against long keys is cheap forward (one thread block, a
long loop) but not backward (many key-tile blocks, each looping over a few query rows).

Presets: ``h200`` is MEASURED — PyTorch's FlashAttention-2 varlen kernel (the ``torch_cuda`` backend fcp
runs on a GPU without flash-attn) timed on an H200 by ``benchmarks/calibrate_attention.py``
(``docs/measurements/h200_torch_flash.json``); the planner's default cost model (:data:`hf_fcp.plan.cost.FLASH`)
is the same fit. ``h100`` is the published FlashAttention-3 curve: its forward overhead is fitted to
FlashAttention-3's causal hdim-128 forward throughput on H100 relative to 16K tokens (Shah et al. 2024,
arXiv 2407.08608, Fig. 5, read off the plot: ≈0.31 at 512, 0.53 at 1K, 0.72 at 2K, 0.875 at 4K, 0.95 at
8K; the fit is within 6% at every point), all of it charged per query tile; the backward mirrors it per
key tile (an assumption: the figure read is forward only).
This is the FCP paper's observation (Zhao et al., MLSys 2026): 512-token blocks reach only ~25–30% of
long-sequence MFU and efficiency falls quickly below 2K. ``benchmarks/calibrate_attention.py`` measures all
six overheads on any GPU from a grid of square and rectangular, causal and non-causal segments and writes a
file to pass as ``--cluster``.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..plan import cost
from ..plan.cost import FLASH, OVERHEADS, KernelCost, TileModel


@dataclass(kw_only=True, frozen=True)
class Cluster(TileModel):
    """A homogeneous GPU cluster: ``gpus_per_node`` GPUs per node on NVLink, nodes on InfiniBand. The
    attention kernel is a :class:`hf_fcp.plan.cost.TileModel` (``tile`` and the six overhead fields)
    plus the full-tile efficiencies below."""

    name: str
    """Preset or file name, for reports."""
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s of one GPU (no sparsity)."""
    eff_fwd: float
    """Fraction of ``peak_flops`` the forward attention kernel reaches on a full tile (long segments)."""
    eff_bwd: float
    """Fraction of ``peak_flops`` the backward attention kernel reaches on a full tile."""
    launch_s: float = 5e-6
    """Fixed cost of one attention-kernel launch, seconds."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain; rank r lives on node r // gpus_per_node."""
    nvlink_bw: float
    """Achievable point-to-point NVLink bandwidth per GPU and direction, bytes/s."""
    nvlink_latency: float
    """Per-message latency inside a node, seconds."""
    ib_bw: float
    """Achievable InfiniBand bandwidth per GPU and direction, bytes/s."""
    ib_latency: float
    """Per-message latency between nodes, seconds."""
    num_sms: int = 132
    """Streaming multiprocessors per GPU."""
    comm_sms: int = 8
    """SMs the communication kernels (NCCL send/recv channels) occupy while a transfer overlaps compute;
    compute of a rank that communicates runs at (num_sms - comm_sms) / num_sms of its speed."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                continue
            ok_zero = f.name in OVERHEADS
            in_range = isinstance(value, numbers.Real) and (value >= 0 if ok_zero else value > 0)
            if isinstance(value, bool) or not in_range:
                raise ValueError(f"cluster field {f.name} must be a {'non-negative' if ok_zero else 'positive'} "
                                 f"number, got {value!r}")
        for name in ("eff_fwd", "eff_bwd"):
            if getattr(self, name) > 1:
                raise ValueError(f"cluster field {name} is a fraction of peak, got {getattr(self, name)}, "
                                 "expected <= 1")
        if self.comm_sms >= self.num_sms:
            raise ValueError(f"comm_sms must be below num_sms={self.num_sms}, got {self.comm_sms}")

    def work(self, q_len, k_len, causal, backward: bool = False) -> np.ndarray:
        """Full-tile equivalents of segments of ``q_len`` queries × ``k_len`` keys (arrays broadcast;
        causal ones bottom-right aligned); see :mod:`hf_fcp.plan.cost`."""
        p = "bwd" if backward else "fwd"
        return cost.work(q_len, k_len, causal, self.tile, getattr(self, f"{p}_diag"),
                                 getattr(self, f"{p}_q_tile"), getattr(self, f"{p}_k_tile"))

    def kernel_seconds(self, q_len, k_len, causal, flops_per_pair: float, backward: bool = False) -> np.ndarray:
        """Seconds of each segment's share of a kernel launch (launch cost not included); ``flops_per_pair``
        is the pass's FLOPs per visible (query, key) pair."""
        eff = self.eff_bwd if backward else self.eff_fwd
        return self.work(q_len, k_len, causal, backward) * (self.tile ** 2 * flops_per_pair / (eff * self.peak_flops))

    def kernel_cost(self) -> KernelCost:
        """This kernel's tile costs for the planner (``plan_batch(..., kernel_cost=...)``)."""
        return KernelCost.of_kernel(self.tile, self.eff_fwd, self.eff_bwd, **self.overheads())

    def efficiency(self, q_len, k_len, causal=True, backward: bool = False) -> np.ndarray:
        """Fraction of peak a segment runs at: its visible pairs over its work (reports, plots)."""
        q, k = np.asarray(q_len, np.float64), np.asarray(k_len, np.float64)
        qv = np.minimum(q, k)
        pairs = np.where(causal, qv * (k - qv) + qv * (qv + 1) / 2, q * k)
        eff = self.eff_bwd if backward else self.eff_fwd
        return eff * pairs / np.maximum(self.work(q, k, causal, backward) * self.tile ** 2, 1e-300)

    def node(self, rank) -> np.ndarray:
        return np.asarray(rank) // self.gpus_per_node

    def link(self, src, dst) -> tuple[np.ndarray, np.ndarray]:
        """(bandwidth bytes/s, latency s) of the link from ``src`` to ``dst`` (arrays broadcast)."""
        same = self.node(src) == self.node(dst)
        return (np.where(same, self.nvlink_bw, self.ib_bw), np.where(same, self.nvlink_latency, self.ib_latency))

    @property
    def compute_share_while_comm(self) -> float:
        """Fraction of the GPU left to compute while communication kernels run."""
        return (self.num_sms - self.comm_sms) / self.num_sms

    def to_dict(self) -> dict:
        return asdict(self)


# Sources.
# * Peak: NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOP/s dense BF16 (1979 with sparsity);
#   132 SMs (NVIDIA Hopper architecture whitepaper). H200 datasheet (SXM): the same 989 TFLOP/s dense BF16
#   (same GH100 compute), 141 GB HBM3e at 4.8 TB/s (H100: 80 GB HBM3 at 3.35 TB/s).
# * Kernel: FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608): H100 BF16 hdim 128 causal forward
#   ≈ 640 TFLOP/s at 16K (0.65 of peak); backward ≈ 500-550 TFLOP/s at 16K (0.52). The relative curve
#   of the module doc, fitted with kernel_model.fit (tile 128, overhead per query tile only): 4.26 tiles,
#   0.722 of peak on a full tile (the fit's 16K point is 3% above 0.65); the backward takes the same
#   shape per key tile, 0.577 = 0.52 × 0.722 / 0.65 (an assumption: only the forward curve was read).
# * h200 kernel: MEASURED on an H200 (torch 2.11, PyTorch's FlashAttention-2 varlen op, the torch_cuda
#   backend fcp runs when flash-attn is absent) by benchmarks/calibrate_attention.py: 55 timed shapes,
#   docs/measurements/h200_torch_flash.json (fit rms error 6.1% forward, 2.8% backward). It checks out on
#   real plans: gpu_replay.py predicts fcp's per-rank kernel time within 1.5-3.3% rms (docs/measurements).
# * NVLink 4: 900 GB/s total bidirectional per GPU = 450 GB/s per direction; nccl-tests sendrecv reach
#   ≈ 360-390 GB/s per direction between two GPUs of a DGX H100; we take 360 GB/s, ~10 µs per message.
# * InfiniBand: DGX H100 / H200 have one ConnectX-7 NDR 400 Gb/s NIC per GPU = 50 GB/s per direction
#   (the "50 GB/s per GPU"); we take 90% achievable (45 GB/s), ~20 µs per message incl. NCCL setup.
# * comm_sms: NCCL point-to-point runs one CTA per channel; 8 SMs is a typical reservation for
#   overlapped P2P (e.g. Megatron/TE CP with 2-4 channels per peer direction) — about 6% of 132 SMs.
PRESETS: dict[str, Cluster] = {
    "h100": Cluster(name="h100", peak_flops=989.4e12, eff_fwd=0.722, eff_bwd=0.577, tile=128, fwd_q_tile=4.26,
                    bwd_k_tile=4.26, nvlink_bw=360e9, nvlink_latency=10e-6, ib_bw=45e9, ib_latency=20e-6),
    "h200": Cluster(name="h200", peak_flops=989.4e12, eff_fwd=0.3566, eff_bwd=0.3311, tile=FLASH.tile,
                    **FLASH.overheads(), nvlink_bw=360e9, nvlink_latency=10e-6, ib_bw=45e9, ib_latency=20e-6),
}


def load_cluster(spec: str | Cluster) -> Cluster:
    """A preset name (``h100``, ``h200``) or the path of a JSON file of overrides (see module doc)."""
    if isinstance(spec, Cluster):
        return spec
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"cluster must be one of {sorted(PRESETS)} or a JSON file, got {spec!r} (no such file)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cluster file {spec!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cluster file {spec!r} must hold a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_measured", "_source": notes, ignored
    base = data.pop("base", "h100")
    if base not in PRESETS:
        raise ValueError(f"cluster file {spec!r}: base must be one of {sorted(PRESETS)}, got {base!r}")
    allowed = {f.name for f in fields(Cluster)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"cluster file {spec!r}: unknown field(s) {unknown}, expected some of {sorted(allowed)}")
    return replace(PRESETS[base], **{"name": path.stem, **data})
