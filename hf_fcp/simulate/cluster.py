"""Cluster model: compute peak, attention-kernel efficiency, links, and the SMs communication occupies.

Every number the simulator turns into time lives here, with its source. Presets ``h100`` and ``h200``;
any field can be overridden from a JSON file (``load_cluster("my.json")`` with ``{"base": "h100",
"ib_bw": 25e9}``; a file without ``base`` starts from ``h100``; keys starting with ``_`` are notes).
``benchmarks/calibrate_attention.py`` measures the kernel curve on a GPU and writes such a file
(:func:`fit_efficiency` fits it).

Attention-kernel efficiency
---------------------------
A segment of ``q`` queries attending to ``k`` keys runs at ``eff_pass × g(sqrt(q·k))`` of peak, with::

    g(n) = 1 / (1 + (n_half / n) ** shape)          # 0 for tiny segments, → 1 for long ones

``eff_pass`` is the asymptotic efficiency of the forward or the backward kernel. ``n_half = 1026`` and
``shape = 1.16`` are :func:`fit_efficiency` on FlashAttention-3's causal hdim-128 forward throughput on H100
relative to 16K tokens (Shah et al. 2024, arXiv 2407.08608, Fig. 5, read off the plot: ≈0.31 at 512, 0.53
at 1K, 0.72 at 2K, 0.875 at 4K, 0.95 at 8K; the curve gives 0.32, 0.52, 0.72, 0.87, 0.95). This is the FCP
paper's observation (Zhao et al., MLSys 2026): 512-token blocks reach only ~25–30% of long-sequence MFU and
efficiency falls quickly below 2K. The presets keep that published curve; the curve measured on an H200 for
PyTorch's own FlashAttention-2 kernel (the ``torch_cuda`` backend: 0.36/0.33 of peak asymptotically, n_half
567) is ``docs/measurements/h200_torch_flash.json`` — pass it as ``--cluster``. The geometric mean ``sqrt(q·k)`` makes a square causal block of n tokens count as n,
a short query run against a long key run count as longer (long inner loop), and vice versa.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np


@dataclass(kw_only=True, frozen=True)
class Cluster:
    """A homogeneous GPU cluster: ``gpus_per_node`` GPUs per node on NVLink, nodes on InfiniBand."""

    name: str
    """Preset or file name, for reports."""
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s of one GPU (no sparsity)."""
    eff_fwd: float
    """Fraction of ``peak_flops`` the forward attention kernel approaches on very long segments."""
    eff_bwd: float
    """Fraction of ``peak_flops`` the backward attention kernel approaches on very long segments."""
    n_half: float = 1026.0
    """Segment size (geometric mean of query and key lengths) at which the kernel reaches half its
    long-sequence efficiency."""
    shape: float = 1.16
    """Steepness of the efficiency curve g(n) = 1 / (1 + (n_half / n) ** shape)."""
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
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"cluster field {f.name} must be a positive number, got {value!r}")
        for name in ("eff_fwd", "eff_bwd"):
            if getattr(self, name) > 1:
                raise ValueError(f"cluster field {name} is a fraction of peak, got {getattr(self, name)}, expected <= 1")
        if self.comm_sms >= self.num_sms:
            raise ValueError(f"comm_sms must be below num_sms={self.num_sms}, got {self.comm_sms}")

    def efficiency(self, q_len, k_len, backward: bool = False) -> np.ndarray:
        """Fraction of peak a segment of ``q_len`` queries × ``k_len`` keys runs at (arrays broadcast)."""
        n = np.sqrt(np.asarray(q_len, np.float64) * np.asarray(k_len, np.float64))
        g = 1.0 / (1.0 + (self.n_half / np.maximum(n, 1e-9)) ** self.shape)
        return (self.eff_bwd if backward else self.eff_fwd) * g

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
# * Kernel efficiency: FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608): H100 BF16 hdim 128 causal
#   forward ≈ 640 TFLOP/s at 16K (0.65 of peak → 0.676 asymptotic with g(16K) = 0.961); backward ≈ 500-550
#   TFLOP/s at 16K (0.52 → 0.54). Long-sequence attention is compute bound, so H200's faster HBM changes
#   little: we keep the same curve (not measured).
# * NVLink 4: 900 GB/s total bidirectional per GPU = 450 GB/s per direction; nccl-tests sendrecv reach
#   ≈ 360-390 GB/s per direction between two GPUs of a DGX H100; we take 360 GB/s, ~10 µs per message.
# * InfiniBand: DGX H100 / H200 have one ConnectX-7 NDR 400 Gb/s NIC per GPU = 50 GB/s per direction
#   (the "50 GB/s per GPU"); we take 90% achievable (45 GB/s), ~20 µs per message incl. NCCL setup.
# * comm_sms: NCCL point-to-point runs one CTA per channel; 8 SMs is a typical reservation for
#   overlapped P2P (e.g. Megatron/TE CP with 2-4 channels per peer direction) — about 6% of 132 SMs.
PRESETS: dict[str, Cluster] = {
    "h100": Cluster(name="h100", peak_flops=989.4e12, eff_fwd=0.676, eff_bwd=0.54, nvlink_bw=360e9,
                    nvlink_latency=10e-6, ib_bw=45e9, ib_latency=20e-6),
    "h200": Cluster(name="h200", peak_flops=989.4e12, eff_fwd=0.676, eff_bwd=0.54, nvlink_bw=360e9,
                    nvlink_latency=10e-6, ib_bw=45e9, ib_latency=20e-6),
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


def fit_efficiency(n, eff, iters: int = 50) -> tuple[float, float, float]:
    """Fit ``eff(n) = eff_inf / (1 + (n_half / n) ** shape)`` to measured efficiencies (fractions of peak)
    of square segments of ``n`` tokens; returns ``(eff_inf, n_half, shape)``. A line in
    (log n, log(eff_inf / eff − 1)), alternated with re-estimating ``eff_inf`` from the largest segment."""
    n, eff = np.asarray(n, np.float64), np.asarray(eff, np.float64)
    if n.shape != eff.shape or n.size < 3 or (eff <= 0).any():
        raise ValueError(f"need >= 3 positive (n, efficiency) points of equal count, got {n.size} and {eff.size}")
    top = int(np.argmax(n))
    eff_inf = float(eff.max()) * 1.02
    for _ in range(iters):
        odds = np.maximum(eff_inf / eff - 1.0, 1e-9)
        slope, icpt = np.polyfit(np.log(n), np.log(odds), 1)
        shape, n_half = -slope, float(np.exp(icpt / -slope))
        eff_inf = float(eff[top] * (1.0 + (n_half / n[top]) ** shape))
    return eff_inf, n_half, float(shape)
